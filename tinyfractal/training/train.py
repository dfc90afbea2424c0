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

from tinyfractal.api import level_weight_table, node_losses, tree_loss
from tinyfractal.core import machinery
from tinyfractal.training.data import batch_at
from tinyfractal.variants import variant_of
from tinyfractal.core.tree import NO_DECAY, flatten, map_roles, nodes, view
from tinyfractal.validate import check_memory


INT_SETTINGS = ("steps", "batch_size", "eval_interval", "eval_batches", "log_interval", "warmup", "seed", "lr_width")
STR_SETTINGS = ("loss_weights", "clip_mode")
MAX_STEPS = 10 ** 9   # far beyond any run on a CPU; a typo like --steps=1e12 is refused


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's shape is in Config). Every value is checked when it is made."""
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
    loss_weights: str = "sqrtwidth>nodes"   # each node's loss weight: nodes | width | sqrtwidth | params | "1,0.5" | "A>B" (anneal)
    clip_mode: str = "tree"       # global: clip at grad_clip | tree: at grad_clip * sqrt(sum of squared node weights)
    width_lr: float = 1.0         # matrices: lr * (D / width of the entry's deepest owner) ** width_lr
    lr_width: int = 0             # the D of width_lr: 0 means the model's own width (a twin uses its tree's)

    def __post_init__(self):
        for name in INT_SETTINGS:
            v = getattr(self, name)
            low, high = (0, 2 ** 53 - 1) if name == "seed" else (0 if name in ("warmup", "lr_width") else 1, MAX_STEPS)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(f"train setting {name} must be an integer in [{low}, {high}], got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"train setting {name} must be a finite number >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"train setting {name} must be in [0, 1), got {v!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"train setting min_lr={self.min_lr:g} must be <= lr={self.lr:g}: the schedule decays "
                             f"from lr to min_lr (give --min_lr too when lowering --lr)")
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
        """A copy with some settings changed; strings are parsed, and the result is validated."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        out = {}
        for k, v in changes.items():
            if k not in names:
                raise ValueError(f"unknown train setting {k!r}; known settings are {sorted(names)}")
            out[k] = _parse_setting(k, v)
        return dataclasses.replace(self, **out)

    def to_dict(self):
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d):
        """Rebuild from `to_dict()` output (as saved in a checkpoint's meta), refusing unknown or
        missing settings. A run saved before the nesting-tax options existed trained with the
        prototype's choices, so those (FAITHFUL_TRAIN) fill in for them."""
        if not isinstance(d, dict):
            raise ValueError(f"training settings must be a JSON object, got {type(d).__name__}")
        d = {**FAITHFUL_TRAIN, **d}
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(f"training settings do not match TrainConfig: unknown {unknown}, missing {missing}")
        return TrainConfig(**d)


def _parse_setting(name, v):
    """A training setting from a string or number: ints must be whole, floats any finite number."""
    if name in STR_SETTINGS:
        if not isinstance(v, str):
            raise ValueError(f"train setting {name} must be a string, got {v!r}")
        return v
    want = int if name in INT_SETTINGS else float
    if isinstance(v, bool):
        raise ValueError(f"train setting {name} must be {want.__name__}, got {v!r}")
    try:
        if want is int and isinstance(v, float):
            if not v.is_integer():
                raise ValueError
            return int(v)
        return want(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"train setting {name} must be {'an integer' if want is int else 'a number'}, "
                         f"got {v!r}") from None


def changed_settings(old, new):
    """{name: (old value, new value)} for every training setting that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def describe_changes(changes):
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


FAITHFUL_TRAIN = dict(loss_weights="nodes", clip_mode="global", width_lr=0.0, lr_width=0)


def one_model_settings(tc):
    """Settings for a run of one model's own loss on a tree's arrays (a merged parent, a root trained
    alone): the plain loss, global clipping and one lr. The tree's loss weights, clipping rule and
    width-aware lr follow its nodes, so they mean nothing there (train refuses the first two with a loss_fn)."""
    return dataclasses.replace(tc, loss_weights="nodes", clip_mode="global", width_lr=0.0)
CLIP_MODES = ("global", "tree")
WEIGHT_SCHEMES = ("nodes", "width", "sqrtwidth", "params")


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
    sqrtwidth: a node weighs sqrt(d_l), half way (in log) between nodes and width, for any depth;
    params: a node weighs its parameter count, so the root weighs most.
    """
    if end == ("nodes",):
        return [1.0] * cfg.levels
    if end == ("width",):
        return [float(cfg.width(level)) for level in range(cfg.levels)]
    if end == ("sqrtwidth",):
        return [math.sqrt(cfg.width(level)) for level in range(cfg.levels)]
    if end == ("params",):
        from tinyfractal.api import param_shapes
        from tinyfractal.core.model import count_params
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


def step_level_weights(tc, cfg, step, level_weights=None):
    """The level weights a training step uses: the caller's `level_weights` if given, else None (the plain
    mean) for loss_weights='nodes', else tc.loss_weights at this step (level_weights_at). Both engines call it."""
    if level_weights is not None or tc.loss_weights == "nodes":
        return level_weights
    return level_weights_at(tc, cfg, step)


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


def width_lr_scales(params, cfg, power, lr_width=0):
    """Flat name -> per-entry lr factor (D / d_owner) ** power for the shared matrices, where d_owner is the
    width of the deepest node whose block holds the entry and D is lr_width, or the model's own width if
    lr_width is 0; None when every factor is 1 (power 0, or a one-level model of its own width), so the
    optimizer skips the multiplication.

    In the spirit of muP (Adam's lr for a hidden matrix ~ 1/width): a leaf's block moves as fast as
    its own width asks, the root's off-diagonal blocks as the root's. A one-level model gets 1 everywhere,
    unless lr_width names a wider tree: then its matrices move as a node of its width does in that tree.
    """
    if power == 0:
        return None
    if lr_width and lr_width < cfg.hidden:
        raise ValueError(f"train setting lr_width={lr_width} must be 0 or at least the model's width {cfg.hidden}")
    top = lr_width or cfg.hidden
    if cfg.levels == 1 and top == cfg.hidden:
        return None
    scales = map_roles(lambda a, roles: onp.ones(onp.shape(a), onp.float32), params)
    for level, j in nodes(cfg):
        factor = onp.float32((top / cfg.width(level)) ** power)
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


def adamw_step(flat, flat_g, state, lr, tc, trainable=None, lr_scales=None):
    """One AdamW update of the flat name -> array dicts `flat` (in place) from `flat_g`, with bias
    correction; no weight decay on gains and biases.

    `trainable` (flat name -> bool array, or None) is THE way to freeze entries: a frozen entry's value and
    its moment estimates are never touched, so frozen sub-models stay bit for bit as they were (and
    `train` zeroes their gradients before clipping, so they do not count towards its norm).
    `lr_scales` (flat name -> float32 array, or None) multiplies the step of each entry (width_lr_scales).
    """
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


def progress_line(step, steps, loss, gnorm, rate, left):
    """The progress line of a training run (both engines print it): step, loss, gradient norm, tokens/s, time left."""
    return (f"step {step:5d}/{steps}  loss {loss:.4f}  |g| {gnorm:6.2f}  "
            f"{rate:8.0f} tok/s  left {format_duration(left)}")


class Diverged(RuntimeError):
    """Training met a non-finite loss, gradient norm, weight or evaluation loss. Nothing after the last
    good step was applied or saved; the message is one line naming the step and the likely cause."""


def divergence_cause(tc, step, start, loss, gnorm):
    """The likely reason step `step` (1-based) went non-finite, in a few words."""
    lr = lr_at(tc, step - 1)
    if step == start + 1 and not math.isfinite(loss):
        return ("the loss is not finite before this run made any update, so the model itself gives it "
                "(its config, e.g. eps or rope_theta, or the weights it starts from)")
    if math.isfinite(loss):
        return (f"the gradient overflowed at learning rate {lr:.3g}: lower --lr"
                + ("" if tc.grad_clip > 0 else " or set --grad_clip"))
    return f"the learning rate is probably too high ({lr:.3g} at this step, peak lr={tc.lr:g})"


def first_nonfinite(flat):
    """The name of the first array holding nan or inf, or None."""
    for name, a in flat.items():
        if not onp.isfinite(a).all():
            return name
    return None


def train(params, cfg, tc, train_tokens, val_tokens, state=None, metrics=None, level_weights=None,
          trainable=None, loss_fn=None, level_losses=None, log=print, on_eval=None, until=None,
          on_interrupt=None):
    """Train in place up to step tc.steps, or `until` if given (continuing from state['t'] if resuming).

    Returns (state, metrics). metrics holds the per-node train/val loss history at every eval.
    `loss_fn(params, cfg, ids, targets, rng)` and `level_losses` let variants swap the model.

    Divergence guard: a step whose loss or gradient norm is not finite raises Diverged before its
    update is applied, and an evaluation with a non-finite loss raises it before `on_eval` (which
    saves) is called, so what was saved stays the last finite state. We stop rather than skip the
    batch and back off the learning rate: skipping hides the problem, and a run would then depend on
    which batches failed. Lowering the learning rate is the user's explicit, recorded choice when
    resuming (fit's allow_changes).

    Ctrl-C: if the interrupt comes while params, state and metrics agree (during a step's forward
    and backward pass, or between steps; not halfway through an update or an evaluation),
    `on_interrupt(step, metrics, state)` is called first, so the caller can save exactly where the
    run stopped. Then KeyboardInterrupt propagates.
    """
    machinery.tune()      # threads for the fused ops, malloc that keeps freed memory (core/machinery.py)
    check_memory(cfg, tc.batch_size)
    if loss_fn is not None and (tc.loss_weights != "nodes" or tc.clip_mode != "global"):
        raise ValueError(f"loss_weights={tc.loss_weights!r} and clip_mode={tc.clip_mode!r} weigh the tree loss, "
                         f"but this run trains its own loss_fn; use loss_weights='nodes', clip_mode='global' "
                         f"(one_model_settings(tc) gives them)")
    weights_now = [None]   # the level weights of the current step, read by the loss (they may anneal)
    loss_fn = loss_fn or (lambda p, c, i, t, rng: tree_loss(p, c, i, t, weights_now[0], rng))
    value_grad = value_and_grad(loss_fn)
    lr_scales = width_lr_scales(params, cfg, tc.width_lr, tc.lr_width)
    state = state or adamw_init(params)
    metrics = metrics or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
    start = state["t"]
    tokens_per_step = tc.batch_size * cfg.context
    t0, done = time.perf_counter(), 0
    flat_params = flatten(params)   # the same arrays, by flat name: the optimizer updates them in place
    consistent = True
    try:
        for step in range(start, tc.steps if until is None else min(until, tc.steps)):
            ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, step)
            rng = onp.random.default_rng([tc.seed, step, 1]) if cfg.dropout > 0 else None
            weights_now[0] = step_level_weights(tc, cfg, step, level_weights)
            loss, grads = value_grad(params, cfg, ids, targets, rng)
            loss = float(loss)
            flat_g = flatten(grads)     # once per step; flat_params was flattened once, before the loop
            if trainable is not None:   # frozen entries must not count towards the clipping norm
                for name, mask in trainable.items():
                    flat_g[name] = onp.where(mask, flat_g[name], onp.float32(0))
            threshold = clip_threshold(tc, cfg, level_weight_table(cfg, weights_now[0]))
            gnorm = clip_by_global_norm(flat_g, threshold)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise Diverged(f"training diverged at step {step + 1}: loss {loss:.4g}, |g| {gnorm:.4g}; likely "
                               f"cause: {divergence_cause(tc, step + 1, start, loss, gnorm)}")
            consistent = False
            adamw_step(flat_params, flat_g, state, lr_at(tc, step), tc, trainable, lr_scales)
            done += 1
            metrics["step"].append(step + 1)
            metrics["loss"].append(loss)
            last = step + 1 == tc.steps or step + 1 == until
            if (step + 1) % tc.log_interval == 0 or last or step == start:
                elapsed = time.perf_counter() - t0
                rate = done * tokens_per_step / elapsed
                left = (tc.steps - step - 1) * elapsed / done
                log(progress_line(step + 1, tc.steps, loss, gnorm, rate, left))
            if (step + 1) % tc.eval_interval == 0 or last:
                record_eval(params, cfg, tc, train_tokens, val_tokens, metrics, step + 1, level_losses)
                if on_eval:
                    on_eval(step + 1, metrics, state)
            consistent = True
    except KeyboardInterrupt:
        if consistent and on_interrupt is not None:
            on_interrupt(state["t"], metrics, state)
        raise
    return state, metrics


