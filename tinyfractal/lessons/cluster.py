"""Lesson 8, from the classroom to the cluster: the same tree trained by NumPy and by JAX, one checkpoint, a device mesh.

Run: python -m tinyfractal.lessons.cluster [--quick] [--out DIR] [--steps N] [--seed N]

It needs jax (pip install 'tinyfractal[jax]'); without it, it says so in one line and stops.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinyfractal import Config, Tokenizer, init_params, load
from tinyfractal.core.tree import flatten, nodes
from tinyfractal.inference.sample import generate
from tinyfractal.lessons._common import run, section
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import load_tokens, train_val_split
from tinyfractal.training.train import TrainConfig, evaluate, format_duration, save_run, train

PROMPT = "ROMEO:"
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])   # so the child runs this very tinyfractal


def main(argv=None):
    return run("cluster", __doc__, lesson, argv, steps=(200, 6))


def lesson(args):
    from tinyfractal.jax_engine import INSTALL, available
    if not available():
        print(f"This lesson needs jax, which is not installed here: {INSTALL}")
        return
    import jax
    from tinyfractal.jax_engine import sample as jax_sample
    from tinyfractal.jax_engine.mesh import Layout
    from tinyfractal.jax_engine.train import make_level_losses, to_device, train as jax_train

    out = Path(args.out)
    quick = args.quick
    results = {}

    # %% 1. One tree, two engines
    section("1. One tree, two engines")
    cfg = Config.preset("micro") if quick else Config.preset("tiny")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=4 if quick else 16, warmup=min(50, steps // 10),
                     eval_interval=steps, eval_batches=2 if quick else 8, log_interval=max(1, steps // 4),
                     seed=args.seed)
    tokenizer = Tokenizer.default()
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    print(f"The '{'micro' if quick else 'tiny'}' preset: {cfg.n_nodes} models in one set of arrays, trained {steps} steps, "
          f"batch {tc.batch_size} x {cfg.context} tokens.")
    print("The NumPy engine (autograd, fused primitives) and the JAX engine (jax.numpy, jax.grad, jit) start from the")
    print("same init_params and read the same batches, because batches are seeded by step number.")
    print("The JAX engine calls the same formulas (tinyfractal/core/formulas.py) with xp=jax.numpy: nothing is re-typed.")
    print(f"Both train with the default settings: loss weights '{tc.loss_weights}' (each step's node weights and")
    print(f"clipping threshold are handed to the jitted JAX step), logit_scale='{cfg.logit_scale}', "
          f"node_gains={cfg.node_gains}.\n")

    np_params = init_params(cfg, args.seed)
    print("NumPy engine:")
    t0 = time.perf_counter()
    np_state, np_metrics = train(np_params, cfg, tc, train_tokens, val_tokens, log=lambda s: print("  " + s))
    np_seconds = time.perf_counter() - t0
    print("\nJAX engine (the first thing it does is compile the whole step):")
    lines = []
    t0 = time.perf_counter()
    jax_params = init_params(cfg, args.seed)
    jax_state, jax_metrics = jax_train(jax_params, cfg, tc, train_tokens, val_tokens,
                                       log=lambda s: (lines.append(s), print("  " + s)))
    jax_seconds = time.perf_counter() - t0
    compile_seconds = float(lines[0].split(" in ")[1].split(" s")[0])
    gap = float(np.max(np.abs(np.array(np_metrics["loss"]) - np.array(jax_metrics["loss"]))))
    drift = max(float(np.max(np.abs(flatten(np_params)[k] - flatten(jax_params)[k]))) for k in flatten(np_params))
    print(f"\nLargest difference between the two engines' training losses over {steps} steps: {gap:.1e}")
    print(f"Largest difference between their parameters after training: {drift:.1e}")
    print("They differ only in float32 rounding: XLA adds and fuses in another order than NumPy.")
    print(f"Wall time: NumPy {format_duration(np_seconds)}, JAX {format_duration(jax_seconds)} "
          f"of which {compile_seconds:.1f} s compiling (evaluations included in both).")
    print("On a laptop CPU the fused NumPy engine is usually as fast or faster: XLA shines on GPUs and TPUs,")
    print("and when one program must run on many devices. `python -m tinyfractal.bench --backend numpy,jax` measures it.")
    results["engines"] = {"steps": steps, "max_loss_gap": gap, "max_param_gap": drift, "numpy_seconds": np_seconds,
                          "jax_seconds": jax_seconds, "jax_compile_seconds": compile_seconds}

    # %% 2. The checkpoint passes between them
    section("2. The checkpoint passes between them")
    ckpt = out / "jax_checkpoint"
    save_run(ckpt, jax_params, cfg, tc, jax_state, jax_metrics, new_run=True)
    print(f"The JAX run saved {ckpt}/ with the NumPy engine's own save_run: a step folder holding params.npz")
    print("(plain arrays, no pickle) and meta.json (config, metrics, SHA-256 checksums). NumPy loads it:")
    params, loaded_cfg, _ = load(ckpt)
    by_numpy = evaluate(params, loaded_cfg, val_tokens, tc.batch_size, tc.eval_batches)
    level_losses = make_level_losses(cfg, Layout(devices=jax.devices()[:1]))
    by_jax = evaluate(to_device(params, Layout(devices=jax.devices()[:1])), cfg, val_tokens, tc.batch_size,
                      tc.eval_batches, level_losses=level_losses)
    print(f"\n{'node':>8} {'val (NumPy)':>12} {'val (JAX)':>10} {'difference':>11}")
    for level, j in nodes(cfg):
        a, b = by_numpy[(level, j)], by_jax[(level, j)]
        print(f"{'(' + str(level) + ',' + str(j) + ')':>8} {a:12.4f} {b:10.4f} {abs(a - b):11.1e}")
    leaf = nodes(cfg)[-1]
    text_np = generate(params, cfg, tokenizer, PROMPT, *leaf, max_new_tokens=40, temperature=0.8, seed=1)
    text_jax = jax_sample.generate(params, cfg, tokenizer, PROMPT, *leaf, max_new_tokens=40, temperature=0.8, seed=1)
    print(f"\nModel {leaf} samples with the NumPy engine (KV cache) and the JAX engine (recomputed window), seed 1:")
    print(f"  NumPy: {text_np!r}\n  JAX:   {text_jax!r}\n  the same text: {'yes' if text_np == text_jax else 'no'}")
    results["checkpoint"] = {"max_val_gap": max(abs(by_numpy[n] - by_jax[n]) for n in by_numpy),
                             "same_sample": text_np == text_jax}

    # %% 3. The device mesh
    section("3. The device mesh: what is sharded")
    here = Layout()
    print(f"This process sees {len(jax.devices())} device(s): {', '.join(str(d) for d in jax.devices())}")
    print(f"  {here.describe()}")
    print("A mesh arranges the devices in a grid with named axes, here ('data', 'model'). Training puts")
    print("  the batch:      rows split over 'data'       (each device reads B / data rows)")
    print("  the parameters: replicated                    (every device holds all of them; XLA sums the gradients)")
    print("  with --model-axis M: the N models of a level split over 'model', because a level is a stack of")
    print("  N independent models: a natural model parallelism no ordinary transformer has.")
    print("\nA laptop has one CPU device, so we start a child process that pretends to have four")
    print("(XLA_FLAGS=--xla_force_host_platform_device_count=4) and compute the tree loss on three meshes:")
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "tinyfractal.jax_engine.demo"], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the 4-device child failed: {done.stderr.strip()[-800:]}")
    demo = json.loads(done.stdout)
    single = demo["runs"]["1 device"]["loss"]
    for name, run in demo["runs"].items():
        print(f"\n  {run['describe']}")
        print(f"    tree loss {run['loss']:.6f}  (difference from one device: {abs(run['loss'] - single):.1e})")
        print("    batch rows on each device:   " + ", ".join(f"{d}: {a}-{b - 1}" for d, (a, b) in run["ids"].items()))
        print("    level-2 logits on each device (models, rows): " +
              ", ".join(f"{d}: m{m[0]}-{m[1] - 1} r{r[0]}-{r[1] - 1}" for d, (m, r) in run["level2"].items()))
    print("\nThe same program gives the same loss on every mesh, up to float32 rounding (a sum split over devices")
    print("adds in another order): sharding changes where numbers are computed, not which numbers.")
    print("The same code runs on many hosts: every process joins with --distributed.")
    results["mesh"] = demo

    # %% 4. To a cluster
    section("4. From here to a cluster")
    print("One machine, every GPU:   python -m tinyfractal train --backend jax --preset original --out runs/gpu")
    print("Many hosts (each runs):   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<0 or 1> \\")
    print("                            python -m tinyfractal train --backend jax --distributed --preset original --out runs/big")
    print("SLURM:                    srun python -m tinyfractal train --backend jax --distributed ...   (found by JAX)")
    print("A TPU pod:                the same command on every worker (--worker=all); JAX finds the pod by itself")
    print("The handout (lessons/cluster.md) has the full commands.")

    # %% 5. Figures
    section("5. Figures")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(np_metrics["step"], np_metrics["loss"], label="NumPy engine", lw=3, alpha=0.5)
    a1.plot(jax_metrics["step"], jax_metrics["loss"], label="JAX engine", lw=1)
    a1.set(xlabel="step", ylabel="tree loss (nats)", title="the same tree, two engines")
    a1.legend()
    diff = np.abs(np.array(np_metrics["loss"]) - np.array(jax_metrics["loss"]))
    differ = diff > 0
    a2.semilogy(np.array(np_metrics["step"])[differ], diff[differ], ".", ms=4)
    a2.set(xlabel="step", ylabel="|loss difference|",
           title=f"float32 rounding ({int((~differ).sum())} of {len(diff)} steps exactly equal, not shown)")
    fig.tight_layout()
    paths.append(out / "engines.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    runs = demo["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.6))
    for ax, (name, run) in zip(axes, runs.items()):
        devices = list(run["level2"])
        for k, d in enumerate(devices):
            (m0, m1), (r0, r1) = run["level2"][d]
            ax.add_patch(plt.Rectangle((r0, m0), r1 - r0, m1 - m0, alpha=0.35, color=f"C{k}"))
            ax.text((r0 + r1) / 2, (m0 + m1) / 2, d.replace("TFRT_CPU_", "cpu "), ha="center", va="center", fontsize=8)
        ax.set(xlim=(0, 4), ylim=(4, 0), xlabel="batch rows", ylabel="models of level 2", title=name,
               xticks=range(5), yticks=range(5))
    fig.suptitle("where the level-2 logits live (overlaps: replicated)")
    fig.tight_layout()
    paths.append(out / "mesh.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for p in paths:
        print(f"saved {p}")

    atomic_write_json(out / "results.json", results)


if __name__ == "__main__":
    sys.exit(main())
