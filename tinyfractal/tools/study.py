"""Research commands. `tax`: what does each node pay for living in a tree?

The nesting tax of node (l, j) is its val loss in the trained tree minus the val loss of a model of
the same shape (width d_l, head dim h_l, one level) trained alone, from its own init, on the same
batches, for the same number of steps: tax = val(node) - val(alone). Per level it is the mean over
the level's nodes and the seeds.

    python -m tinyfractal.study tax --steps 2000 --seeds 0,1 --out runs/tax           # the full budget
    python -m tinyfractal.study tax --logit_scale=sqrt --out runs/tax_sqrt           # an ablation
    python -m tinyfractal.study table runs/tax runs/tax_sqrt                          # one row per study
    python -m tinyfractal.study tax --quick --out /tmp/tax                            # seconds (plumbing)

Every run (the tree and each standalone model, per seed) is cached in `--cache` (default
OUT/study_cache) as <hash>.json, the hash of everything that decides its numbers: the model and
training settings, the final evaluation and the data. An ablation that changes only tree-side
settings (loss weights, say) therefore trains only the tree; `--fresh` ignores the cache. A model
option at its neutral value ("off") does not enter the hash, so adding an option keeps old entries.

bits/char converts nats/token with the evaluated text itself: the targets of the val windows are
decoded and their characters counted, so bits/char = nats / ln 2 / (chars per token).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as onp

from tinyfractal import Config, Tokenizer, init_params, load, nodes, save
from tinyfractal.config import FAITHFUL
from tinyfractal.cli_args import Parser, parse_overrides, reporting, split_overrides
from tinyfractal.tools.plots import _save as save_png   # atomic PNG write, Agg backend
from tinyfractal.training.checkpoint import atomic_write_json, load_optimizer
from tinyfractal.training.data import batch_at, load_tokens, train_val_split, unigram_entropy
from tinyfractal.training.train import (FAITHFUL_TRAIN, TrainConfig, evaluate, format_duration, level_weights_at,
                                        node_key, node_losses, train)

# The budget of issue 15 (nanoGPT's CPU budget for Shakespeare), and the seconds-long --quick one.
FULL = dict(preset="original", steps=2000, context=64, batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100,
            eval_batches=64, seeds="0,1")
QUICK = dict(preset="micro", steps=4, context=16, batch_size=2, lr=1e-3, min_lr=1e-4, warmup=1,
             eval_batches=2, seeds="0")
CURVE_POINTS, CURVE_BATCHES = 10, 8   # val curves: 10 evals of 8 batches; the final eval uses --eval-batches

# Values under which a studied option is off (the prototype's choices): such a setting stays out of the
# cache hash, so a cache written before the option existed is still found. Anything else is hashed.
NEUTRAL = {**FAITHFUL, **FAITHFUL_TRAIN}
NOT_HASHED = {"log_interval"}


# Settings

def budget(args, extra):
    """(cfg, tc, seeds, eval_batches) from the flags; --key=value goes to Config or TrainConfig by name."""
    base = QUICK if args.quick else FULL
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    seeds = parse_seeds(pick["seeds"])
    model_over, train_over = split_overrides(parse_overrides(extra), ("model", Config), ("training", TrainConfig))
    cfg = Config.preset(pick["preset"])
    cfg = (cfg.faithful() if args.faithful else cfg).override(**{"context": pick["context"], **model_over})
    if cfg.tokenizer != "bpe":
        raise ValueError(f"study tax runs token models (tokenizer='bpe'); a byte model's level-l node reads groups "
                         f"of split^(L-1-l) bytes, so a one-level model is not its shape (got tokenizer={cfg.tokenizer!r})")
    steps = pick["steps"]
    if steps < 1 or pick["eval_batches"] < 1:
        raise ValueError("--steps and --eval-batches must be >= 1")
    tc = TrainConfig(steps=steps, batch_size=pick["batch_size"], lr=pick["lr"], min_lr=pick["min_lr"],
                     warmup=pick["warmup"], eval_interval=max(1, steps // CURVE_POINTS),
                     eval_batches=min(CURVE_BATCHES, pick["eval_batches"]), log_interval=max(1, steps // 40))
    tc = (tc.faithful() if args.faithful else tc).override(**train_over)
    level_weights_at(tc, cfg, 0)   # a loss_weights that does not fit the tree fails now, not after the data
    return cfg, tc, seeds, pick["eval_batches"]


def parse_seeds(text):
    try:
        seeds = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def alone_config(cfg, level):
    """The standalone twin of a level-l node: width d_l, head dim h_l, one level, no coupling."""
    return cfg.sub(level).override(levels=1, coupling="none")


def alone_train(tc, cfg):
    """The twin's training settings. Tree-only settings mean nothing for one model, so they go back to
    neutral (same cache), except width_lr: a node's matrices train at lr * (D / d_l) ** width_lr in the
    tree, so its twin's do too (lr_width = D). Otherwise a higher lr, not the tree, would earn the
    narrow nodes' lower loss."""
    changes = {k: v for k, v in NEUTRAL.items() if hasattr(tc, k)}
    if tc.width_lr:
        changes.update(width_lr=tc.width_lr, lr_width=cfg.hidden)
    return dataclasses.replace(tc, **changes)


