"""The transformer, written plainly for one model: the readable reference path.

`forward(params, cfg, ids)` runs the whole model, and, given `view(params, cfg, level, j)` and
`cfg.sub(level)`, any sub-model: the same code at every scale. Training uses the level-batched
fast path in `fast.py`; a test proves the two agree.
"""
import math

import numpy as onp
import autograd.numpy as np

from tinyfractal.core import formulas
from tinyfractal.core.tree import map_roles, view

UNIFORM_INIT = ("Wq", "Wk", "Wv", "Wo", "Wgate", "bgate", "Wup", "bup", "Wdown", "bdown")


def base_params(cfg, seed=0):
    """Fresh float32 parameters of the base transformer, as the original: weights and biases uniform in
    +-1/sqrt(fan_in), E standard normal, norm gains zero (so each norm starts as the identity gain 1 + 0).

    fan_in is the root's (D, H*hd or F), so a level-l node's own block starts s^(l/2) times smaller
    than a standalone model of its shape would. With cfg.nested_init every entry starts as its
    deepest owner would alone: each level's blocks are scaled by sqrt(s) once more than their parent's,
    so a node's block is uniform in +-1/sqrt(its own fan_in), the same law as its standalone twin.

    A variant may add arrays of its own: `api.init_params` (the public `tinyfractal.init_params`) adds them.
    """
    rng = onp.random.default_rng(seed)
    D, H, K, hd, Fw, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size

    def uniform(shape, fan_in):
        bound = 1.0 / onp.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(onp.float32)

    def zeros(n):
        return onp.zeros(n, dtype=onp.float32)

    params = {"E": rng.standard_normal((V, D)).astype(onp.float32),
              "emb_norm": zeros(D), "final_norm": zeros(D), "out_norm": zeros(D), "layers": []}
    for _ in range(cfg.layers):
        params["layers"].append({
            "attn_norm": zeros(D),
            "Wq": uniform((D, H, hd), D), "Wk": uniform((D, K, hd), D), "Wv": uniform((D, K, hd), D),
            "Wo": uniform((H, hd, D), H * hd),
            "mlp_norm": zeros(D),
            "Wgate": uniform((D, Fw), D), "bgate": uniform((Fw,), D),
            "Wup": uniform((D, Fw), D), "bup": uniform((Fw,), D),
            "Wdown": uniform((Fw, D), Fw), "bdown": uniform((D,), Fw),
        })
    if cfg.nested_init:
        for level in range(1, cfg.levels):
            for j in range(cfg.n_models(level)):
                for layer in view(params, cfg, level, j)["layers"]:     # views: scales the shared arrays
                    for name in UNIFORM_INIT:
                        layer[name] *= onp.float32(math.sqrt(cfg.split))
    params.update({name: zeros(shape) for name, shape in option_shapes(cfg).items()})
    return params


def option_shapes(cfg):
    """The small tables of the output options (output_gain): one row of width D per level."""
    shapes = {}
    if cfg.logit_scale == "learned":   # node (l, j) reads row l, columns R (output_gain)
        shapes["logit_gain"] = (cfg.levels, cfg.hidden)
    if cfg.node_gains:
        shapes["node_gain"] = (cfg.levels, cfg.hidden)
    return shapes


def base_param_shapes(cfg):
    """The shape of every array of the base transformer of this config (`api.param_shapes` adds the variant's)."""
    D, H, K, hd, Fw, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size
    layer = {"attn_norm": (D,), "Wq": (D, H, hd), "Wk": (D, K, hd), "Wv": (D, K, hd), "Wo": (H, hd, D),
             "mlp_norm": (D,), "Wgate": (D, Fw), "bgate": (Fw,), "Wup": (D, Fw), "bup": (Fw,),
             "Wdown": (Fw, D), "bdown": (D,)}
    return {"E": (V, D), "emb_norm": (D,), "final_norm": (D,), "out_norm": (D,),
            "layers": [dict(layer) for _ in range(cfg.layers)], **option_shapes(cfg)}


def count_params(params):
    """Number of scalars in a params dict (views count their own entries)."""
    total = [0]
    map_roles(lambda a, roles: total.__setitem__(0, total[0] + int(onp.size(a))), params)
    return total[0]