def record_eval(params, cfg, tc, train_tokens, val_tokens, metrics, step, level_losses=None):
    """Append per-node train and val losses at this step to metrics.

    Both splits are computed before anything is appended, so an interrupted evaluation leaves
    metrics as they were; a non-finite loss raises Diverged instead of being recorded.
    """
    results = {split: evaluate(params, cfg, tokens, tc.batch_size, tc.eval_batches, level_losses=level_losses)
               for split, tokens in (("train", train_tokens), ("val", val_tokens))}
    for split, losses in results.items():
        for node, value in losses.items():
            if not math.isfinite(value):
                raise Diverged(f"training diverged by step {step}: the {split} loss of node {node} is {value}; "
                               f"likely cause: {divergence_cause(tc, step, -1, value, 0.0)}")
    metrics["eval_step"].append(step)
    for split, losses in results.items():
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


def default_tokenizer(cfg):
    """The tokenizer a config trains with: its variant's (bytes, or the committed BPE)."""
    return variant_of(cfg).tokenizer(cfg)


def save_run(out, params, cfg, tc, state, metrics, extra=None, tokenizer=None, keep=2, new_run=False,
             level_weights=None):
    """Checkpoint (with optimizer state, settings and tokenizer) plus a copy of the metrics in
    `out`/metrics.json. Weights or moments that are not finite are never saved: Diverged."""
    from tinyfractal.training.checkpoint import atomic_write_json, save
    bad = first_nonfinite(flatten(params)) or first_nonfinite(state["m"]) or first_nonfinite(state["v"])
    if bad is not None:
        raise Diverged(f"training diverged by step {state['t']}: {bad} holds non-finite values; likely cause: "
                       f"{divergence_cause(tc, state['t'], -1, math.nan, math.nan)}")
    meta = {"step": int(state["t"]), "train": tc.to_dict(), "metrics": metrics, **(extra or {})}
    if level_weights is not None:
        meta["level_weights"] = [float(w) for w in level_weights]
    save(out, params, cfg, meta, opt_state=state, tokenizer=tokenizer or default_tokenizer(cfg), keep=keep,
         new_run=new_run)
    atomic_write_json(f"{out}/metrics.json", {"config": cfg.to_dict(), **metrics})