def run_key(kind, cfg, tc, eval_batches, data_digest):
    """Hash of everything that decides a run's numbers (neutral settings left out, see NEUTRAL)."""
    def settings(obj):
        return {k: v for k, v in dataclasses.asdict(obj).items()
                if k not in NOT_HASHED and not (k in NEUTRAL and v == NEUTRAL[k])}
    spec = {"kind": kind, "config": settings(cfg), "train": settings(tc), "eval_batches": eval_batches,
            "curve_batches": CURVE_BATCHES, "data": data_digest}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


# The data

def load_data(cfg, tc, eval_batches):
    """Train/val tokens, a digest of them, and the val text's chars per token on the evaluated windows."""
    tokenizer = Tokenizer.default()
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size is "
                         f"{cfg.vocab_size}")
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    digest = hashlib.sha256(train_tokens.tobytes() + val_tokens.tobytes()).hexdigest()[:16]
    chars = tokens = 0
    for b in range(eval_batches):   # the same windows evaluate() reads (its seed 1234)
        _, targets = batch_at(val_tokens, tc.batch_size, cfg.context, 1234, b)
        chars += sum(len(tokenizer.decode(row)) for row in targets)
        tokens += targets.size
    return {"train": train_tokens, "val": val_tokens, "digest": digest, "chars_per_token": chars / tokens,
            "unigram": unigram_entropy(train_tokens, cfg.vocab_size)}


# One run: train, evaluate, record

def first_losses(params, cfg, tc, data):
    """Each node's loss on the first training batch, before any update: {node key: nats}."""
    ids, targets = batch_at(data["train"], tc.batch_size, cfg.context, tc.seed, 0)
    return {node_key((level, j)): float(v) for level, losses in enumerate(node_losses(params, cfg, ids, targets))
            for j, v in enumerate(onp.asarray(losses))}


def train_run(cfg, tc, data, eval_batches, log, partial=None):
    """Train from init_params(cfg, tc.seed) and return the record that the cache stores.

    With `partial` (a folder), a checkpoint with the optimizer state is saved there at every evaluation,
    and a run that finds one resumes from it: batches are seeded per step, so a resumed run gives the
    same numbers as one that was never interrupted.
    """
    if partial is not None and Path(partial).exists():
        params, _, meta = load(partial)
        state, metrics, first, before = load_optimizer(partial), meta["metrics"], meta["first"], meta["seconds"]
        log(f"resuming from {partial} at step {state['t']}")
    else:
        params, state, metrics, before = init_params(cfg, tc.seed), None, None, 0.0
        first = first_losses(params, cfg, tc, data)
    t0 = time.perf_counter()

    def checkpoint(step, metrics, state):
        if partial is not None and step < tc.steps:
            save(partial, params, cfg, {"metrics": metrics, "first": first,
                                        "seconds": before + time.perf_counter() - t0}, opt_state=state)
    _, metrics = train(params, cfg, tc, data["train"], data["val"], state, metrics, log=log, on_eval=checkpoint)
    seconds = before + time.perf_counter() - t0
    final = {split: {node_key(n): v for n, v in evaluate(params, cfg, data[split], tc.batch_size,
                                                         eval_batches).items()}
             for split in ("val", "train")}
    return {"config": cfg.to_dict(), "train_config": dataclasses.asdict(tc), "seed": tc.seed,
            "val": final["val"], "train": final["train"], "first": first, "seconds": seconds,
            "curve": {"step": metrics["eval_step"], "val": metrics["val"]}, "loss": metrics["loss"]}


