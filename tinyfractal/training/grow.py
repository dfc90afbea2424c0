"""Growing a FractalFormer: train small models apart, merge them, train only what is new, repeat.

The original's plan ("infinite fusion", docs/design.md):
  stage 0          split**(L-1) standalone leaf models, each on its own contiguous chunk of the corpus
                   (90/10 train/val inside each chunk);
  stage 1 .. L-1   merge each group of `split` models into the level above (merge.py), freeze the
                   children, and train only the new off-diagonal blocks on the union of their chunks,
                   with the loss of the new parent alone (the children's losses cannot move).
Stage L-1 leaves one model: a whole FractalFormer whose every node was trained.

With an output folder, every model of every stage is checkpointed as it trains (at each evaluation,
at Ctrl-C, and when it is done) in out/growing/stage{t}-model{g}, and `resume=True` continues from
there: finished models are loaded, the interrupted one goes on from its last checkpoint, and the
rest train as they would have. Batches are seeded by step and every model's seed is fixed by its
place in the tree, so a resumed growth ends with the same arrays, bit for bit, as one never stopped.

    python -m tinyfractal grow --preset tiny --out runs/grown --steps-per-stage 600,500,1000
    python -m tinyfractal grow --preset tiny --out runs/grown --steps-per-stage 600,500,1000 --resume
"""
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as onp

from tinyfractal.training.checkpoint import atomic_write_json, exists, load_run, save
from tinyfractal.core.flops import model_flops, train_step_flops
from tinyfractal.variants import variant_of
from tinyfractal.training.data import batch_at, train_val_split
from tinyfractal.training.merge import OFF_DIAGONAL, extract, merge, root_loss, trainable_mask
from tinyfractal.api import init_params
from tinyfractal.core.model import forward
from tinyfractal.training.train import TrainConfig, evaluate, node_key, one_model_settings, train
from tinyfractal.core.tree import flatten, view


def chunk_data(tokens, n_chunks, context, val_fraction=0.1):
    """Cut the corpus into n_chunks contiguous chunks, each split 90/10: [(train, val), ...]."""
    bounds = [len(tokens) * k // n_chunks for k in range(n_chunks + 1)]
    chunks = [train_val_split(tokens[a:b], val_fraction) for a, b in zip(bounds, bounds[1:])]
    shortest = min(min(len(tr), len(va)) for tr, va in chunks)
    if shortest <= context + 1:
        raise ValueError(f"the corpus of {len(tokens)} tokens cut into {n_chunks} chunks leaves a train or val part "
                         f"of {shortest} tokens; every part needs more than context+1 = {context + 1}")
    return chunks


def union(chunks, lo, hi):
    """The train parts of chunks [lo, hi) end to end, and their val parts likewise.

    A batch window may straddle the seam between two chunks; that is a few windows in thousands.
    """
    return (onp.concatenate([tr for tr, _ in chunks[lo:hi]]),
            onp.concatenate([va for _, va in chunks[lo:hi]]))


def stage_steps(steps, levels):
    """`steps` as one count per stage (leaves first): an int for all, or a list of `levels` ints."""
    counts = [steps] * levels if isinstance(steps, int) and not isinstance(steps, bool) else list(steps)
    if len(counts) != levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"steps per stage must be one positive integer or {levels} of them "
                         f"(leaves first, root last), got {steps!r}")
    return counts


def step_flops(cfg, batch_size, levels=(0,)):
    """Matmul FLOPs of one training step whose loss reads the models of `levels`: 3x their forward."""
    return train_step_flops(cfg, batch_size, lambda m: model_flops(cfg, m, cfg.context), levels)


def logit_diffs(params, cfg, children, child_cfg, ids):
    """Max |logits of node (1, r) in the merged tree - logits of standalone child r|, for every r."""
    return [float(onp.max(onp.abs(forward(view(params, cfg, 1, r), child_cfg, ids) - forward(child, child_cfg, ids))))
            for r, child in enumerate(children)]


def same_arrays(a, b):
    """True if two params dicts hold bit-for-bit equal arrays."""
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(onp.array_equal(fa[k], fb[k]) for k in fa)


def check_growable(cfg):
    variant_of(cfg).require("grow", "growing a tree (grow)")


