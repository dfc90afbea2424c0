"""Training: AdamW over the shared arrays, every node's loss at once, progress, evaluation.

One optimizer step updates one set of arrays; because every sub-model is a view of them, one step
trains the whole tree.
"""
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as onp
from autograd import value_and_grad

from tinyfractal.api import node_losses, tree_loss
from tinyfractal.training.data import batch_at
from tinyfractal.variants import variant_of
from tinyfractal.core.tree import NO_DECAY, flatten, nodes, unflatten


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's shape is in Config)."""
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 25
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"train setting {name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"train setting warmup must be an integer >= 0, got {self.warmup!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"train setting {name} must be a number >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"train setting {name} must be in [0, 1), got {v!r}")

    @staticmethod
    def preset(name):
        """Training settings that go with a model preset."""
        if name == "original":
            return TrainConfig(steps=5000, batch_size=12, lr=3e-4, min_lr=3e-4, warmup=0, weight_decay=0.01)
        return TrainConfig()

    def override(self, **changes):
        fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        out = {}
        for k, v in changes.items():
            if k not in fields:
                raise ValueError(f"unknown train setting {k!r}; known settings are {sorted(fields)}")
            want = int if fields[k] in (int, "int") else float
            try:
                out[k] = want(v)
            except (TypeError, ValueError):
                raise ValueError(f"train setting {k} must be {want.__name__}, got {v!r}") from None
        return dataclasses.replace(self, **out)


def lr_at(tc, step):
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw_init(params):
    """Optimizer state: first and second moments per flat name, and the step count."""
    flat = flatten(params)
    return {"m": {k: onp.zeros_like(v) for k, v in flat.items()},
            "v": {k: onp.zeros_like(v) for k, v in flat.items()}, "t": 0}


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients down together if their global L2 norm exceeds max_norm; returns the norm."""
    norm = math.sqrt(sum(float(onp.vdot(g, g)) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        scale = onp.float32(max_norm / (norm + 1e-6))
        for g in grads.values():
            g *= scale
    return norm


def adamw_step(params, grads, state, lr, tc, trainable=None):
    """One AdamW update, in place, with bias correction; no weight decay on gains and biases.

    `trainable` (flat name -> bool array, or None) freezes entries: a frozen entry's value and its
    moment estimates are never touched, so frozen sub-models stay bit for bit as they were.
    """
    flat, flat_g = flatten(params), flatten(grads)
    state["t"] += 1
    t = state["t"]
    b1, b2 = tc.beta1, tc.beta2
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    f32 = onp.float32
    for name, p in flat.items():
        g, m, v = flat_g[name], state["m"][name], state["v"][name]
        decay = 0.0 if name.split(".")[-1] in NO_DECAY else tc.weight_decay
        mask = None if trainable is None else trainable.get(name)
        if mask is None:
            m *= f32(b1); m += f32(1 - b1) * g
            v *= f32(b2); v += f32(1 - b2) * (g * g)
            update = (m / f32(c1)) / (onp.sqrt(v / f32(c2)) + f32(1e-8)) + f32(decay) * p
            p -= f32(lr) * update
        elif mask.any():
            gm = g[mask]
            m[mask] = f32(b1) * m[mask] + f32(1 - b1) * gm
            v[mask] = f32(b2) * v[mask] + f32(1 - b2) * gm * gm
            update = (m[mask] / f32(c1)) / (onp.sqrt(v[mask] / f32(c2)) + f32(1e-8)) + f32(decay) * p[mask]
            p[mask] -= f32(lr) * update


def evaluate(params, cfg, tokens, batch_size, batches, seed=1234, level_losses=None):
    """Per-node mean loss over fixed batches of a split: {(level, index): loss}."""
    level_losses = level_losses or node_losses
    sums = {node: 0.0 for node in nodes(cfg)}
    for b in range(batches):
        ids, targets = batch_at(tokens, batch_size, cfg.context, seed, b)
        for level, losses in enumerate(level_losses(params, cfg, ids, targets)):
            for j, value in enumerate(onp.asarray(losses)):
                sums[(level, j)] += float(value) / batches
    return sums


def node_key(node):
    return f"{node[0]}.{node[1]}"


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train(params, cfg, tc, train_tokens, val_tokens, state=None, metrics=None, level_weights=None,
          trainable=None, loss_fn=None, level_losses=None, log=print, on_eval=None, until=None):
    """Train in place up to step tc.steps, or `until` if given (continuing from state['t'] if resuming).

    Returns (state, metrics). metrics holds the per-node train/val loss history at every eval.
    `loss_fn(params, cfg, ids, targets, rng)` and `level_losses` let variants swap the model.
    """
    loss_fn = loss_fn or (lambda p, c, i, t, rng: tree_loss(p, c, i, t, level_weights, rng))
    value_grad = value_and_grad(loss_fn)
    state = state or adamw_init(params)
    metrics = metrics or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
    start = state["t"]
    tokens_per_step = tc.batch_size * cfg.context
    t0, done = time.perf_counter(), 0
    for step in range(start, tc.steps if until is None else min(until, tc.steps)):
        ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, step)
        rng = onp.random.default_rng([tc.seed, step, 1]) if cfg.dropout > 0 else None
        loss, grads = value_grad(params, cfg, ids, targets, rng)
        flat_g = flatten(grads)
        if trainable is not None:   # frozen entries must not count towards the clipping norm
            for name, mask in trainable.items():
                flat_g[name] = onp.where(mask, flat_g[name], onp.float32(0))
        gnorm = clip_by_global_norm(flat_g, tc.grad_clip)
        adamw_step(params, unflatten(flat_g), state, lr_at(tc, step), tc, trainable)
        done += 1
        metrics["step"].append(step + 1)
        metrics["loss"].append(float(loss))
        last = step + 1 == tc.steps or step + 1 == until
        if (step + 1) % tc.log_interval == 0 or last or step == start:
            elapsed = time.perf_counter() - t0
            rate = done * tokens_per_step / elapsed
            left = (tc.steps - step - 1) * elapsed / done
            log(f"step {step + 1:5d}/{tc.steps}  loss {float(loss):.4f}  |g| {gnorm:6.2f}  "
                f"{rate:8.0f} tok/s  left {format_duration(left)}")
        if (step + 1) % tc.eval_interval == 0 or last:
            record_eval(params, cfg, tc, train_tokens, val_tokens, metrics, step + 1, level_losses)
            if on_eval:
                on_eval(step + 1, metrics, state)
    return state, metrics


def record_eval(params, cfg, tc, train_tokens, val_tokens, metrics, step, level_losses=None):
    """Append per-node train and val losses at this step to metrics."""
    metrics["eval_step"].append(step)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        losses = evaluate(params, cfg, tokens, tc.batch_size, tc.eval_batches, level_losses=level_losses)
        for node, value in losses.items():
            metrics[split].setdefault(node_key(node), []).append(value)


def loss_table(metrics, cfg, reference=None):
    """The per-node train/val table of the latest eval, as text lines."""
    lines = [f"{'node':>8} {'width':>6} {'train':>8} {'val':>8}" + ("  val - unigram" if reference else "")]
    for level, j in nodes(cfg):
        key = node_key((level, j))
        tr, va = metrics["train"][key][-1], metrics["val"][key][-1]
        extra = f"  {va - reference:+.3f}" if reference else ""
        lines.append(f"{'(' + str(level) + ',' + str(j) + ')':>8} {cfg.width(level):6d} {tr:8.4f} {va:8.4f}{extra}")
    return lines


def save_run(out, params, cfg, tc, state, metrics, extra=None):
    """Checkpoint (with optimizer state) plus metrics.json in `out`."""
    from tinyfractal.training.checkpoint import atomic_write_json, save
    meta = {"step": int(state["t"]), "train": dataclasses.asdict(tc), "metrics": metrics, **(extra or {})}
    save(out, params, cfg, meta, opt_state=state)
    atomic_write_json(f"{out}/metrics.json", {"config": cfg.to_dict(), **metrics})


def fit(cfg, tc, out=None, resume=False, log=print, tokenizer=None, level_weights=None):
    """The whole job: data, init (or resume from `out`), train, save. Returns (params, state, metrics, data).

    Resuming restores params, optimizer moments and the step; batches are seeded per step, so the
    continued run matches an uninterrupted one bit for bit.
    """
    from tinyfractal.training.checkpoint import load, load_optimizer
    from tinyfractal.training.data import load_tokens, train_val_split
    from tinyfractal.core.model import init_params
    variant = variant_of(cfg)
    tokenizer = tokenizer or variant.tokenizer(cfg)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size is {cfg.vocab_size}")
    train_tokens, val_tokens = (variant.training_rows(cfg, part) for part in train_val_split(load_tokens(tokenizer)))
    if resume:
        params, saved_cfg, meta = load(out)
        if saved_cfg != cfg:
            raise ValueError(f"cannot resume: the checkpoint's config {saved_cfg} differs from {cfg}")
        state = load_optimizer(out)
        if state is None:
            raise ValueError(f"cannot resume from {out}: it was saved without optimizer state")
        metrics = meta.get("metrics")
        log(f"resuming from {out} at step {state['t']}")
    else:
        params, state, metrics = init_params(cfg, tc.seed), None, None
    def checkpoint(step, metrics, state):
        """Save at every evaluation, so an interrupted run can be resumed from the last one."""
        if out is not None:
            save_run(out, params, cfg, tc, state, metrics)
    state, metrics = train(params, cfg, tc, train_tokens, val_tokens, state, metrics, level_weights, log=log,
                           on_eval=checkpoint)
    return params, state, metrics, (train_tokens, val_tokens)