def cached_run(kind, cfg, tc, data, eval_batches, cache, fresh, log):
    """The record of a run, from the cache if it holds one, else trained now (resuming from its
    checkpoint if an earlier attempt was interrupted) and stored."""
    key = run_key(kind, cfg, tc, eval_batches, data["digest"])
    path, partial = Path(cache) / f"{key}.json", Path(cache) / f"{key}.partial"
    if path.exists() and not fresh:
        record = json.loads(path.read_text())
        log(f"cached: {path}")
        return record
    if fresh and partial.exists():
        shutil.rmtree(partial)
    record = {"kind": kind, **train_run(cfg, tc, data, eval_batches, log, partial)}
    atomic_write_json(path, record)
    if partial.exists():
        shutil.rmtree(partial)
    return record


# The study

def tax_study(cfg, tc, seeds, eval_batches, cache, fresh=False, log=print):
    """Train the tree and each level's standalone twin for every seed; returns the study's JSON record."""
    data = load_data(cfg, tc, eval_batches)
    trees, alone = [], {level: [] for level in range(cfg.levels)}
    started = time.perf_counter()
    for seed in seeds:
        tcs = tc.override(seed=seed)
        trees.append(cached_run("tree", cfg, tcs, data, eval_batches, cache, fresh,
                                lambda s, seed=seed: log(f"[tree seed {seed}] {s}")))
        for level in range(cfg.levels):
            alone[level].append(cached_run("alone", alone_config(cfg, level), alone_train(tcs, cfg), data, eval_batches,
                                           cache, fresh, lambda s, seed=seed, level=level:
                                           log(f"[alone level {level} seed {seed}] {s}")))
    return summarize(cfg, tc, seeds, eval_batches, data, trees, alone, time.perf_counter() - started)


def summarize(cfg, tc, seeds, eval_batches, data, trees, alone, seconds):
    """Per-node and per-level numbers (means over seeds) from the runs' records."""
    cpt, ln2 = data["chars_per_token"], math.log(2)
    rows = []
    for level, j in nodes(cfg):
        key = node_key((level, j))
        tree_vals = [run["val"][key] for run in trees]
        alone_vals = [run["val"]["0.0"] for run in alone[level]]
        val, solo = float(onp.mean(tree_vals)), float(onp.mean(alone_vals))
        rows.append({"node": key, "level": level, "width": cfg.width(level), "val": val, "val_seeds": tree_vals,
                     "alone": solo, "alone_seeds": alone_vals, "tax": val - solo,
                     "bits_per_char": val / ln2 / cpt, "alone_bits_per_char": solo / ln2 / cpt,
                     "below_unigram": data["unigram"] - val,
                     "train": float(onp.mean([run["train"][key] for run in trees])),
                     "first": float(onp.mean([run["first"][key] for run in trees])),
                     "alone_first": float(onp.mean([run["first"]["0.0"] for run in alone[level]]))})
    levels = [{"level": level, "width": cfg.width(level),
               "tax": float(onp.mean([r["tax"] for r in rows if r["level"] == level])),
               "tax_seeds": [float(onp.mean([run["val"][node_key((level, j))] for j in range(cfg.n_models(level))])
                                   - alone[level][s]["val"]["0.0"]) for s, run in enumerate(trees)],
               "alone_seconds": [run["seconds"] for run in alone[level]]}
              for level in range(cfg.levels)]
    return {"config": cfg.to_dict(), "train_config": dataclasses.asdict(tc), "seeds": seeds,
            "eval_batches": eval_batches, "chars_per_token": cpt, "unigram": data["unigram"],
            "nodes": rows, "levels": levels, "tree_seconds": [run["seconds"] for run in trees],
            "seconds": seconds, "trees": trees, "alone": {str(k): v for k, v in alone.items()}}


