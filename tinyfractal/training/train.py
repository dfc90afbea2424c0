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

from tinyfractal.variants import byte_model as concepts
from tinyfractal.variants import coupled as coupling
from tinyfractal.core import fast
from tinyfractal.training.data import batch_at
from tinyfractal.core.model import level_weight_table
from tinyfractal.core.tree import NO_DECAY, flatten, map_roles, nodes, unflatten, view


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
    loss_weights: str = "nodes"   # weight of each node's loss: nodes | width | params | "1,0.5,0.25" | "A>B" (anneal)
    clip_mode: str = "global"     # global: clip at grad_clip | tree: at grad_clip * sqrt(sum of squared node weights)
    width_lr: float = 0.0         # matrices: lr * (D / width of the entry's deepest owner) ** width_lr

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
        parse_loss_weights(self.loss_weights)
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"train setting clip_mode must be one of {list(CLIP_MODES)}, got {self.clip_mode!r}")
        v = self.width_lr
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 2:
            raise ValueError(f"train setting width_lr must be a number in [0, 2], got {v!r}")

    @staticmethod
    def preset(name):
        """Training settings that go with a model preset."""
        if name == "original":
            return TrainConfig(steps=5000, batch_size=12, lr=3e-4, min_lr=3e-4, warmup=0, weight_decay=0.01)
        return TrainConfig()

    def faithful(self):
        """These settings with the prototype's exact training for every option of the nesting-tax study
        (FAITHFUL_TRAIN: plain mean over nodes, global clipping, one lr for every entry)."""
        return dataclasses.replace(self, **FAITHFUL_TRAIN)

    def override(self, **changes):
        fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        out = {}
        for k, v in changes.items():
            if k not in fields:
                raise ValueError(f"unknown train setting {k!r}; known settings are {sorted(fields)}")
            want = int if fields[k] in (int, "int") else str if fields[k] in (str, "str") else float
            try:
                out[k] = want(v)
            except (TypeError, ValueError):
                raise ValueError(f"train setting {k} must be {want.__name__}, got {v!r}") from None
        return dataclasses.replace(self, **out)


FAITHFUL_TRAIN = dict(loss_weights="nodes", clip_mode="global", width_lr=0.0)
CLIP_MODES = ("global", "tree")
WEIGHT_SCHEMES = ("nodes", "width", "params")