def corpus_tokens(cfg):
    """The corpus as tokens of the default tokenizer, which must have the config's vocabulary."""
    from tinyfractal.training.data import load_tokens
    from tinyfractal.text.bpe import Tokenizer
    tokenizer = Tokenizer.default()
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {cfg.vocab_size}")
    return load_tokens(tokenizer)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Stage t of growing config `cfg`: its models sit at `level` of the final tree, each reads `per_model`
    chunks of the corpus and trains for `steps` steps with `tc` (whose seed is the run's)."""
    cfg: object
    tc: TrainConfig
    t: int
    steps: int

    @property
    def level(self):
        return self.cfg.levels - 1 - self.t

    @property
    def model_cfg(self):
        return self.cfg.sub(self.level)

    @property
    def per_model(self):
        return self.cfg.split ** self.t

    def data(self, chunks, g):
        """Model g's train and val tokens (the union of its chunks) and the start of its record."""
        lo, hi = g * self.per_model, (g + 1) * self.per_model
        train_tokens, val_tokens = union(chunks, lo, hi)
        record = {"node": [self.level, g], "chunks": [lo, hi], "steps": self.steps,
                  "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
                  "step_flops": step_flops(self.model_cfg, self.tc.batch_size)}
        return train_tokens, val_tokens, record

    def train_config(self, g):
        """Model g's training settings: this stage's step count and a seed of its own."""
        return dataclasses.replace(self.tc, steps=self.steps, seed=self.tc.seed + 1000 * self.t + g)

    def prefix(self, g):
        return f"[stage {self.t + 1}/{self.cfg.levels} node ({self.level},{g})] "


@dataclasses.dataclass
class Saved:
    """A model's checkpoint from an earlier run of the same growth: its arrays, optimizer state, metrics,
    record (without the metrics), the seconds spent on it so far, and whether its training was done."""
    params: dict
    state: dict
    metrics: dict
    record: dict
    seconds: float
    cpu_seconds: float
    done: bool


class Progress:
    """Where growing keeps each model's checkpoint (out/growing/stage{t}-model{g}), and what makes a saved
    one belong to this growth: a fingerprint of the tree, the stage's settings and the corpus."""

    def __init__(self, out, cfg, tc, counts, off_diagonal, scale, tokens, resume=False, on_checkpoint=None):
        self.folder = Path(out) / "growing"
        self.resume, self.on_checkpoint = resume, on_checkpoint
        corpus = hashlib.sha256(onp.ascontiguousarray(tokens, dtype=onp.int64).tobytes()).hexdigest()
        self.growth = {"config": cfg.to_dict(), "train": dataclasses.asdict(tc), "steps_per_stage": list(counts),
                       "off_diagonal": off_diagonal, "scale": float(scale), "corpus_sha256": corpus}

    def path(self, stage, g):
        return self.folder / f"stage{stage.t}-model{g}"

    def fingerprint(self, stage, g):
        return _plain({"growth": self.growth, "stage": stage.t, "node": [stage.level, g],
                       "train": dataclasses.asdict(stage.train_config(g))})

    def load(self, stage, g):
        """With resume, this growth's checkpoint of model g of the stage: Saved, or None if there is none.
        A checkpoint of another growth (other tree, settings or corpus) is a ValueError."""
        path = self.path(stage, g)
        if not self.resume or not exists(path):
            return None
        params, cfg, meta, state, _ = load_run(path)
        if _plain(meta.get("grow_model")) != self.fingerprint(stage, g) or cfg != stage.model_cfg or state is None:
            raise ValueError(f"cannot resume growing from {path}: it was saved by another growth (other config, "
                             f"steps per stage, options or corpus); run without --resume to start over")
        record = dict(meta["record"])
        if meta.get("done"):
            record["metrics"] = meta["metrics"]
        return Saved(params, state, meta["metrics"], record, float(meta.get("seconds", 0.0)),
                     float(meta.get("cpu_seconds", 0.0)), bool(meta.get("done")))

    def save(self, stage, g, params, state, metrics, record, spent, done, new_run):
        """Checkpoint model g of the stage (params, optimizer state, metrics, the record so far)."""
        path = self.path(stage, g)
        meta = {"step": int(state["t"]), "train": dataclasses.asdict(stage.train_config(g)), "metrics": metrics,
                "record": {k: v for k, v in record.items() if k != "metrics"}, "done": done,
                "seconds": spent[0], "cpu_seconds": spent[1], "grow_model": self.fingerprint(stage, g)}
        save(path, params, stage.model_cfg, meta, opt_state=state, new_run=new_run)
        if self.on_checkpoint:
            self.on_checkpoint(path, int(state["t"]), stage.steps)


def _plain(obj):
    """A JSON round trip (tuples become lists), so fingerprints compare as they are saved."""
    return json.loads(json.dumps(obj, sort_keys=True))


def train_model(stage, g, params, tokens, record, trainable=None, loss_fn=None, children=None, log=print,
                progress=None, saved=None):
    """Train model g of a stage in place: all of it (a leaf), or only the `trainable` entries (a merged
    parent, with `loss_fn` its frozen loss). Fills the record with time, FLOPs, metrics and, for a merged
    parent, whether its `children` are still bit for bit what they were.

    With `progress`, the model is checkpointed at every evaluation, at Ctrl-C and when done; `saved` (an
    unfinished checkpoint of an earlier run, already in params) is continued from its step."""
    model_cfg, tc_g = stage.model_cfg, stage.train_config(g)
    if loss_fn is not None:           # a merged parent trains one loss, its own
        tc_g = one_model_settings(tc_g)
    state, metrics = (saved.state, saved.metrics) if saved else (None, None)
    before = (saved.seconds, saved.cpu_seconds) if saved else (0.0, 0.0)
    wall, cpu = time.perf_counter(), time.process_time()

    def spent():
        return before[0] + time.perf_counter() - wall, before[1] + time.process_time() - cpu

    first = [saved is None]       # the first save of a model trained afresh drops an earlier run's steps

    def checkpoint(step, metrics, state):
        if progress is not None and state["t"] > 0:
            progress.save(stage, g, params, state, metrics, record, spent(), False, first[0])
            first[0] = False

    if saved:
        log(stage.prefix(g) + f"--resume: continuing at step {state['t']} of {stage.steps}")
    state, metrics = train(params, model_cfg, tc_g, *tokens, state=state, metrics=metrics, trainable=trainable,
                           loss_fn=loss_fn, log=lambda msg: log(stage.prefix(g) + msg), on_eval=checkpoint,
                           on_interrupt=checkpoint)
    record["seconds"], record["cpu_seconds"] = spent()
    record["train_flops"] = record["step_flops"] * stage.steps
    record["metrics"] = metrics
    record["final_val"] = {k: v[-1] for k, v in metrics["val"].items()}
    if children is not None:
        record["children_unchanged"] = all(same_arrays(extract(params, model_cfg, 1, r), child)
                                           for r, child in enumerate(children))
    if progress is not None:
        progress.save(stage, g, params, state, metrics, record, (record["seconds"], record["cpu_seconds"]), True,
                      first[0])
    return record


def resumed(stage, g, saved, log):
    """Log that model g of the stage is loaded from a finished checkpoint; return its params and record."""
    log(stage.prefix(g) + f"--resume: trained in the run before ({stage.steps} steps), loaded")
    return saved.params, saved.record


def train_leaves(stage, chunks, log=print, on_stage=None, progress=None):
    """Stage 0: every leaf of the final tree trained alone, from its own init, on its own chunk.
    Returns (the leaf models' params, their records)."""
    models, records = [], []
    for g in range(stage.cfg.n_models(stage.level)):
        train_tokens, val_tokens, record = stage.data(chunks, g)
        saved = progress.load(stage, g) if progress else None
        if saved is not None and saved.done:
            params, record = resumed(stage, g, saved, log)
        else:
            params = saved.params if saved else init_params(stage.model_cfg, stage.train_config(g).seed)
            record = saved.record if saved else record
            train_model(stage, g, params, (train_tokens, val_tokens), record, log=log, progress=progress, saved=saved)
        records.append(record)
        models.append(params)
        if on_stage:
            on_stage(stage.t, record, params, stage.model_cfg)
    return models, records


def merge_children(stage, g, children, val_tokens, record, off_diagonal, scale, log=print):
    """Merge the `split` models of the stage below into parent g, and check the merge: every child gives its
    standalone logits inside the parent (max abs diff), and the val loss of every node at the moment of
    merging. Returns (the parent's params, its mask of new entries)."""
    cfg, level, model_cfg, s = stage.cfg, stage.level, stage.model_cfg, stage.cfg.split
    params, merged_cfg = merge(children, cfg.sub(level + 1), s, off_diagonal, scale, seed=stage.train_config(g).seed)
    if merged_cfg != model_cfg:   # internal invariant: merging s models of sub(l+1) gives sub(l)
        raise RuntimeError(f"merge produced {merged_cfg}, expected {model_cfg}")
    ids, _ = batch_at(val_tokens, 4, cfg.context, 4321, 0)
    record["logit_max_abs_diff"] = logit_diffs(params, model_cfg, children, cfg.sub(level + 1), ids)
    at_merge = evaluate(params, model_cfg, val_tokens, stage.tc.batch_size, stage.tc.eval_batches)
    record["val_at_merge"] = {node_key(n): v for n, v in at_merge.items()}
    trainable = trainable_mask(params, model_cfg)
    record["new_entries"] = int(sum(m.sum() for m in trainable.values()))
    log(stage.prefix(g) + f"merged {[f'({level + 1},{g * s + r})' for r in range(s)]}: children's logits "
        f"max abs diff {max(record['logit_max_abs_diff'])}; val at merge: parent "
        f"{at_merge[(0, 0)]:.4f}, children " + ", ".join(f"{at_merge[(1, r)]:.4f}" for r in range(s)))
    return params, trainable


def merge_stage(stage, chunks, below, off_diagonal, scale, log=print, on_stage=None, on_merge=None, progress=None):
    """Stage t > 0: each group of `split` models of the stage below merged into its parent, the children
    frozen, and only the new off-diagonal blocks trained on the union of the children's chunks.
    Returns (the parents' params, their records)."""
    s = stage.cfg.split
    models, records = [], []
    for g in range(stage.cfg.n_models(stage.level)):
        train_tokens, val_tokens, record = stage.data(chunks, g)
        children = below[g * s:(g + 1) * s]
        saved = progress.load(stage, g) if progress else None
        if saved is None:
            params, trainable = merge_children(stage, g, children, val_tokens, record, off_diagonal, scale, log)
        else:                     # merged in the run before: the checkpoint holds the merge and its checks
            params, record = saved.params, saved.record
            trainable = trainable_mask(params, stage.model_cfg)
        if on_merge:
            on_merge(stage.t, record, params, stage.model_cfg)
        if saved is not None and saved.done:
            params, record = resumed(stage, g, saved, log)
        else:
            train_model(stage, g, params, (train_tokens, val_tokens), record, trainable, root_loss, children, log,
                        progress, saved)
        records.append(record)
        models.append(params)
        if on_stage:
            on_stage(stage.t, record, params, stage.model_cfg)
    return models, records


def grow(cfg, tc, steps, tokens=None, off_diagonal="zero", scale=0.1, out=None, log=print, on_stage=None,
         on_merge=None, resume=False, on_checkpoint=None):
    """Build a model of config `cfg` by growing (see the module docstring). Returns (params, stages).

    stages[t] describes stage t (0 = the leaves), one record per model it trained: its node in the
    final tree, its chunks, the step count, FLOPs and seconds, its training metrics and, for merged
    models, the check that every child still gives its standalone logits (max abs diff, 0.0 when
    exact), the per-node val losses at the moment of merging, and whether the children are still
    bit for bit what they were after the training. With `out`, each stage is written to
    out/stage{t}.json as it ends and the final model to `out` with checkpoint.save, and every model
    is checkpointed as it trains in out/growing/; `resume` continues an interrupted growth from
    there (the same arrays and records as a growth never stopped, but for the seconds it took).
    `on_stage(t, record, params, cfg_t)` is called after each model of each stage is trained (or
    loaded, resuming), `on_merge(t, record, params, cfg_t)` after each merge, before its training,
    and `on_checkpoint(path, step, steps)` after each checkpoint.
    """
    check_growable(cfg)
    if off_diagonal not in OFF_DIAGONAL:
        raise ValueError(f"off_diagonal must be one of {OFF_DIAGONAL}, got {off_diagonal!r}")
    if resume and out is None:
        raise ValueError("resuming a growth needs the folder it was saved in (out)")
    counts = stage_steps(steps, cfg.levels)
    tokens = corpus_tokens(cfg) if tokens is None else tokens
    chunks = chunk_data(tokens, cfg.split ** (cfg.levels - 1), cfg.context)
    progress = None if out is None else Progress(out, cfg, tc, counts, off_diagonal, scale, tokens, resume,
                                                 on_checkpoint)
    models, stages = [], []
    for t in range(cfg.levels):
        stage = Stage(cfg, tc, t, counts[t])
        log(f"== stage {t + 1}/{cfg.levels}: {cfg.n_models(stage.level)} model(s) of width {stage.model_cfg.hidden}, "
            f"levels {stage.model_cfg.levels}, {counts[t]} steps each")
        if t == 0:
            models, records = train_leaves(stage, chunks, log, on_stage, progress)
        else:
            models, records = merge_stage(stage, chunks, models, off_diagonal, scale, log, on_stage, on_merge,
                                          progress)
        stages.append(records)
        if out is not None:
            write_stage(out, stage, records)
    if out is not None:
        save_grown(out, models[0], cfg, tc, counts, off_diagonal, scale, stages, log)
    return models[0], stages


def write_stage(out, stage, records):
    """out/stage{t}.json: the stage's config, settings and one record per model."""
    atomic_write_json(f"{out}/stage{stage.t}.json", {
        "stage": stage.t, "level": stage.level, "config": stage.model_cfg.to_dict(),
        "train": dataclasses.asdict(dataclasses.replace(stage.tc, steps=stage.steps)), "models": records})


def save_grown(out, params, cfg, tc, counts, off_diagonal, scale, stages, log=print):
    """The grown model as a checkpoint in `out`, with how it was grown in its meta."""
    save(out, params, cfg, {"grow": {"steps_per_stage": counts, "off_diagonal": off_diagonal, "scale": scale,
                                     "train": dataclasses.asdict(tc), "final_val": stages[-1][0]["final_val"],
                                     "train_flops": sum(r["train_flops"] for st in stages for r in st)}})
    log(f"saved the grown model to {out} (stage metrics in {out}/stage0.json .. stage{cfg.levels - 1}.json)")


def arguments(p):
    """The arguments of `python -m tinyfractal grow` (cli.py's command table names this function)."""
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True, help="folder for the final checkpoint and stage{t}.json metrics")
    p.add_argument("--steps-per-stage", default=None,
                   help="N for every stage, or N0,N1,... leaves first (default: the preset's train steps)")
    p.add_argument("--off-diagonal", default="zero", help=f"new blocks start as {' or '.join(OFF_DIAGONAL)}")
    p.add_argument("--scale", type=float, default=0.1, help="random off-diagonals: fraction of the usual init")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted growth from the checkpoints in --out (the same options)")
    p.set_defaults(run=run_grow, overrides=True)


