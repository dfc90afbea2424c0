"""The level-batched forward in JAX: every model of a level runs as one computation, under `jit`.

The structure is `core/fast.py`'s and every formula is `core/formulas.py`'s, called with `xp=jnp`:
a change of formula changes both engines, and each node's output gain is `model.output_gain`'s, also
called with `xp=jnp`. Only the glue is here: flattening to one 2-D matmul per model, broadcasting each
model's gains, and dropout from a `jax.random` key.

`layout` (mesh.py) says how arrays are spread over devices; without one, XLA places everything on one
device. Shapes: N models of one level, B batch, T time, d width, H/K heads, h head dim, V vocabulary.
"""
import math

import jax
import jax.numpy as jnp

from tinyfractal.api import level_weight_table
from tinyfractal.core import formulas as F
from tinyfractal.core.model import scale_output
from tinyfractal.jax_engine import check_variant
from tinyfractal.jax_engine.blocks import level_view


def linear(x, W, b=None, axes=1):
    """x (N,...,A) times W (N,A...,O...) plus b (N,O), one 2-D matmul per model -> (N,...,O...).

    `axes` is how many trailing axes of x W reads (2 for Wo, which reads (H, h)).
    """
    N = x.shape[0]
    A, out = math.prod(W.shape[1:1 + axes]), W.shape[1 + axes:]
    lead = x.shape[1:x.ndim - axes]
    y = jnp.matmul(jnp.reshape(x, (N, -1, A)), jnp.reshape(W, (N, A, math.prod(out))))   # (N,M,O)
    if b is not None:
        y = y + b[:, None, :]
    return jnp.reshape(y, (N,) + lead + out)


def norm(x, g, eps):
    """rmsnorm with a gain per model: x (N,...,d), g (N,d)."""
    return F.rmsnorm(x, jnp.reshape(g, (g.shape[0],) + (1,) * (x.ndim - 2) + g.shape[1:]), eps, jnp)


def dropout(x, rate, key):
    """Zero each entry with probability `rate` and scale the rest by 1/(1-rate); identity without a key."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return x * (keep.astype(x.dtype) / (1.0 - rate))


def attention(x, p, cfg):
    """Causal multi-query attention with RoPE for N models. (N,B,T,d) -> (N,B,T,d)."""
    q = linear(x, p["Wq"])                                                  # (N,B,T,H,h)
    k, v = linear(x, p["Wk"]), linear(x, p["Wv"])                           # (N,B,T,K,h)
    cos, sin = F.rope_tables(x.shape[2], q.shape[-1], cfg.rope_theta)      # (T,h/2), host constants
    out = F.attend(F.rope(q, cos, sin, jnp), F.rope(k, cos, sin, jnp), v, jnp)   # (N,B,T,H,h)
    return linear(out, p["Wo"], axes=2)


def mlp(x, p):
    """GeGLU MLP for N models. (N,B,T,d) -> (N,B,T,d)."""
    hidden = F.geglu(linear(x, p["Wgate"], p["bgate"]), linear(x, p["Wup"], p["bup"]), jnp)   # (N,B,T,f)
    return linear(hidden, p["Wdown"], p["bdown"])


def block(x, p, cfg, key=None):
    """One transformer layer for N models: pre-norm attention, then pre-norm MLP. (N,B,T,d) -> same."""
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    x = x + dropout(attention(norm(x, p["attn_norm"], cfg.eps), p, cfg), cfg.dropout, k1)
    return x + dropout(mlp(norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, k2)


def forward_stacked(stacked, cfg, ids, key=None, layout=None):
    """Logits of N models whose params are stacked on a leading axis. ids (B,T) -> (N,B,T,V)."""
    spread = layout.activations if layout else (lambda a: a)
    x = spread(norm(stacked["E"][:, ids], stacked["emb_norm"], cfg.eps))   # (N,B,T,d)
    for i, p in enumerate(stacked["layers"]):
        x = spread(block(x, p, cfg, None if key is None else jax.random.fold_in(key, i)))
    return spread(output_logits(x, stacked, cfg))


def output_logits(x, stacked, cfg):
    """The tied output, as fast.output_logits: (rmsnorm(x, final_norm) * output_gain) against the
    row-normalised embedding. model.output_gain (with xp=jnp) is each node's own gain: 1/sqrt(d), its
    row of logit_gain, its row of node_gain. (N,B,T,d) -> (N,B,T,V)."""
    out_emb = norm(stacked["E"], stacked["out_norm"], cfg.eps)                               # (N,V,d)
    h = scale_output(norm(x, stacked["final_norm"], cfg.eps), stacked, cfg, jnp)             # (N,B,T,d)
    return linear(h, jnp.swapaxes(out_emb, 1, 2))                                            # (N,B,T,V)


def forward_level(params, cfg, level, ids, key=None, layout=None):
    """Logits of every model of one level. ids (B,T) -> (N,B,T,V), N = split**level."""
    check_variant(cfg)                      # a coupled or byte config must not run as a base model
    stacked = level_view(params, cfg, level)
    if layout:
        stacked = jax.tree_util.tree_map(layout.models, stacked)
    return forward_stacked(stacked, cfg.sub(level), ids, key, layout)


def cross_entropy_per_model(logits, targets):
    """Mean cross-entropy of each model. logits (N,B,T,V), targets (B,T) -> (N,)."""
    return jax.vmap(lambda one: F.cross_entropy(one, targets, jnp))(logits)


def node_losses(params, cfg, ids, targets, key=None, layout=None):
    """Per level, every model's mean loss: [(1,), (s,), (s^2,), ...]."""
    return [cross_entropy_per_model(
                forward_level(params, cfg, level, ids, None if key is None else jax.random.fold_in(key, level),
                              layout), targets)
            for level in range(cfg.levels)]


def tree_loss(params, cfg, ids, targets, level_weights=None, key=None, layout=None):
    """Mean next-token loss over every node (weighted per level if asked): what training minimises."""
    return weighted_loss(params, cfg, ids, targets, level_weight_table(cfg, level_weights), key, layout)


def weighted_loss(params, cfg, ids, targets, weights, key=None, layout=None):
    """The tree loss for a node weight per level, already normalised (`api.level_weight_table`); `weights`
    may be a traced array, so the compiled training step takes each step's weights as an argument."""
    losses = node_losses(params, cfg, ids, targets, key, layout)
    return sum(weights[level] * jnp.sum(losses[level]) for level in range(cfg.levels))
