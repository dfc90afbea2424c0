"""How fast does a FractalFormer train here? `python -m tinyfractal.tools.bench --preset tiny|original`.

In one process it
  1. measures this machine's float32 matmul peak (GFLOP/s) on the matmuls of the model's own shapes,
  2. times full training steps (forward, backward, gradient clipping, AdamW), the median of --steps
     after a warm-up, for the level-batched fast path and for the per-node reference path, one step
     of each in turn so that a busy machine slows both alike,
  3. counts the step's matmul FLOPs (projections, QK, PV, output logits; backward = 2x forward),
  4. prints step time, tokens/s, GFLOP/s, MFU (achieved / measured peak), the speed-up and each
     path's peak resident memory (each path runs a few steps in a fresh child process for that), and
  5. a profile of the fast step: the share of its time in weight matmuls, attention matmuls, the
     attention softmax, norms, GeGLU, RoPE, cross-entropy, the optimizer and everything else.

FLOPs count attention as the full T x T square (the usual MFU convention); the fast path skips most
of the masked half, and the report also gives MFU counting only the causal half.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as onp
from autograd import value_and_grad

from tinyfractal import api
from tinyfractal.cli_args import Parser, reporting
from tinyfractal.config import Config
from tinyfractal.core import machinery
from tinyfractal.core.flops import step_flops_by_kind
from tinyfractal.core.tree import flatten
from tinyfractal.training.train import TrainConfig, adamw_init, adamw_step, clip_by_global_norm

PATHS = ("fast", "reference")       # the NumPy engine's two paths
BACKENDS = ("numpy", "jax")         # --backend jax adds the path "jax": the JAX engine (tinyfractal/jax_engine/bench.py)


def matmul_shapes(cfg, batch):
    """The distinct (batch, m, k, n) matmul shapes one fast training step runs, forward and backward."""
    T, V, H, K = cfg.context, cfg.vocab_size, cfg.heads, cfg.kv_heads
    M, G = batch * T, H // K
    shapes = set()
    for level in range(cfg.levels):
        N, d, h, f = cfg.n_models(level), cfg.width(level), cfg.head_width(level), cfg.mlp_width(level)
        for A, O in ((d, H * h), (d, K * h), (H * h, d), (d, f), (f, d), (d, V)):
            shapes |= {(N, M, A, O), (N, M, O, A), (N, A, M, O)}          # forward, dx, dW
        Z = N * batch * K
        shapes |= {(Z, T * G, h, T), (Z, T * G, T, h), (Z, T, T * G, h)}   # QK and dP, PV and dQ, dV and dK
    return sorted(shapes)


def measure_peak(cfg, batch, budget=0.05):
    """Best float32 GFLOP/s over the model's matmul shapes: (GFLOP/s, shape, how).

    Each shape is timed for about `budget` seconds two ways, as plain np.matmul (BLAS's own threads)
    and as machinery.batched_matmul (our threads, single-threaded BLAS); the fastest run counts.
    """
    rng = onp.random.default_rng(0)
    best = (0.0, None, None)
    for (Bm, m, k, n) in matmul_shapes(cfg, batch):
        a = rng.standard_normal((Bm, m, k), dtype=onp.float32)
        b = rng.standard_normal((Bm, k, n), dtype=onp.float32)
        out = onp.empty((Bm, m, n), dtype=onp.float32)
        flops = 2.0 * Bm * m * k * n
        for how, run in (("np.matmul", lambda: onp.matmul(a, b, out=out)),
                         ("machinery.batched_matmul", lambda: machinery.batched_matmul(a, b))):
            run()
            reps, fastest, start = 0, float("inf"), time.perf_counter()
            while reps < 3 or time.perf_counter() - start < budget:
                t0 = time.perf_counter()
                run()
                fastest = min(fastest, time.perf_counter() - t0)
                reps += 1
            if flops / fastest / 1e9 > best[0]:
                best = (flops / fastest / 1e9, (Bm, m, k, n), how)
    return best


def training_step(path, cfg, tc, seed=0):
    """A function running one full training step of `path` on its own fresh parameters."""
    if path == "jax":
        from tinyfractal.jax_engine.bench import training_step as jax_step
        return jax_step(cfg, tc, seed)
    params = api.init_params(cfg, seed)
    loss = api.tree_loss if path == "fast" else api.tree_loss_reference
    value_grad = value_and_grad(lambda p, ids, targets: loss(p, cfg, ids, targets))
    state = adamw_init(params)
    flat_params = flatten(params)
    timings = {}

    def step(ids, targets):
        t0 = time.perf_counter()
        value, grads = value_grad(params, ids, targets)
        t1 = time.perf_counter()
        flat_g = flatten(grads)
        clip_by_global_norm(flat_g, tc.grad_clip)
        adamw_step(flat_params, flat_g, state, tc.lr, tc)
        timings["optimizer"] = time.perf_counter() - t1
        timings["forward+backward"] = t1 - t0
        return float(value)
    step.timings = timings
    return step


def batches(cfg, batch, count, seed=0):
    rng = onp.random.default_rng(seed)
    for _ in range(count):
        ids = rng.integers(0, cfg.vocab_size, (batch, cfg.context + 1))
        yield ids[:, :-1], ids[:, 1:]


def time_steps(cfg, tc, steps, warmup, paths, runners=None):
    """Wall and CPU seconds of every timed training step of each path, one step of each in turn.

    CPU seconds (all threads of this process) tell what the step costs when the machine is shared:
    on an idle machine with c cores the wall time could approach CPU / c.
    """
    runners = runners or {path: training_step(path, cfg, tc) for path in paths}
    wall, cpu = {path: [] for path in paths}, {path: [] for path in paths}
    for i, (ids, targets) in enumerate(batches(cfg, tc.batch_size, warmup + steps)):
        for path, run in runners.items():
            time.sleep(0.3)            # let BLAS threads that spin after the other path's step go idle
            t0, c0 = time.perf_counter(), time.process_time()
            run(ids, targets)
            if i >= warmup:
                wall[path].append(time.perf_counter() - t0)
                cpu[path].append(time.process_time() - c0)
    return wall, cpu


def profile_fast_step(cfg, tc, steps=3):
    """Seconds per fast step by category of op (wall time), plus the optimizer and the rest."""
    run = training_step("fast", cfg, tc)
    data = list(batches(cfg, tc.batch_size, steps + 1, seed=1))
    run(*data[0])
    total, optimizer = 0.0, 0.0
    with machinery.profiling() as seconds:
        for ids, targets in data[1:]:
            t0 = time.perf_counter()
            run(ids, targets)
            total += time.perf_counter() - t0
            optimizer += run.timings["optimizer"]
    table = {k: v / steps for k, v in seconds.items()}
    table["optimizer (clip + AdamW)"] = optimizer / steps
    table["other (autograd, reshapes, views, adds)"] = total / steps - sum(table.values())
    return total / steps, dict(sorted(table.items(), key=lambda kv: -kv[1]))


def peak_memory(preset, path, batch, steps=2):
    """Peak resident memory (bytes) of a fresh process running `steps` training steps of `path`."""
    cmd = [sys.executable, "-m", "tinyfractal.tools.bench", "--preset", preset, "--batch", str(batch),
           "--steps", str(steps), "--memory-of", path]
    if machinery.blas_threads() is not None:
        cmd += ["--blas-threads", str(machinery.blas_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe for {path} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)["peak_rss_bytes"]


def memory_probe(cfg, tc, path, steps):
    run = training_step(path, cfg, tc)
    for ids, targets in batches(cfg, tc.batch_size, steps):
        run(ids, targets)
    return {"path": path, "peak_rss_bytes": peak_rss()}


def peak_rss():
    """Peak resident memory of this process in bytes.

    Linux's VmHWM belongs to this program alone; getrusage's ru_maxrss (the fallback) would also count
    what the parent process held when it started us.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_bench(preset, steps, warmup, batch=None, paths=PATHS, memory=True, profile_steps=3):
    cfg = Config.preset(preset)
    tc = TrainConfig.preset(preset)
    if batch is not None:
        tc = tc.override(batch_size=batch)
    flops = step_flops_by_kind(cfg, tc.batch_size)
    memory = {path: peak_memory(preset, path, tc.batch_size) for path in paths} if memory else {}
    peak, peak_shape, peak_how = measure_peak(cfg, tc.batch_size)
    runners = {path: training_step(path, cfg, tc) for path in paths}
    wall, cpu = time_steps(cfg, tc, steps, warmup, paths, runners)
    medians = {path: statistics.median(t) for path, t in wall.items()}
    tokens = tc.batch_size * cfg.context
    result = {"preset": preset, "batch": tc.batch_size, "context": cfg.context, "tokens_per_step": tokens,
              "models": cfg.n_nodes, "steps": steps, "warmup": warmup, "threads": machinery.THREADS,
              "load_average_1min": os.getloadavg()[0], "flops_per_step": flops,
              "matmul_peak_gflops": peak, "matmul_peak_shape": list(peak_shape), "matmul_peak_by": peak_how,
              "paths": {}}
    for path in paths:
        t = medians[path]
        achieved = flops["total"] / t / 1e9
        result["paths"][path] = {
            "step_seconds": t, "step_seconds_all": wall[path], "cpu_seconds": statistics.median(cpu[path]),
            "tokens_per_second": tokens / t,
            "gflops": achieved, "mfu": achieved / peak,
            "mfu_causal_half": flops["total (attention causal half)"] / t / 1e9 / peak}
        if path in memory:
            result["paths"][path]["peak_rss_bytes"] = memory[path]
    if "fast" in medians and "reference" in medians:
        result["speedup"] = medians["reference"] / medians["fast"]
    if "jax" in paths:
        add_jax(result, cfg, tc, medians, runners["jax"].compile_seconds)
    if profile_steps and "fast" in paths:
        step, table = profile_fast_step(cfg, tc, profile_steps)
        result["profile"] = {"step_seconds": step, "steps": profile_steps, "seconds": table}
    return result


def add_jax(result, cfg, tc, medians, compile_seconds):
    """The JAX engine's extras: compile time, its devices, and MFU against its own device's matmul peak."""
    from tinyfractal.jax_engine.bench import measure_peak as jax_peak
    jax_path = result["paths"]["jax"]
    jax_path["compile_seconds"] = compile_seconds
    peak, shape, device = jax_peak(matmul_shapes(cfg, tc.batch_size))
    result.update(jax_matmul_peak_gflops=peak, jax_matmul_peak_shape=list(shape), jax_device=device)
    jax_path["mfu_own_peak"] = jax_path["gflops"] / peak
    if "fast" in medians:
        result["jax_vs_fast"] = medians["fast"] / medians["jax"]


def report(r):
    """The result as the text table the command prints."""
    f = r["flops_per_step"]
    lines = [f"preset {r['preset']}: {r['models']} models, batch {r['batch']} x context {r['context']} = "
             f"{r['tokens_per_step']} tokens/step; fast path on {r['threads']} threads, OpenBLAS threads "
             f"{r.get('blas_threads')}; load average {r['load_average_1min']:.1f}",
             f"matmul FLOPs/step {f['total'] / 1e9:.2f} G (causal half only: {f['total (attention causal half)'] / 1e9:.2f} G): "
             + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in f.items() if not k.startswith("total")),
             f"float32 matmul peak on the model's shapes: {r['matmul_peak_gflops']:.1f} GFLOP/s "
             f"(best: shape {tuple(r['matmul_peak_shape'])} as batch, m, k, n, by {r['matmul_peak_by']})",
             "",
             f"{'path':10} {'step s':>8} {'CPU s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6} {'MFU causal':>10} {'peak RSS':>9}"]
    for path, p in r["paths"].items():
        rss = f"{p['peak_rss_bytes'] / 2 ** 30:.2f} GB" if "peak_rss_bytes" in p else "-"
        lines.append(f"{path:10} {p['step_seconds']:8.3f} {p['cpu_seconds']:7.3f} {p['tokens_per_second']:9.0f} {p['gflops']:8.1f} "
                     f"{p['mfu']:6.1%} {p['mfu_causal_half']:10.1%} {rss:>9}")
    if "speedup" in r:
        lines.append(f"speed-up of the fast path over the reference: {r['speedup']:.2f}x")
    if "jax" in r["paths"]:
        j = r["paths"]["jax"]
        lines.append(f"jax: compiling the step took {j['compile_seconds']:.1f} s (once, not in the step time); "
                     f"jnp.matmul peak on {r['jax_device']}: {r['jax_matmul_peak_gflops']:.1f} GFLOP/s, "
                     f"MFU against it {j['mfu_own_peak']:.1%}")
        if "jax_vs_fast" in r:
            lines.append(f"jax step time relative to the numpy fast path: {1 / r['jax_vs_fast']:.2f}x "
                         f"({'faster' if r['jax_vs_fast'] > 1 else 'slower'})")
    if "profile" in r:
        step = r["profile"]["step_seconds"]
        lines += ["", f"profile of a fast step ({step:.3f} s wall, mean of {r['profile']['steps']} steps):"]
        for k, v in r["profile"]["seconds"].items():
            lines.append(f"  {k:42} {v * 1e3:8.1f} ms {v / step:6.1%}")
    return "\n".join(lines)