def parse_steps(text, levels):
    """'300' or '400,300,200' -> [counts per stage]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--steps-per-stage must be an integer or comma-separated integers, got {text!r}") from None
    return stage_steps(values[0] if len(values) == 1 else values, levels)


def run_grow(args, extra):
    from tinyfractal.cli_args import parse_overrides, split_overrides
    from tinyfractal.config import Config
    model_over, train_over = split_overrides(parse_overrides(extra), ("model", Config), ("training", TrainConfig))
    cfg = Config.preset(args.preset).override(**model_over)
    tc = TrainConfig.preset(args.preset).override(**train_over)
    steps = parse_steps(args.steps_per_stage, cfg.levels) if args.steps_per_stage else tc.steps
    if args.off_diagonal not in OFF_DIAGONAL:
        raise ValueError(f"--off-diagonal must be one of {', '.join(OFF_DIAGONAL)}, got {args.off_diagonal!r}")
    check_growable(cfg)
    print(f"growing {cfg}\nwith {tc}\nsteps per stage (leaves first): {stage_steps(steps, cfg.levels)}")
    _, stages = grow(cfg, tc, steps, off_diagonal=args.off_diagonal, scale=args.scale, out=args.out,
                     resume=args.resume)
    print(f"{'stage':>5} {'node':>7} {'val at merge':>12} {'final val':>9}  children unchanged")
    for t, records in enumerate(stages):
        for r in records:
            at = r.get("val_at_merge", {}).get("0.0")
            print(f"{t:5d} {'(' + ','.join(map(str, r['node'])) + ')':>7} "
                  f"{'-' if at is None else f'{at:.4f}':>12} {r['final_val']['0.0']:9.4f}  "
                  f"{r.get('children_unchanged', '-')}")
    return 0