def table_lines(study):
    """The per-node table and the per-level tax, as text."""
    n = len(study["seeds"])
    lines = [f"val nats/token, mean of {n} seed{'s' * (n > 1)} ({', '.join(map(str, study['seeds']))}); "
             f"{study['eval_batches']} val batches; {study['chars_per_token']:.3f} chars/token; "
             f"unigram entropy {study['unigram']:.3f} nats"]
    if study["train_config"].get("width_lr"):
        lines.append(f"width_lr={study['train_config']['width_lr']:g}: each twin's matrices train at the lr its "
                     f"node's own matrices get in the tree, lr * (D / d) ** width_lr")
    lines += [f"{'node':>6} {'width':>5} {'tree val':>8} {'per seed':>15} {'alone':>7} {'tax':>7} "
              f"{'bits/char':>9} {'alone b/c':>9} {'train':>7} {'unigram-val':>11} {'first loss':>10} {'alone first':>11}"]
    for r in study["nodes"]:
        seeds = " ".join(f"{v:.3f}" for v in r["val_seeds"])
        name = "(" + r["node"].replace(".", ",") + ")"
        lines.append(f"{name:>6} {r['width']:5d} {r['val']:8.4f} {seeds:>15} {r['alone']:7.4f} {r['tax']:+7.3f} "
                     f"{r['bits_per_char']:9.3f} {r['alone_bits_per_char']:9.3f} {r['train']:7.4f} "
                     f"{r['below_unigram']:11.3f} {r['first']:10.2f} {r['alone_first']:11.2f}")
    lines.append("tax per level: " + ", ".join(
        f"level {lv['level']} (d={lv['width']}) {lv['tax']:+.3f} [{' '.join(f'{t:+.3f}' for t in lv['tax_seeds'])}]"
        for lv in study["levels"]))
    lines.append("wall time: tree " + ", ".join(format_duration(s) for s in study["tree_seconds"]) + "; alone " +
                 "; ".join(f"level {lv['level']} " + ", ".join(format_duration(s) for s in lv["alone_seconds"])
                           for lv in study["levels"]) + " (per seed; cached runs keep their first time)")
    return lines


def summary_row(study):
    """One line of the ablation table: per level the tree's val, the twin's val and the tax (means over
    seeds and nodes), then the root's bits/char and the smallest margin of any node below the unigram."""
    levels = Config.from_dict(study["config"]).levels
    tree = [sum(r["val"] for r in study["nodes"] if r["level"] == l) /
            sum(1 for r in study["nodes"] if r["level"] == l) for l in range(levels)]
    alone = [next(r["alone"] for r in study["nodes"] if r["level"] == l) for l in range(levels)]
    worst = min(r["below_unigram"] for r in study["nodes"])
    cells = " | ".join(f"{t:.3f} {a:.3f} {lv['tax']:+.3f}" for t, a, lv in zip(tree, alone, study["levels"]))
    return (f"{study.get('label') or 'baseline':<34} {len(study['seeds']):>5}  {cells}  "
            f"{study['nodes'][0]['bits_per_char']:8.3f} {worst:9.3f}")


def summary_header(levels):
    cells = " | ".join(f"L{l} tree alone    tax" for l in range(levels))
    return f"{'settings':<34} {'seeds':>5}  {cells}  {'root b/c':>8} {'min below':>9}"


