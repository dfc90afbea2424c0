"""Lesson 9, the nesting tax: what does a node pay for living in a tree?

Run: python -m tinyfractal.lessons.tax [--quick] [--out DIR] [--steps N] [--seed N] [--resume]

It prints each node's first loss without and with the 1/sqrt(d) logit scale, then trains the 'tiny'
tree and a standalone twin per level twice: with the prototype's choices (Config.faithful(): no logit
scale, the root's init for every entry, one lr) and with today's defaults (logit_scale='learned',
node_gains=True, nested_init=True, width_lr=1, clip_mode='tree', loss_weights='sqrtwidth>nodes'). Every run is kept in OUT/study_cache/ (the study
command's cache, with a checkpoint at every evaluation of the run in progress), so after Ctrl-C a second
run, with or without --resume, continues where it stopped and does not train a finished run again.
"""
import json
import math
import shutil
import time

import numpy as np

from tinyfractal import Config, Tokenizer, forward, init_params, nodes, view
from tinyfractal.core.formulas import cross_entropy
from tinyfractal.lessons._common import conclude, note_saved, pyplot, run, save_figure, section
from tinyfractal.tools.study import save_figure as save_study_figure
from tinyfractal.tools.study import summary_header, summary_row, table_lines, tax_study
from tinyfractal.training.checkpoint import atomic_write_json, exists, read_meta
from tinyfractal.training.data import batch_at, load_tokens, train_val_split
from tinyfractal.training.train import TrainConfig

STEPS = (300, 4)          # training steps of the small study: full run, --quick
STUDIES = {"prototype": "the prototype (faithful)", "defaults": "today's defaults"}


def main(argv=None):
    return run("tax", __doc__, lesson, argv, steps=STEPS, trains=True)


def lesson(args):
    the_question()
    cfg, rows = first_step(args)
    studies = small_study(args)
    the_full_study()
    section("5. Figures")
    for name, study in studies.items():
        print(f"saved {save_study_figure(study, args.out / f'tax_{name}.png')}")
    print(f"saved {first_loss_figure(rows, cfg, args.out / 'first_loss.png')}")


def the_question():
    """Section 1: the definition of the tax."""
    section("1. The nesting tax")
    print("A FractalFormer trains every node of its tree at once, on one set of arrays. Each node is a whole\n"
          "model, but it shares its weights with its ancestors and descendants. What does that cost it?\n\n"
          "    tax(l, j) = val loss of node (l, j) in the trained tree\n"
          "              - val loss of a model of the same shape (width d_l, head dim h_l) trained ALONE,\n"
          "                from its own init, on the same batches, for the same number of steps.\n\n"
          "A tax of 0 means the tree gives every node for free. MatFormer reports 0.01-0.03 nats for its\n"
          "nested models. `python -m tinyfractal.study tax` measures it; this lesson runs a small version.")


def first_step_table(cfg, ids, targets, seed):
    """For every node of a fresh tree: its width, the logit of the token it just read, the spread of the
    other logits, and its first loss; with logit_scale 'none' and 'learned' (every other option as in cfg)."""
    rows = []
    for scale in ("none", "learned"):
        c = cfg.override(logit_scale=scale)
        params = init_params(c, seed)
        for level, j in nodes(c):
            logits = np.asarray(forward(view(params, c, level, j), c.sub(level), ids))    # (B,T,V)
            own = np.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]            # (B,T): the token just read
            others = logits.copy()
            np.put_along_axis(others, ids[..., None], np.nan, axis=-1)
            rows.append({"scale": scale, "node": (level, j), "width": c.width(level), "own": float(own.mean()),
                         "others": float(np.nanstd(others)), "loss": float(cross_entropy(logits, targets))})
    return rows


