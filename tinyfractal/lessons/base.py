"""Lesson 1, the base model: one set of arrays, a tree of models, every one of them trained.

Run: python -m tinyfractal.lessons.base [--quick] [--out DIR] [--steps N]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from tinyfractal import Config, Tokenizer, count_params, forward, generate, init_params, nodes, view
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import load_tokens, train_val_split, unigram_entropy
from tinyfractal.training.train import TrainConfig, format_duration, loss_table, node_key, save_run, train

PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou R"


def section(title):
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tinyfractal.lessons.base", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lesson_output/base", help="folder for figures, metrics and the checkpoint")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check that everything runs")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1000, or 4 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # %% 1. The config and the tree
    section("1. The config and the tree of models")
    cfg = Config.preset("tiny")
    print(f"The 'tiny' preset: {cfg}")
    print(f"\nlevels={cfg.levels}, split={cfg.split}: level l holds split**l models of width hidden/split**l.")
    params = init_params(cfg, args.seed)
    print(f"\n{'level':>5} {'models':>6} {'width d':>7} {'head dim':>8} {'mlp f':>6} {'params/model':>12}")
    for level in range(cfg.levels):
        n = count_params(view(params, cfg, level, 0))
        print(f"{level:5d} {cfg.n_models(level):6d} {cfg.width(level):7d} {cfg.head_width(level):8d} "
              f"{cfg.mlp_width(level):6d} {n:12,d}")
    print(f"\nAll {cfg.n_nodes} models together own {count_params(params):,} numbers: the root's.")
    print("Every smaller model is a block of the root's arrays, not a copy. The tree:")
    for level, j in nodes(cfg):
        print("    " * level + f"({level},{j}) width {cfg.width(level)}")

    # %% 2. One weight and its views
    section("2. One weight, many models: views into the shared arrays")
    W = params["layers"][0]["Wgate"]
    print(f"layers[0]['Wgate'] of the root has shape {W.shape} (D x F).")
    for level, j in nodes(cfg):
        sub = view(params, cfg, level, j)["layers"][0]["Wgate"]
        rows, cols = cfg.width(level), cfg.mlp_width(level)
        print(f"  model ({level},{j}) sees Wgate[{j * rows}:{(j + 1) * rows}, {j * cols}:{(j + 1) * cols}]"
              f" shape {sub.shape}, shares memory: {np.shares_memory(sub, W)}")
    leaf = view(params, cfg, cfg.levels - 1, 1)["layers"][0]["Wgate"]
    before = float(W[cfg.width(cfg.levels - 1), cfg.mlp_width(cfg.levels - 1)])
    leaf[0, 0] += 1.0
    after = float(W[cfg.width(cfg.levels - 1), cfg.mlp_width(cfg.levels - 1)])
    leaf[0, 0] -= 1.0
    print(f"Adding 1 to leaf ({cfg.levels - 1},1)'s Wgate[0,0] changes the root's entry from {before:+.4f} "
          f"to {after:+.4f}: one set of numbers.")
    print("Attention weights keep their head axis: Wq has shape (D, H, hd) and model (l,j) takes\n"
          "Wq[R, :, C], a slice of the head dim inside EVERY head, so all models keep all heads.")

    # %% 3. One forward pass per node
    section("3. The same forward code runs every model")
    tokenizer = Tokenizer.default()
    ids = np.array([tokenizer.encode(PROMPT)[-16:]])
    print(f"Input ids, shape {ids.shape}: {ids[0].tolist()}")
    for level, j in nodes(cfg):
        sub_cfg = cfg.sub(level)
        logits = forward(view(params, cfg, level, j), sub_cfg, ids)
        print(f"  forward(view(params, cfg, {level}, {j}), cfg.sub({level}), ids): width {sub_cfg.hidden:3d}, "
              f"head dim {sub_cfg.head_dim:2d}, logits {logits.shape}, dtype {logits.dtype}")

    # %% 4. Training every node at once
    section("4. Training: one optimizer, one set of arrays, every node's loss")
    steps = args.steps or (4 if args.quick else 1000)
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=3e-3, min_lr=3e-4, warmup=min(50, steps // 10),
                     eval_interval=max(1, steps // 10), eval_batches=1 if args.quick else 8,
                     log_interval=max(1, steps // 30), seed=args.seed)
    print(f"The loss is the mean cross-entropy over all {cfg.n_nodes} models, so every node learns.")
    print(f"Settings: {tc}")
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    print(f"Corpus: {len(train_tokens):,} train and {len(val_tokens):,} val tokens (a 90/10 split).")
    t0 = time.perf_counter()
    state, metrics = train(params, cfg, tc, train_tokens, val_tokens)
    train_seconds = time.perf_counter() - t0
    print(f"Trained {steps} steps in {format_duration(train_seconds)}.")
    save_run(out / "checkpoint", params, cfg, tc, state, metrics)
    atomic_write_json(out / "metrics.json", {"config": cfg.to_dict(), **metrics})

    # %% 5. Per-node validation loss
    section("5. How well does each model predict the next token?")
    entropy = unigram_entropy(train_tokens, cfg.vocab_size)
    print(f"Unigram entropy of the tokens: {entropy:.3f} nats (a model that ignores context).")
    print("\n".join(loss_table(metrics, cfg, entropy)))
    means = [np.mean([metrics["val"][node_key((level, j))][-1] for j in range(cfg.n_models(level))])
             for level in range(cfg.levels)]
    print("Mean val loss per level: " + ", ".join(f"level {l}: {m:.3f}" for l, m in enumerate(means)))
    beaten = [node for node in nodes(cfg) if metrics["val"][node_key(node)][-1] <= entropy - 0.5]
    ordered = all(means[level] < means[level + 1] for level in range(cfg.levels - 1))
    print(f"{len(beaten)} of {cfg.n_nodes} models are at least 0.5 nats below the unigram entropy.")
    print("Each level beats the next, smaller one on average." if ordered else
          "The levels are not yet ordered by width: train longer (--steps) to see wider models win.")

    # %% 6. A sample from every node
    section("6. A sample from every node")
    samples = {}
    for level, j in nodes(cfg):
        text = generate(params, cfg, tokenizer, PROMPT, level=level, index=j,
                        max_new_tokens=6 if args.quick else 60, temperature=0.8, top_k=40, seed=args.seed)
        samples[node_key((level, j))] = text
        print(f"--- model ({level},{j}), width {cfg.width(level)} ---\n{text}\n")
    stuck = [key for key, text in samples.items() if len(set(text[len(PROMPT):])) <= 1]
    print("The prototype's untrained models printed 'RRRR...'. Here, models whose sample is one repeated "
          f"character: {stuck if stuck else 'none'}.")

    # %% 7. Figures
    section("7. Figures")
    figures = save_figures(params, cfg, metrics, out)
    for f in figures:
        print(f"saved {f}")
    atomic_write_json(out / "summary.json", {
        "steps": steps, "train_seconds": train_seconds, "unigram_entropy": entropy,
        "val": {k: v[-1] for k, v in metrics["val"].items()}, "samples": samples})
    print(f"\nLesson done in {format_duration(time.perf_counter() - started)}; outputs in {out}/")
    return 0


def save_figures(params, cfg, metrics, out):
    """Loss curves per node, which model owns each entry of the MLP and attention weights, the tree."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.85, cfg.levels))
    for level, j in nodes(cfg):
        key = node_key((level, j))
        ax.plot(metrics["eval_step"], metrics["val"][key], color=colors[level],
                label=f"level {level} (width {cfg.width(level)})" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title("Validation loss of every node")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Who owns which entry of the MLP and attention weights (drawn through view), and the tree.
    from tinyfractal.tools.plots import ownership_maps, tree_figure
    paths += ownership_maps(cfg, out, kinds=["Wgate_Wup", "Wdown", "Wq", "Wo"])
    paths.append(tree_figure(cfg, out / "tree.png", params))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