def dense(W, shape=None):
    """W (optionally reshaped) as a fresh contiguous array.

    A sub-model's weights are strided views, and BLAS may sum a strided operand in another order than a
    contiguous copy, changing the last bit. Adding 0.0 copies exactly, so a node run through its views
    gives bit for bit the logits of a standalone model built from copies.
    """
    return (W if shape is None else np.reshape(W, shape)) + 0.0


def dropout(x, rate, rng):
    """Inverted dropout; identity when no rng is given (evaluation) or rate is 0."""
    if rng is None or rate == 0:
        return x
    keep = (rng.random(x.shape) >= rate).astype(onp.float32) / onp.float32(1.0 - rate)
    return x * keep


# The steps of one forward pass. Each is a module-level function that receives the views it reads
# as arguments, so tools/trace.py can wrap them from outside and see which slices every step read.

def embed(E, emb_norm, ids, eps):
    """x = rmsnorm(E[ids], emb_norm). ids (B,T) -> (B,T,D)."""
    return formulas.rmsnorm(E[ids], emb_norm, eps)


def norm(x, gain, eps):
    """rmsnorm(x, gain) before a sublayer. (B,T,D) -> same."""
    return formulas.rmsnorm(x, gain, eps)


def project_qkv(x, Wq, Wk, Wv):
    """q, k, v = x Wq, x Wk, x Wv. (B,T,D) -> (B,T,H,h), (B,T,K,h), (B,T,K,h)."""
    B, T, D = x.shape
    rows = np.reshape(x, (B * T, D))
    return tuple(np.reshape(np.dot(rows, dense(W, (D, -1))), (B, T) + W.shape[1:]) for W in (Wq, Wk, Wv))


def rotate(q, k, theta, start=0):
    """RoPE on q and k at positions start, start+1, ... (half-split pairs). Shapes unchanged."""
    cos, sin = formulas.rope_tables(q.shape[1], q.shape[-1], theta, start)
    return formulas.rope(q, cos, sin), formulas.rope(k, cos, sin)


def attention_weights(q, k):
    """softmax(q kᵀ/√h, causal), each kv head serving H/K query heads. -> (B,H,T,T)."""
    return formulas.attention_weights(q, k)


def mix_heads(probs, v, Wo):
    """attn out = (probs v) Wo: the heads side by side, then one matmul. -> (B,T,D)."""
    out = formulas.weighted_values(probs, v)                                         # (B,T,H,h)
    B, T, H, h = out.shape
    return np.reshape(np.dot(np.reshape(out, (B * T, H * h)), dense(Wo, (H * h, -1))), (B, T, -1))


def gated_hidden(x, Wgate, bgate, Wup, bup):
    """hidden = gelu(x Wgate + bgate) * (x Wup + bup). (B,T,D) -> (B,T,F)."""
    B, T, D = x.shape
    rows = np.reshape(x, (B * T, D))
    hidden = formulas.geglu(np.dot(rows, dense(Wgate)) + bgate, np.dot(rows, dense(Wup)) + bup)
    return np.reshape(hidden, (B, T, -1))


def down(hidden, Wdown, bdown):
    """mlp out = hidden Wdown + bdown. (B,T,F) -> (B,T,D)."""
    B, T, Fw = hidden.shape
    return np.reshape(np.dot(np.reshape(hidden, (B * T, Fw)), dense(Wdown)) + bdown, (B, T, -1))


def output_table(E, out_norm, eps):
    """The tied output's rows: rmsnorm(E, out_norm). (V,D) -> (V,D)."""
    return formulas.rmsnorm(E, out_norm, eps)


def logits_of(x, final_norm, table, eps, g_out=1.0):
    """logits = (rmsnorm(x, final_norm) * g_out) tableᵀ, g_out = output_gain. (B,T,D) -> (B,T,V)."""
    B, T, D = x.shape
    rows = np.reshape(formulas.rmsnorm(x, final_norm, eps) * g_out, (B * T, D))
    return np.reshape(np.dot(rows, np.transpose(table)), (B, T, -1))


def attention(x, p, cfg, start=0):
    """Causal multi-query attention with RoPE. (B,T,D) -> (B,T,D)."""
    q, k, v = project_qkv(x, p["Wq"], p["Wk"], p["Wv"])
    q, k = rotate(q, k, cfg.rope_theta, start)
    return mix_heads(attention_weights(q, k), v, p["Wo"])