def first_step(args):
    """Section 2: each node's first loss and own-token logit, logit_scale none against learned."""
    section("2. Why a fresh node starts tens of nats from ln V")
    name = "micro" if args.quick else "original"
    cfg = Config.preset(name) if args.quick else Config.preset(name).override(context=64)
    train_tokens, _ = train_val_split(load_tokens(Tokenizer.default()))
    ids, targets = batch_at(train_tokens, 4 if args.quick else 12, cfg.context, args.seed, 0)
    ln_v = math.log(cfg.vocab_size)
    print(f"The output is tied: logits = rmsnorm(x) . rmsnorm(E[v]) for every token v. Both vectors have\n"
          f"RMS 1, so each logit is a sum of d terms and |logit| <= d (Cauchy-Schwarz). A fresh node's final\n"
          f"state still holds the embedding of the token it just read, so that token's logit is near d, and\n"
          f"the others spread like sqrt(d). Cross-entropy pays the gap: the first loss grows with the width,\n"
          f"far above ln V = {ln_v:.2f}. The prototype did exactly this (logit_scale='none'). Today's default,\n"
          f"logit_scale='learned', divides each node's logits by sqrt(d_l) and lets each node learn its own\n"
          f"temperature from there (its factor starts at 1). So a fresh node's largest logit is sqrt(d), and\n"
          f"its first loss at most ln V + 2 sqrt(d), at every width.\n")
    print(f"The {cfg.n_nodes} nodes of the '{name}' preset (context {cfg.context}), a fresh tree, one real batch of "
          f"{ids.shape[0]} windows;\nonly logit_scale differs between the two halves of the table:")
    rows = first_step_table(cfg, ids, targets, args.seed)
    print(f"{'logit scale':>11} {'node':>6} {'width d':>7} {'own-token logit':>15} {'spread of others':>16} "
          f"{'first loss':>10} {'bound':>7}")
    for r in rows:
        d = r["width"]
        bound = ln_v + 2 * (d if r["scale"] == "none" else math.sqrt(d))
        print(f"{r['scale']:>11} {str(r['node']):>6} {d:7d} {r['own']:15.2f} {r['others']:16.2f} "
              f"{r['loss']:10.2f} {bound:7.1f}")
    plain = {r["node"]: r for r in rows if r["scale"] == "none"}
    scaled = {r["node"]: r for r in rows if r["scale"] == "learned"}
    root, leaf = (0, 0), (cfg.levels - 1, 0)
    # A fresh model's numbers, exact for any preset: true of a --quick run too
    print(f"\nWithout the scale the root (d={plain[root]['width']}) starts at {plain[root]['loss']:.1f} nats and a leaf "
          f"(d={plain[leaf]['width']}) at {plain[leaf]['loss']:.1f};\ntheir own-token logits are "
          f"{plain[root]['own']:.1f} and {plain[leaf]['own']:.1f}. Each node must first unlearn a temperature\n"
          f"that grows with its width, and the norm gains that could do it are shared with its ancestors.\n"
          f"Over sqrt(d) the root starts at {scaled[root]['loss']:.1f} and a leaf at {scaled[leaf]['loss']:.1f}; "
          f"their own-token logits are\n{scaled[root]['own']:.1f} and {scaled[leaf]['own']:.1f}, against "
          f"sqrt(d) = {math.sqrt(plain[root]['width']):.1f} and {math.sqrt(plain[leaf]['width']):.1f}.")
    return cfg, rows


