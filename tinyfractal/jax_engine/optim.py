"""AdamW in JAX with the rules of `training/train.py`, and the whole training step as one jitted function.

The rules, as in the NumPy engine:
  - no weight decay on the names in `tree.NO_DECAY` (gains and biases);
  - the tree loss weighted per level by `train.step_level_weights` (tc.loss_weights, annealed if 'A>B'),
    computed on the host for every step and handed in, so an annealed weighting needs no recompiling;
  - gradients clipped together to a global L2 norm of at most `train.clip_threshold` (grad_clip, or with
    clip_mode='tree' grad_clip * sqrt(sum of squared node weights); 0: no clipping);
  - the learning rate of `train.lr_at` (linear warmup, then cosine), computed on the host, times each
    matrix entry's `width_lr` factor (`train.width_lr_scales`, constants of the compiled step);
  - `trainable` masks (merged models): a frozen entry's gradient does not count towards the norm, and
    its value and moments are never changed, so frozen sub-models stay bit for bit as they were.

Bias corrections 1 - beta^t, the learning rate, the level weights and the clipping threshold are computed
on the host in float64 and handed in as float32 values, as the NumPy engine rounds them, so one compiled
step serves every step t.
"""
import jax
import jax.numpy as jnp
import numpy as onp

from tinyfractal.core.tree import NO_DECAY, unflatten
from tinyfractal.jax_engine.model import weighted_loss
from tinyfractal.api import level_weight_table
from tinyfractal.training.train import clip_threshold, lr_at, step_level_weights


def adamw_init(flat):
    """Optimizer state: zero first and second moments per flat name, and the step count (a host int)."""
    return {"m": {k: onp.zeros(v.shape, onp.float32) for k, v in flat.items()},
            "v": {k: onp.zeros(v.shape, onp.float32) for k, v in flat.items()}, "t": 0}


def hyper(cfg, tc, step, t, level_weights=None):
    """The step's host-side values: learning rate, the bias corrections of update number t, each level's
    node weight (normalised, `api.level_weight_table`) and the clipping threshold that goes with them."""
    weights = level_weight_table(cfg, step_level_weights(tc, cfg, step, level_weights))
    return {"lr": onp.float32(lr_at(tc, step)), "c1": onp.float32(1 - tc.beta1 ** t),
            "c2": onp.float32(1 - tc.beta2 ** t), "step": onp.int32(step),
            "weights": onp.asarray(weights, onp.float32), "clip": onp.float32(clip_threshold(tc, cfg, weights))}


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients down together if their global L2 norm exceeds max_norm: (grads, norm)."""
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in grads.values()))
    scale = jnp.where((max_norm > 0) & (norm > max_norm), max_norm / (norm + 1e-6), 1.0).astype(jnp.float32)
    return {k: g * scale for k, g in grads.items()}, norm


def adamw_update(p, g, m, v, h, tc, decay, mask=None, scale=None):
    """One AdamW update of one array: (p, m, v) new. m and v are the moments, h the host scalars,
    scale (or None) the per-entry lr factor."""
    m2 = tc.beta1 * m + (1 - tc.beta1) * g
    v2 = tc.beta2 * v + (1 - tc.beta2) * (g * g)
    update = (m2 / h["c1"]) / (jnp.sqrt(v2 / h["c2"]) + 1e-8) + decay * p
    p2 = p - (h["lr"] if scale is None else h["lr"] * scale) * update
    if mask is None:
        return p2, m2, v2
    return jnp.where(mask, p2, p), jnp.where(mask, m2, m), jnp.where(mask, v2, v)


def make_train_step(cfg, tc, layout=None, lr_scales=None):
    """The jitted step (flat, m, v, ids, targets, h, masks) -> (flat, m, v, loss, grad norm).

    lr_scales: `train.width_lr_scales(params, cfg, tc.width_lr, tc.lr_width)` (name -> float32 array), or
    None when every factor is 1.

    flat, m, v: name -> array; h: `hyper`'s values; masks: name -> bool array for the names with
    frozen entries (or {}). Dropout draws from a key made of the seed and the step number, so a resumed
    run draws what the uninterrupted one would have. The old parameter and moment buffers are donated:
    the step updates them in place on the device.
    """
    scales = {k: jnp.asarray(a) for k, a in (lr_scales or {}).items()}

    def loss_fn(flat, ids, targets, key, weights):
        return weighted_loss(unflatten(flat), cfg, ids, targets, weights, key, layout)

    def step(flat, m, v, ids, targets, h, masks):
        key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), h["step"]) if cfg.dropout > 0 else None
        loss, grads = jax.value_and_grad(loss_fn)(flat, ids, targets, key, h["weights"])
        grads = {k: jnp.where(masks[k], g, 0.0) if k in masks else g for k, g in grads.items()}
        grads, gnorm = clip_by_global_norm(grads, h["clip"])
        new = {k: adamw_update(flat[k], grads[k], m[k], v[k], h, tc,
                               0.0 if k.split(".")[-1] in NO_DECAY else tc.weight_decay, masks.get(k),
                               scales.get(k))
               for k in flat}
        return ({k: u[0] for k, u in new.items()}, {k: u[1] for k, u in new.items()},
                {k: u[2] for k, u in new.items()}, loss, gnorm)

    if layout is None:
        return jax.jit(step, donate_argnums=(0, 1, 2))
    rep, rows = layout.replicated, layout.batch
    return jax.jit(step, donate_argnums=(0, 1, 2),
                   in_shardings=(rep, rep, rep, rows, rows, rep, rep),
                   out_shardings=(rep, rep, rep, rep, rep))