def mlp(x, p):
    """GeGLU MLP: (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown. (B,T,D) -> (B,T,D)."""
    return down(gated_hidden(x, p["Wgate"], p["bgate"], p["Wup"], p["bup"]), p["Wdown"], p["bdown"])


def layer(x, p, cfg, rng=None):
    """One transformer layer: pre-norm attention, then pre-norm MLP, each added to the residual stream."""
    x = x + dropout(attention(norm(x, p["attn_norm"], cfg.eps), p, cfg), cfg.dropout, rng)
    return x + dropout(mlp(norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)


def output(x, params, cfg):
    """The tied output of one model. (B,T,D) -> (B,T,V)."""
    return logits_of(x, params["final_norm"], output_table(params["E"], params["out_norm"], cfg.eps), cfg.eps,
                     output_gain(params, cfg))


def forward(params, cfg, ids, rng=None):
    """Logits of one base model. ids (B,T) ints -> (B,T,V) float32.

    `rng` (a numpy Generator) turns dropout on, for training; without it the pass is deterministic.
    """
    x = embed(params["E"], params["emb_norm"], onp.asarray(ids), cfg.eps)     # (B,T,D)
    for p in params["layers"]:
        x = layer(x, p, cfg, rng)
    return output(x, params, cfg)


def output_gain(params, cfg, xp=np):
    """The node's own factor on its normalised final state, just before the tied output matmul:

        logits = (rmsnorm(x, final_norm) * output_gain) . rmsnorm_rows(E, out_norm)^T

    1.0 (nothing) unless an option is on. `cfg` is the node's own config (width d = cfg.hidden):
      logit_scale="sqrt"     1/sqrt(d). Both factors of the dot product have RMS 1, so a logit is a sum of
                             d terms: about sqrt(d) for unrelated vectors, up to d for aligned ones (the
                             final state still holds its input token's embedding). A fresh node's first
                             loss is then about d nats, not ln V; over sqrt(d) every logit is at most
                             sqrt(d), so the first loss is at most ln V + 2 sqrt(d).
      logit_scale="learned"  (1 + mean of the node's row of logit_gain) / sqrt(d): a temperature per node.
      node_gains=True        times (1 + the node's row of node_gain): an output gain per coordinate that is
                             the node's own, where final_norm's slice is shared with every ancestor.
    Per-node rows: a node's params (a view) hold rows [l:] of the (levels, D) tables, its own row first.
    Returns a Python float, or an array of shape (..., d) or (..., 1) whose leading axes are the model
    axes of `params` (none for one node, (N,) for a stacked level); `scale_output` broadcasts it.
    `xp` is the array namespace, as in formulas.py: autograd.numpy here, jax.numpy in the JAX engine.
    """
    return gain_of(params["logit_gain"] if cfg.logit_scale == "learned" else None,
                   params["node_gain"] if cfg.node_gains else None, cfg.logit_scale != "none", cfg.hidden, xp)


def gain_of(logit_gain, node_gain, scaled, width, xp=np):
    """output_gain from the node's tables (None when the option is off; rows [l:], its own row first):
    1/sqrt(width) if scaled, times (1 + mean of logit_gain's first row), times (1 + node_gain's first row)."""
    gain = 1.0 / math.sqrt(width) if scaled else 1.0
    if logit_gain is not None:
        row = logit_gain[..., 0, :]                                                # (..., d)
        gain = (1.0 + xp.sum(row, axis=-1, keepdims=True) * (1.0 / width)) * gain
    if node_gain is not None:
        gain = (1.0 + node_gain[..., 0, :]) * gain
    return gain


def scale_output(h, params, cfg, xp=np):
    """h * output_gain(params, cfg), the gain's model axes lined up with h's leading axes. (..., d) -> same."""
    gain = output_gain(params, cfg, xp)
    if isinstance(gain, float):
        return h if gain == 1.0 else h * gain
    lead = gain.shape[:-1]
    return h * xp.reshape(gain, lead + (1,) * (h.ndim - len(lead) - 1) + gain.shape[-1:])


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in nats. logits (..., V), targets (...) ints."""
    return formulas.cross_entropy(logits, targets)