def saved_settings(out):
    """(cfg, tc, level_weights) of the run saved in `out`, read from its meta.json only."""
    from tinyfractal.training.checkpoint import exists, read_meta
    if not exists(out):
        raise ValueError(f"nothing to resume in {out}: it holds no checkpoint (leave out --resume to start a run there)")
    cfg, meta, where = read_meta(out)
    try:
        tc = TrainConfig.from_dict(meta.get("train") if isinstance(meta, dict) else None)
    except ValueError as e:
        raise ValueError(f"checkpoint {str(where)!r} has no usable training settings to resume with: {e}") from None
    return cfg, tc, meta.get("level_weights")


def config_changes(old, new):
    a, b = old.to_dict(), new.to_dict()
    return ", ".join(f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k])


def schedule_summary(tc, step, before):
    """What a change of settings at `step` does to the learning rate, for metrics['changes']."""
    return {"steps": tc.steps, "warmup": tc.warmup, "lr": tc.lr, "min_lr": tc.min_lr,
            "lr_next_step_before": lr_at(before, step), "lr_next_step": lr_at(tc, step)}


def _load_data(cfg, tokenizer):
    """The corpus split 90/10, as the rows the variant trains on (byte models: groups of g_0 bytes)."""
    from tinyfractal.training.data import load_tokens, train_val_split
    variant = variant_of(cfg)
    return tuple(variant.training_rows(cfg, part) for part in train_val_split(load_tokens(tokenizer)))