def save_figure(study, path):
    """Left: tax per level (bar: mean; dots: seeds). Right: val curves, tree level means vs alone."""
    import matplotlib.pyplot as plt

    cfg = Config.from_dict(study["config"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.viridis(onp.linspace(0, 0.85, cfg.levels))
    for lv in study["levels"]:
        ax.bar(lv["level"], lv["tax"], color=colors[lv["level"]])
        ax.plot([lv["level"]] * len(lv["tax_seeds"]), lv["tax_seeds"], "k.", ms=8)
    ax.axhline(0.05, color="grey", ls=":", lw=1, label="target 0.05")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(cfg.levels), [f"level {l}\nd={cfg.width(l)}" for l in range(cfg.levels)])
    ax.set_ylabel("tax: tree val - alone val (nats/token)")
    ax.set_title("The nesting tax per level")
    ax.legend()
    for level in range(cfg.levels):
        steps = study["trees"][0]["curve"]["step"]
        tree = onp.mean([[run["curve"]["val"][node_key((level, j))] for j in range(cfg.n_models(level))]
                         for run in study["trees"]], axis=(0, 1))
        solo = onp.mean([run["curve"]["val"]["0.0"] for run in study["alone"][str(level)]], axis=0)
        bx.plot(steps, tree, color=colors[level], label=f"level {level} in the tree")
        bx.plot(steps, solo, color=colors[level], ls="--", label=f"level {level} alone")
    bx.set_xlabel("step")
    bx.set_ylabel(f"val loss (nats/token, {CURVE_BATCHES} batches)")
    bx.set_title("Tree (solid) against alone (dashed)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


# Command line

def parse_args(argv):
    p = Parser(prog="python -m tinyfractal.study", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("tax", help="train the tree and each level's standalone twin; print the nesting tax")
    t.add_argument("--preset", default=None, help=f"model preset (default {FULL['preset']})")
    t.add_argument("--steps", type=int, default=None, help=f"training steps (default {FULL['steps']})")
    t.add_argument("--context", type=int, default=None, help=f"context length (default {FULL['context']})")
    t.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {FULL['batch_size']})")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {FULL['lr']})")
    t.add_argument("--min-lr", type=float, default=None, help=f"final learning rate, cosine (default {FULL['min_lr']})")
    t.add_argument("--warmup", type=int, default=None, help=f"warmup steps (default {FULL['warmup']})")
    t.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {FULL['seeds']})")
    t.add_argument("--eval-batches", type=int, default=None,
                   help=f"val batches of the final evaluation (default {FULL['eval_batches']})")
    t.add_argument("--out", default="study_output/tax", help="folder for tax.json and tax.png")
    t.add_argument("--cache", default=None, help="folder of cached runs (default OUT/study_cache)")
    t.add_argument("--fresh", action="store_true", help="retrain even if the cache holds a run")
    t.add_argument("--label", default=None, help="name of this study in `table` (default: its overrides)")
    t.add_argument("--quick", action="store_true", help="a few steps of the micro preset: seconds (plumbing only)")
    t.add_argument("--faithful", action="store_true",
                   help="the prototype's choices for every studied option (Config.faithful, TrainConfig.faithful); "
                        "--key=value still applies after it")
    t.set_defaults(overrides=True)
    s = sub.add_parser("table", help="one row per tax.json: the ablation table")
    s.add_argument("studies", nargs="+", help="tax.json files, or folders holding one")
    args, extra = p.parse_known_args(argv)
    if extra and not getattr(args, "overrides", False):
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    return args, extra


def run_tax(args, extra, argv):
    cfg, tc, seeds, eval_batches = budget(args, extra)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "study_cache"
    print(f"study tax: the tree {cfg}\ntrained with {tc}\nseeds {seeds}; standalone twins of every level; "
          f"cache {cache}")
    study = tax_study(cfg, tc, seeds, eval_batches, cache, args.fresh)
    study["label"] = args.label or " ".join(extra)
    study["command"] = "python -m tinyfractal.study " + " ".join(argv)
    lines = table_lines(study)
    print("\n" + "\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "tax.json", study)
    figure = save_figure(study, out / "tax.png")
    print(f"\nsaved {out / 'tax.json'} and {figure}; study done in {format_duration(study['seconds'])}")
    return 0


def run_table(args):
    studies = []
    for name in args.studies:
        path = Path(name) / "tax.json" if Path(name).is_dir() else Path(name)
        if not path.exists():
            raise ValueError(f"no study at {name}: expected a tax.json file or a folder holding one")
        studies.append(json.loads(path.read_text()))
    print(summary_header(max(Config.from_dict(s["config"]).levels for s in studies)))
    for study in studies:
        print(summary_row(study))
    return 0


@reporting
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parse_args(argv)
    return run_tax(args, extra, argv) if args.command == "tax" else run_table(args)


if __name__ == "__main__":
    raise SystemExit(main())