def parse_loss_weights(text):
    """'nodes' -> [('nodes',)]; '1,0.5' -> [(1.0, 0.5)]; 'width>nodes' -> two ends of an anneal. Checks syntax."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"train setting loss_weights must be a string, got {text!r}")
    ends = text.split(">")
    if len(ends) > 2:
        raise ValueError(f"loss_weights anneals between two ends 'A>B', got {text!r}")
    out = []
    for end in ends:
        if end in WEIGHT_SCHEMES:
            out.append((end,))
            continue
        try:
            numbers = tuple(float(w) for w in end.split(","))
        except ValueError:
            raise ValueError(f"loss_weights must be one of {list(WEIGHT_SCHEMES)}, comma-separated numbers per level "
                             f"(such as 1,0.5,0.25), or 'A>B' to anneal from A to B; got {text!r}") from None
        if any(not w >= 0 for w in numbers) or not sum(numbers) > 0:
            raise ValueError(f"loss_weights numbers must be >= 0 and not all zero, got {text!r}")
        out.append(numbers)
    return out


def scheme_weights(cfg, end):
    """The weight of one node at each level (before normalising) for one end of loss_weights.

    nodes: every node alike (the tree loss is the plain mean over nodes);
    width: a node weighs its width d_l, so every level weighs the same in total (n_l * d_l = D);
    params: a node weighs its parameter count, so the root weighs most.
    """
    if end == ("nodes",):
        return [1.0] * cfg.levels
    if end == ("width",):
        return [float(cfg.width(level)) for level in range(cfg.levels)]
    if end == ("params",):
        from tinyfractal.core.model import count_params, param_shapes
        return [float(count_params(map_roles(lambda shape, roles: onp.empty(shape, onp.float32),
                                             param_shapes(cfg.sub(level))))) for level in range(cfg.levels)]
    if len(end) != cfg.levels:
        raise ValueError(f"loss_weights gives {len(end)} numbers but the tree has {cfg.levels} levels")
    return list(end)


def level_weights_at(tc, cfg, step):
    """Per-level node weights at this step (normalised: sum over nodes is 1), from tc.loss_weights.

    'A>B' moves linearly from A's normalised weights at step 0 to B's at the last step.
    """
    ends = [level_weight_table(cfg, scheme_weights(cfg, end)) for end in parse_loss_weights(tc.loss_weights)]
    if len(ends) == 1:
        return ends[0]
    a = min(1.0, step / max(1, tc.steps - 1))
    return [(1 - a) * x + a * y for x, y in zip(*ends)]


def clip_threshold(tc, cfg, weights):
    """The clipping threshold: grad_clip, or with clip_mode='tree' grad_clip * sqrt(sum over nodes of w^2).

    The tree's gradient is the weighted mean of the nodes' gradients. If those were orthogonal and of one
    size G, its norm would be G * sqrt(sum w^2) (1/sqrt(7) for 7 equal nodes), so 'tree' clips the tree
    when its nodes would each be clipped on their own, as a standalone model is.
    """
    if tc.clip_mode == "global":
        return tc.grad_clip
    return tc.grad_clip * math.sqrt(sum(cfg.n_models(level) * w * w for level, w in enumerate(weights)))


MATRICES = ("Wq", "Wk", "Wv", "Wo", "Wgate", "Wup", "Wdown")


def width_lr_scales(params, cfg, power):
    """Flat name -> per-entry lr factor (D / d_owner) ** power for the shared matrices, where d_owner is the
    width of the deepest node whose block holds the entry; None when power is 0.

    In the spirit of muP (Adam's lr for a hidden matrix ~ 1/width): a leaf's block moves as fast as
    its own width asks, the root's off-diagonal blocks as the root's. A one-level model gets 1 everywhere.
    """
    if power == 0:
        return None
    scales = map_roles(lambda a, roles: onp.ones(onp.shape(a), onp.float32), params)
    for level, j in nodes(cfg):
        factor = onp.float32((cfg.hidden / cfg.width(level)) ** power)
        for layer in view(scales, cfg, level, j)["layers"]:
            for name in MATRICES:
                layer[name][...] = factor
    return {name: a for name, a in flatten(scales).items() if name.split(".")[-1] in MATRICES}


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


def adamw_step(params, grads, state, lr, tc, trainable=None, lr_scales=None):
    """One AdamW update, in place, with bias correction; no weight decay on gains and biases.

    `trainable` (flat name -> bool array, or None) freezes entries: a frozen entry's value and its
    moment estimates are never touched, so frozen sub-models stay bit for bit as they were.
    `lr_scales` (flat name -> float32 array, or None) multiplies the step of each entry (width_lr_scales).
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
        scale = None if lr_scales is None else lr_scales.get(name)
        if mask is None:
            m *= f32(b1); m += f32(1 - b1) * g
            v *= f32(b2); v += f32(1 - b2) * (g * g)
            update = (m / f32(c1)) / (onp.sqrt(v / f32(c2)) + f32(1e-8)) + f32(decay) * p
            p -= f32(lr) * update if scale is None else (f32(lr) * scale) * update
        elif mask.any():
            gm = g[mask]
            m[mask] = f32(b1) * m[mask] + f32(1 - b1) * gm
            v[mask] = f32(b2) * v[mask] + f32(1 - b2) * gm * gm
            update = (m[mask] / f32(c1)) / (onp.sqrt(v[mask] / f32(c2)) + f32(1e-8)) + f32(decay) * p[mask]
            p[mask] -= f32(lr) * update if scale is None else (f32(lr) * scale[mask]) * update


def variant(cfg):
    """The module that computes this config's losses: coupled trees (coupling.py), byte models
    (concepts.py), or the base model's level-batched fast path (fast.py)."""
    if cfg.coupling != "none":
        return coupling
    return concepts if cfg.tokenizer == "bytes" else fast


def tree_loss(params, cfg, ids, targets, level_weights=None, rng=None):
    """Mean next-token loss over every node of the tree, for any config (base, coupled or bytes)."""
    return variant(cfg).tree_loss(params, cfg, ids, targets, level_weights, rng)


def node_losses(params, cfg, ids, targets, rng=None):
    """Per-level arrays of per-node losses, for any config."""
    return variant(cfg).node_losses(params, cfg, ids, targets, rng)


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
    if loss_fn is not None and (tc.loss_weights != "nodes" or tc.clip_mode != "global"):
        raise ValueError(f"loss_weights={tc.loss_weights!r} and clip_mode={tc.clip_mode!r} weigh the tree loss, "
                         f"but this run trains its own loss_fn; use loss_weights='nodes', clip_mode='global'")
    weights_now = [None]   # the level weights of the current step, read by the loss (they may anneal)
    loss_fn = loss_fn or (lambda p, c, i, t, rng: tree_loss(p, c, i, t, weights_now[0], rng))
    value_grad = value_and_grad(loss_fn)
    lr_scales = width_lr_scales(params, cfg, tc.width_lr)
    state = state or adamw_init(params)
    metrics = metrics or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
    start = state["t"]
    tokens_per_step = tc.batch_size * cfg.context
    t0, done = time.perf_counter(), 0
    for step in range(start, tc.steps if until is None else min(until, tc.steps)):
        ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, step)
        rng = onp.random.default_rng([tc.seed, step, 1]) if cfg.dropout > 0 else None
        weights_now[0] = level_weights if level_weights is not None or tc.loss_weights == "nodes" else \
            level_weights_at(tc, cfg, step)
        loss, grads = value_grad(params, cfg, ids, targets, rng)
        flat_g = flatten(grads)
        if trainable is not None:   # frozen entries must not count towards the clipping norm
            for name, mask in trainable.items():
                flat_g[name] = onp.where(mask, flat_g[name], onp.float32(0))
        threshold = tc.grad_clip if tc.clip_mode == "global" else \
            clip_threshold(tc, cfg, level_weight_table(cfg, weights_now[0]))
        gnorm = clip_by_global_norm(flat_g, threshold)
        adamw_step(params, unflatten(flat_g), state, lr_at(tc, step), tc, trainable, lr_scales)
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
    from tinyfractal.text.bpe import Tokenizer
    tokenizer = tokenizer or (concepts.ByteTokenizer() if cfg.tokenizer == "bytes" else Tokenizer.default())
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size is {cfg.vocab_size}")
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    if cfg.tokenizer == "bytes":   # rows of g_0 bytes, one top-level group each (concepts.py)
        train_tokens, val_tokens = concepts.group_rows(train_tokens, cfg), concepts.group_rows(val_tokens, cfg)
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