def _run_summary(out):
    try:
        cfg, tc, _ = saved_settings(out)
        from tinyfractal.training.checkpoint import read_meta
        return f"a run at step {read_meta(out)[1].get('step')} of {tc.steps}"
    except ValueError as e:
        return f"a checkpoint that does not load: {e}"


def fit(cfg, tc, out=None, resume=False, log=print, tokenizer=None, level_weights=None, overwrite=False,
        allow_changes=(), keep=2, trainer=None):
    """The whole job: data, init (or resume from `out`), train, save at every evaluation.

    Returns (params, state, metrics, data); data is None when a finished run was resumed and there
    was nothing to do. `out` is a run folder (checkpoint.py describes its layout), and:
    - it has one owner: it is locked for the whole run (runlock.py), so a second trainer is refused;
    - it is created and checked for writing before anything is trained;
    - a folder that holds a run is refused unless `resume` (continue it) or `overwrite` (start a new
      run there: the old checkpoints stay until the new run's first checkpoint replaces them);
    - `keep` checkpoints stay in it (the newest `keep` evaluations), to roll back to.
    Resume means resume: the params, AdamW moments, step and metrics history come from the
    checkpoint, and `cfg`, `tc` and `level_weights` must equal the saved ones. A difference is refused,
    naming it, unless the setting is named in `allow_changes`: then the change, its step and the new
    learning-rate schedule are appended to metrics['changes']. Batches and dropout masks come from
    generators seeded by (seed, step) (data.batch_at), and the learning rate is a function of the step
    and the saved settings (lr_at), so a run interrupted anywhere and resumed finishes bit for bit
    equal to one never interrupted: params, optimizer state and metrics. Resuming a finished run
    (step >= steps) logs one line and writes nothing. Divergence stops the run (Diverged), naming
    the step, and the checkpoint on disk stays the last finite one.
    `trainer` replaces `train` (same arguments and contract); the JAX engine passes its own.
    """
    machinery.tune()      # here too, so a bad TINYFRACTAL_THREADS is reported before the data is read
    from tinyfractal import runlock
    from tinyfractal.api import level_weight_table
    from tinyfractal.api import init_params
    from tinyfractal.training import checkpoint
    tokenizer = tokenizer or default_tokenizer(cfg)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size is {cfg.vocab_size}")
    level_weight_table(cfg, level_weights)
    weights = None if level_weights is None else [float(w) for w in level_weights]
    if resume and overwrite:
        raise ValueError("resume (continue the run) and overwrite (start a new one) exclude each other")
    if out is None and (resume or overwrite):
        raise ValueError("resume and overwrite need a run folder (out)")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (checkpoints kept in the folder) must be an integer >= 1, got {keep!r}")
    unknown = sorted(set(allow_changes) - set(TrainConfig.__dataclass_fields__) - {"level_weights"})
    if unknown:
        raise ValueError(f"allow_changes names unknown settings {unknown}")
    check_memory(cfg, tc.batch_size)
    if out is None:
        log(f"training {cfg}\nwith {tc}")
        params, data = init_params(cfg, tc.seed), _load_data(cfg, tokenizer)
        state, metrics = (trainer or train)(params, cfg, tc, *data, level_weights=weights, log=log)
        return params, state, metrics, data
    with runlock.hold(out) as held:
        if held.stale is not None:
            log(f"note: {out} was locked by pid {held.stale}, which is no longer running; taking it over")
        has_run = checkpoint.exists(out)
        if has_run and not (resume or overwrite):
            raise ValueError(f"{out} already holds {_run_summary(out)}; give --resume to continue it or "
                             f"--overwrite to start a new run there")
        if resume:
            if not has_run:
                raise ValueError(f"nothing to resume in {out}: it holds no checkpoint (leave out --resume to "
                                 f"start a run there)")
            params, saved_cfg, meta, state, where = checkpoint.load_run(out, tokenizer)
            if state is None:
                raise ValueError(f"cannot resume from {where}: it was saved without optimizer state")
            if saved_cfg != cfg:
                raise ValueError(f"cannot resume {out} with another model: {config_changes(saved_cfg, cfg)}")
            try:
                saved_tc = TrainConfig.from_dict(meta.get("train"))
            except ValueError as e:
                raise ValueError(f"cannot resume {where}: its training settings are unusable ({e})") from None
            changes = changed_settings(saved_tc, tc)
            if meta.get("level_weights") != weights:
                changes["level_weights"] = (meta.get("level_weights"), weights)
            refused = {k: v for k, v in changes.items() if k not in allow_changes}
            if refused:
                hint = ", or --extend-to N to train it to N steps" if "steps" in refused else ""
                raise ValueError(f"cannot resume {out} with changed training settings ({describe_changes(refused)}); "
                                 f"leave them out to continue with the saved ones{hint}, or give --allow-changes "
                                 f"to change them (recorded in the metrics)")
            t = state["t"]
            if tc.steps < t:
                raise ValueError(f"steps={tc.steps} is below step {t}, where the run in {out} already is")
            metrics = meta.get("metrics") or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
            if changes:
                metrics.setdefault("changes", []).append(
                    {"step": t, "changed": {k: list(v) for k, v in changes.items()},
                     "schedule": schedule_summary(tc, t, saved_tc)})
                log(f"changing {describe_changes(changes)} at step {t}; learning rate of the next step "
                    f"{lr_at(saved_tc, t):.3g} -> {lr_at(tc, t):.3g}")
            if t >= tc.steps:
                log(f"{out} is a finished run of {t} steps; nothing to do (give --extend-to N to train it further)")
                return params, state, metrics, None
            log(f"resuming {out} at step {t} of {tc.steps}")
        else:
            params, state, metrics = init_params(cfg, tc.seed), None, None
        log(f"training {cfg}\nwith {tc}")
        data = _load_data(cfg, tokenizer)
        saved = {"step": state["t"] if state else None, "new_run": not resume}

        def checkpoint_at(step, metrics, state):
            """Save at every evaluation, so an interrupted run can be resumed from the last one."""
            save_run(out, params, cfg, tc, state, metrics, tokenizer=tokenizer, keep=keep,
                     new_run=saved["new_run"], level_weights=weights)
            saved.update(step=step, new_run=False)

        def on_interrupt(step, metrics, state):
            if step > 0 and step != saved["step"]:
                checkpoint_at(step, metrics, state)

        try:
            state, metrics = (trainer or train)(params, cfg, tc, *data, state, metrics, weights, log=log,
                                                on_eval=checkpoint_at, on_interrupt=on_interrupt)
        except Diverged as e:
            kept = (f"{out} keeps the checkpoint of step {saved['step']}, the last finite one" if saved["step"]
                    else f"nothing was saved in {out}")
            lower = tc.lr / 10
            raise Diverged(f"{e}; {kept} (to go on with a lower learning rate: --resume --allow-changes "
                           f"--lr={lower:g} --min_lr={min(tc.min_lr, lower):g})") from None
        except KeyboardInterrupt:
            where = (f"{out} holds the checkpoint of step {saved['step']}; run the same command with --resume to "
                     f"continue" if saved["step"] else f"nothing was saved in {out}")
            raise KeyboardInterrupt(f"interrupted; {where}") from None
        return params, state, metrics, data