def small_study(args):
    """Section 3: the tree and its standalone twins, with the prototype's choices and with the defaults."""
    section("3. A small tax study: the prototype's choices against today's defaults")
    small = Config.preset("micro") if args.quick else Config.preset("tiny")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=2 if args.quick else 16, lr=3e-3, min_lr=3e-4,
                     warmup=min(30, max(1, steps // 10)), eval_interval=max(1, steps // 10),
                     eval_batches=1 if args.quick else 4, log_interval=max(1, steps // 6), seed=args.seed)
    eval_batches = 2 if args.quick else 16
    cache = args.out / "study_cache"
    settings = {"prototype": (small.faithful(), tc.faithful()), "defaults": (small, tc)}
    print(f"The '{'micro' if args.quick else 'tiny'}' tree and a standalone twin per level, {steps} steps each "
          f"(batch {tc.batch_size}, lr {tc.lr:g} cosine to {tc.min_lr:g}),\nfinal evaluation on {eval_batches} "
          f"val batches, trained twice:\n"
          f"  the prototype's choices (Config.faithful()): logit_scale='none', nested_init=False (every entry\n"
          f"    starts as the root's init, so a level-l node's weight matrices start {small.split}^(l/2) times smaller\n"
          f"    than its twin's);\n"
          f"  today's defaults: logit_scale='learned' (1/sqrt(d) times a learned temperature per node), node_gains\n"
          f"    (each node's own output gain), nested_init=True (each block starts as its own twin's would),\n"
          f"    loss_weights='{tc.loss_weights}' (a node's loss weighs sqrt(d) at the start, all alike at the end),\n"
          f"    width_lr={tc.width_lr:g} (each matrix entry trains at lr * (D / d)^{tc.width_lr:g}, d the width of the deepest node\n"
          f"    whose block holds it; the prototype's single lr is width_lr=0), clip_mode='{tc.clip_mode}' (the tree's\n"
          f"    gradient is clipped where its nodes' would be clipped alone; the prototype's is 'global').\n"
          f"A twin is one level, so nested_init changes nothing for it; a twin of a level-l node trains its\n"
          f"matrices at the lr that node's own blocks get in the tree. So the two sets of twins differ by the\n"
          f"output (scale, temperature, gain) and by that lr.\nEvery run is kept in {cache}; a second run of the "
          f"lesson reuses the finished ones\nand continues an interrupted one from its last evaluation.")
    if args.resume:
        print("--resume: finished runs come from the cache, and an interrupted one continues from its checkpoint.")
    drop_broken_partials(cache)
    started = time.time()
    studies = {}
    try:
        for name, (c, t) in settings.items():
            print(f"\n--- {STUDIES[name]}: logit_scale={c.logit_scale}, node_gains={c.node_gains}, nested_init="
                  f"{c.nested_init}, width_lr={t.width_lr:g}, clip_mode={t.clip_mode}, loss_weights={t.loss_weights} ---")
            study = tax_study(c, t, [args.seed], eval_batches, cache)
            study["label"] = STUDIES[name]
            studies[name] = study
            print("\n".join(table_lines(study)))
            atomic_write_json(args.out / f"tax_{name}.json", study)
    except KeyboardInterrupt:
        note_cache(cache, started, steps)
        raise
    print("\nThe two studies side by side: per level the tree's val (mean over the level's nodes), the twin's\n"
          "val and the tax; then the root's bits/char and the smallest margin of any node below the unigram\n"
          "entropy (nats/token):")
    print(summary_header(small.levels))
    for study in studies.values():
        print(summary_row(study))
    conclude(args, comparison(studies["prototype"], studies["defaults"]))
    return studies


def comparison(before, after):
    """The conclusions of the small study, every sentence read off its numbers (a full run only)."""
    gain = [a["val"] - b["val"] for a, b in zip(before["nodes"], after["nodes"])]     # > 0: the defaults end lower
    lines = ["\nThe prototype's val minus the defaults' val (positive: the defaults end lower), per level:"]
    for a, b, twin_a, twin_b in zip(before["levels"], after["levels"], level_alone(before), level_alone(after)):
        tree = float(np.mean([g for g, r in zip(gain, after["nodes"]) if r["level"] == b["level"]]))
        lines.append(f"  level {b['level']} (d={b['width']}): the tree's nodes {tree:+.3f}, the twin {twin_a - twin_b:+.3f}; "
                     f"the tax goes from {a['tax']:+.3f} to {b['tax']:+.3f}")
    lines.append(f"{sum(g > 0 for g in gain)} of {len(gain)} nodes end lower with today's defaults. The tax is the "
                 f"tree's val minus the twin's,\nso it falls only where the tree gains more than its twin does.")
    root, root_alone = after["nodes"][0]["val"], before["nodes"][0]["alone"]
    lines.append(f"The defaults' root ends at {root:.3f} nats/token, "
                 + ("below" if root < root_alone else "not below")
                 + f" the prototype's root trained alone ({root_alone:.3f}).")
    margin = min(r["below_unigram"] for r in after["nodes"])
    lines.append(f"With the defaults every node ends {margin:.2f} nats or more below the unigram entropy."
                 if margin > 0 else f"With the defaults some node ends above the unigram entropy (by {-margin:.2f} nats).")
    return "\n".join(lines)


def level_alone(study):
    """The standalone twin's val per level (one number per level: the same for every node of it)."""
    return [next(r["alone"] for r in study["nodes"] if r["level"] == lv["level"]) for lv in study["levels"]]


def drop_broken_partials(cache):
    """Remove the checkpoint folder of a run interrupted before its first save was complete (nothing to
    continue from), so the study starts that run over instead of failing to load it."""
    if cache.exists():
        for partial in cache.glob("*.partial"):
            if not exists(partial):
                shutil.rmtree(partial, ignore_errors=True)


def note_cache(cache, started, steps):
    """After Ctrl-C: record what the study cache keeps, for the one line that _common prints. Finished
    runs (*.json) are complete; the run in progress (a *.partial folder saved since this lesson started)
    is kept at its last evaluation."""
    if not cache.exists():
        return
    for record in sorted(cache.glob("*.json")):
        try:
            done = json.loads(record.read_text(encoding="utf-8"))["train_config"]["steps"]
        except (ValueError, KeyError, TypeError, OSError):
            continue
        note_saved(record, done, done)
    for partial in sorted(cache.glob("*.partial")):
        if exists(partial) and partial.stat().st_mtime >= started:
            try:
                step = read_meta(partial)[1]["metrics"]["step"][-1]
            except (ValueError, KeyError, IndexError, OSError):
                continue
            note_saved(partial, step, steps)


def the_full_study():
    """Section 4: where the full study and its ablation are."""
    section("4. The full study, and what else was tried")
    print("The handout (lessons/tax.md) gives the full study at nanoGPT's CPU budget for Shakespeare: the\n"
          "'original' shape (width 128, 4 layers), context 64, batch 12, 2000 steps, lr 1e-3 cosine to 1e-4,\n"
          "2 seeds, 64 val batches, and an ablation of every option (the logit scale, nested init, per-node\n"
          "gains, loss weights per level, clipping, width-aware learning rates). One line reproduces a row:\n\n"
          "    python -m tinyfractal.study tax --out runs/tax                    # today's defaults\n"
          "    python -m tinyfractal.study tax --faithful --out runs/faithful    # the prototype's choices\n"
          "    python -m tinyfractal.study tax --loss_weights=width --out runs/w  # one option on top\n"
          "    python -m tinyfractal.study table runs/faithful runs/tax runs/w   # the ablation table")


def first_loss_figure(rows, cfg, path):
    """Bars: each level's first loss without and with the logit scale, against ln V."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, scale in enumerate(("none", "learned")):
        per_level = [np.mean([r["loss"] for r in rows if r["scale"] == scale and r["node"][0] == level])
                     for level in range(cfg.levels)]
        ax.bar(np.arange(cfg.levels) + 0.38 * k, per_level, width=0.36,
               label="logit_scale='none' (the prototype)" if scale == "none" else "logit_scale='learned' (default)")
    ax.axhline(math.log(cfg.vocab_size), color="black", ls=":", lw=1, label="ln V")
    ax.set_xticks(np.arange(cfg.levels) + 0.19, [f"level {l}\nd={cfg.width(l)}" for l in range(cfg.levels)])
    ax.set_ylabel("first-step loss (nats/token)")
    ax.set_title("A fresh node's first loss grows with its width")
    ax.legend()
    return save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