@reporting
def main(argv=None):
    parser = Parser(prog="python -m tinyfractal.tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(("tiny", "original", "sierpinski", "micro")))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's training batch)")
    parser.add_argument("--paths", default="fast,reference", help="comma-separated: fast, reference (the numpy engine)")
    parser.add_argument("--backend", default="numpy",
                        help="comma-separated engines: numpy (the --paths), jax (pip install 'tinyfractal[jax]')")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--profile-steps", type=int, default=3, help="fast steps to profile (0: none)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="set OpenBLAS's own thread count for the whole run (the reference path uses it)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--memory-of", choices=PATHS + ("jax",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths must be a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    backends = tuple(b for b in args.backend.split(",") if b)
    if not backends or any(b not in BACKENDS for b in backends):
        parser.error(f"--backend must be a comma-separated subset of {','.join(BACKENDS)}, got {args.backend!r}")
    if "jax" in backends or args.memory_of == "jax":
        from tinyfractal.jax_engine import require
        try:
            require("--backend jax")
        except ValueError as e:
            parser.error(str(e))
    paths = (paths if "numpy" in backends else ()) + (("jax",) if "jax" in backends else ())
    for name in ("steps", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.warmup < 0 or args.profile_steps < 0:
        parser.error("--warmup and --profile-steps must be >= 0")
    machinery.tune()
    if args.blas_threads is not None:
        if args.blas_threads < 1 or machinery.blas_threads() is None:
            parser.error("--blas-threads needs a positive count and numpy's bundled OpenBLAS")
        machinery.set_blas_threads(args.blas_threads)
    if args.memory_of:
        cfg, tc = Config.preset(args.preset), TrainConfig.preset(args.preset)
        tc = tc.override(batch_size=args.batch) if args.batch else tc
        print(json.dumps(memory_probe(cfg, tc, args.memory_of, args.steps)))
        return 0
    result = run_bench(args.preset, args.steps, args.warmup, args.batch, paths, not args.no_memory,
                       args.profile_steps)
    result["blas_threads"] = machinery.blas_threads()
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
