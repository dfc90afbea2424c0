"""Lesson 7, the nesting tax: what does a node pay for living in a tree?

Run: python -m tinyfractal.lessons.tax [--quick] [--out DIR] [--steps N]
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np

from tinyfractal import Config, Tokenizer, forward, init_params, nodes, view
from tinyfractal.core.model import cross_entropy
from tinyfractal.tools.study import save_figure, save_png, summary_header, summary_row, table_lines, tax_study
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import batch_at, load_tokens, train_val_split
from tinyfractal.training.train import TrainConfig, format_duration


def section(title):
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tinyfractal.lessons.tax", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lesson_output/tax", help="folder for figures, tables and the run cache")
    p.add_argument("--quick", action="store_true", help="a few steps of a micro tree, to check that everything runs")
    p.add_argument("--steps", type=int, default=None, help="training steps of the small study (default 300)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def first_step_table(cfg, ids, targets):
    """For every node of a fresh tree: its width, the logit of the token it just read, the spread of the
    other logits, and its first loss; without and with the 1/sqrt(d) logit scale."""
    rows = []
    for scale in ("none", "sqrt"):
        c = cfg.override(logit_scale=scale)
        params = init_params(c, 0)
        for level, j in nodes(c):
            logits = np.asarray(forward(view(params, c, level, j), c.sub(level), ids))     # (B,T,V)
            own = np.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]             # the token just read
            others = logits.copy()
            np.put_along_axis(others, ids[..., None], np.nan, axis=-1)
            rows.append({"scale": scale, "node": (level, j), "width": c.width(level), "own": float(own.mean()),
                         "others": float(np.nanstd(others)),
                         "loss": float(cross_entropy(logits, targets))})
    return rows


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # %% 1. The question
    section("1. The nesting tax")
    print("A FractalFormer trains every node of its tree at once, on one set of arrays. Each node is a whole\n"
          "model, but it shares its weights with its ancestors and descendants. What does that cost it?\n\n"
          "    tax(l, j) = val loss of node (l, j) in the trained tree\n"
          "              - val loss of a model of the same shape (width d_l, head dim h_l) trained ALONE,\n"
          "                from its own init, on the same batches, for the same number of steps.\n\n"
          "A tax of 0 means the tree gives every node for free. MatFormer reports 0.01-0.03 nats for its\n"
          "nested models. `python -m tinyfractal.study tax` measures it; this lesson runs a small version.")

    # %% 2. The first step: logits that grow with the width
    section("2. Why a fresh node starts tens of nats from ln V")
    cfg = Config.preset("micro") if args.quick else Config.preset("original").override(context=64)
    tokenizer = Tokenizer.default()
    train_tokens, _ = train_val_split(load_tokens(tokenizer))
    ids, targets = batch_at(train_tokens, 4 if args.quick else 12, cfg.context, 0, 0)
    print(f"The output is tied: logits = rmsnorm(x) . rmsnorm(E[v]) for every token v. Both vectors have\n"
          f"RMS 1, so each logit is a sum of d terms and |logit| <= d (Cauchy-Schwarz). A fresh node's final\n"
          f"state still holds the embedding of the token it just read, so that token's logit is near d, and\n"
          f"the others spread like sqrt(d). Cross-entropy pays the gap: the first loss grows with the width,\n"
          f"far above ln V = {math.log(cfg.vocab_size):.2f}. Dividing each node's logits by sqrt(d_l) makes the largest\n"
          f"logit sqrt(d) and the first loss at most ln V + 2 sqrt(d), at every width (Config.logit_scale).\n")
    print(f"{cfg.split}**level widths of the '{'micro' if args.quick else 'original'}' preset, a fresh tree, "
          f"one real batch:")
    rows = first_step_table(cfg, ids, targets)
    print(f"{'logit scale':>11} {'node':>6} {'width d':>7} {'own-token logit':>15} {'spread of others':>16} "
          f"{'first loss':>10} {'bound':>7}")
    for r in rows:
        d = r["width"]
        bound = 2 * d + math.log(cfg.vocab_size) if r["scale"] == "none" else 2 * math.sqrt(d) + math.log(cfg.vocab_size)
        print(f"{r['scale']:>11} {str(r['node']):>6} {d:7d} {r['own']:15.2f} {r['others']:16.2f} "
              f"{r['loss']:10.2f} {bound:7.1f}")
    plain = {r["node"]: r for r in rows if r["scale"] == "none"}
    scaled = {r["node"]: r for r in rows if r["scale"] == "sqrt"}
    root, leaf = (0, 0), (cfg.levels - 1, 0)
    print(f"\nWithout the scale the root (d={plain[root]['width']}) starts at {plain[root]['loss']:.1f} nats and a leaf "
          f"(d={plain[leaf]['width']}) at {plain[leaf]['loss']:.1f}: about d,\nas the own-token logit says. Each node "
          f"must first unlearn a temperature that grows with its width,\nand the norm gains that could do it are shared "
          f"with its ancestors. Over sqrt(d) the root starts at\n{scaled[root]['loss']:.1f} and a leaf at "
          f"{scaled[leaf]['loss']:.1f}: the own-token logit is now about sqrt(d).")

    # %% 3. A small study: tree against alone
    section("3. A small tax study: the tree against standalone twins")
    steps = args.steps or (4 if args.quick else 300)
    small = Config.preset("micro") if args.quick else Config.preset("tiny")
    tc = TrainConfig(steps=steps, batch_size=2 if args.quick else 16, lr=3e-3, min_lr=3e-4,
                     warmup=min(30, max(1, steps // 10)), eval_interval=max(1, steps // 10), eval_batches=1 if args.quick else 4,
                     log_interval=max(1, steps // 6))
    eval_batches = 2 if args.quick else 16
    print(f"The '{'micro' if args.quick else 'tiny'}' tree and a twin per level, {steps} steps each "
          f"(lr {tc.lr} cosine to {tc.min_lr}), once without and once with the logit scale. Runs are cached\n"
          f"in {out / 'study_cache'}, so a second run of this lesson only prints.")
    studies = {}
    for scale in ("none", "sqrt"):
        c = small.override(logit_scale=scale)
        print(f"\n--- logit_scale={scale} ---")
        study = tax_study(c, tc, [0], eval_batches, out / "study_cache")
        study["label"] = f"logit_scale={scale}"
        studies[scale] = study
        print("\n".join(table_lines(study)))
        atomic_write_json(out / f"tax_{scale}.json", study)
    print("\nThe two studies side by side (tax per level, the root's val and bits/char, the leaf's val, and\n"
          "the smallest margin of any node below the unigram entropy):")
    print(summary_header(small.levels))
    for study in studies.values():
        print(summary_row(study))
    before, after = studies["none"], studies["sqrt"]
    gain = [a["val"] - b["val"] for a, b in zip(before["nodes"], after["nodes"])]
    twins = [a["alone"] - b["alone"] for a, b in zip(before["nodes"], after["nodes"])]
    print(f"\nWith the scale, {sum(g > 0 for g in gain)} of {len(gain)} nodes end lower (by {min(gain):+.3f} to "
          f"{max(gain):+.3f} nats), and the\nstandalone twins move by {min(twins):+.3f} to {max(twins):+.3f}: the tax "
          f"is the difference of the two, so it moves less\nthan either. Per level the tax goes from "
          + ", ".join(f"{a['tax']:+.3f} to {b['tax']:+.3f}" for a, b in zip(before["levels"], after["levels"])) + ".")

    # %% 4. The full study
    section("4. The full study, and what else was tried")
    print("The handout (lessons/tax.md) quotes the full study: the 'original' shape (width 128, 4 layers),\n"
          "context 64, batch 12, 2000 steps, lr 1e-3 cosine to 1e-4, 2 seeds, 64 val batches, and an ablation\n"
          "of every option (loss weights per level, clipping, width-aware learning rates, per-node gains,\n"
          "weight decay, dropout). One line reproduces a row:\n\n"
          "    python -m tinyfractal.study tax --out runs/tax                      # the baseline\n"
          "    python -m tinyfractal.study tax --logit_scale=sqrt --out runs/sqrt  # one option\n"
          "    python -m tinyfractal.study table runs/tax runs/sqrt                # the ablation table")

    # %% 5. Figures
    section("5. Figures")
    for scale, study in studies.items():
        print(f"saved {save_figure(study, out / f'tax_{scale}.png')}")
    print(f"saved {first_loss_figure(rows, cfg, out / 'first_loss.png')}")
    print(f"\nLesson done in {format_duration(time.perf_counter() - started)}; outputs in {out}/")
    return 0


def first_loss_figure(rows, cfg, path):
    """Bars: each level's first loss without and with the logit scale, against ln V."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, scale in enumerate(("none", "sqrt")):
        per_level = [np.mean([r["loss"] for r in rows if r["scale"] == scale and r["node"][0] == level])
                     for level in range(cfg.levels)]
        ax.bar(np.arange(cfg.levels) + 0.38 * k, per_level, width=0.36,
               label="no scale" if scale == "none" else "logits / sqrt(d)")
    ax.axhline(math.log(cfg.vocab_size), color="black", ls=":", lw=1, label="ln V")
    ax.set_xticks(np.arange(cfg.levels) + 0.19, [f"level {l}\nd={cfg.width(l)}" for l in range(cfg.levels)])
    ax.set_ylabel("first-step loss (nats/token)")
    ax.set_title("A fresh node's first loss grows with its width")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
