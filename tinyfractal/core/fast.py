"""The level-batched fast path: all N = split**level models of a level run as one computation.

`level_view` stacks each level's diagonal blocks on a leading N axis (still views of the shared
arrays), and every op below carries that axis, so a level costs one batched matmul per weight
instead of N small ones. The heavy ops are the fused primitives of `ops.py`, whose gradients are
written by hand. This is the path training uses; `model.py` is the readable reference, and
tests/test_fast.py proves the two give the same loss and gradients.

`ops.linear` flattens activations to (N, B·T, features) inside, so every weight matmul is one 2-D
matmul per model  without reshapes recorded by autograd. q, k, v and the MLP's
gate and up projections get a matmul each rather than one fused [Wq | Wk | Wv] matmul, because the
ops after them run 2-4x faster on whole contiguous arrays than on column slices of a wider one.
"""
import numpy as onp
import autograd.numpy as np

from tinyfractal.core import ops
from tinyfractal.core.model import dropout, scale_output
from tinyfractal.core.tree import level_view


def matmul_rows(x, W):
    """(N, ..., A) @ (N, A, ...) -> (N, ..., rest): one batched 2-D matmul per model."""
    return ops.linear(x, W)


def embed(stacked, ids):
    """Token embeddings of every model. stacked['E'] (N,V,d), ids (B,T) -> (N,B,T,d)."""
    return ops.embedding(stacked["E"], onp.asarray(ids))


def attention(x, p, cfg, start=0):
    """Causal multi-query attention with RoPE for N models at once. (N,B,T,d) -> (N,B,T,d).

    `start` is the position of the first token (RoPE angles start there).
    """
    q = ops.linear(x, p["Wq"])                                                   # (N,B,T,H,h)
    k, v = ops.linear(x, p["Wk"]), ops.linear(x, p["Wv"])                         # (N,B,T,K,h)
    out = ops.causal_attention(q, k, v, cfg.rope_theta, start)                    # (N,B,T,H,h)
    return ops.linear(out, p["Wo"], axes=2)                                       # (N,B,T,d)


def mlp(x, p):
    """GeGLU MLP for N models: (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown. (N,B,T,d) -> same."""
    hidden = ops.geglu(ops.linear(x, p["Wgate"], p["bgate"]), ops.linear(x, p["Wup"], p["bup"]))  # (N,B,T,f)
    return ops.linear(hidden, p["Wdown"], p["bdown"])


def norm(x, g, eps):
    """rmsnorm with a gain per model: x (N,...,d), g (N,d)."""
    return ops.rmsnorm(x, g, eps)


def block(x, p, cfg, rng=None, start=0):
    """One transformer layer for N models: pre-norm attention, then pre-norm MLP. (N,B,T,d) -> same."""
    x = x + dropout(attention(norm(x, p["attn_norm"], cfg.eps), p, cfg, start), cfg.dropout, rng)
    return x + dropout(mlp(norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)


def block_with_delta(x, p, cfg, rng=None):
    """One layer for N models, also returning what it added: (state after it, attention + MLP outputs)."""
    a = dropout(attention(norm(x, p["attn_norm"], cfg.eps), p, cfg), cfg.dropout, rng)
    x = x + a
    b = dropout(mlp(norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)
    return x + b, a + b


def output_logits(x, stacked, cfg):
    """Tied output: rmsnorm(x, final_norm) * output_gain against the row-normalised embedding.
    (N,B,T,d) -> (N,B,T,V)."""
    out_emb = norm(stacked["E"], stacked["out_norm"], cfg.eps)                              # (N,V,d)
    return ops.linear(scale_output(norm(x, stacked["final_norm"], cfg.eps), stacked, cfg), np.swapaxes(out_emb, 1, 2))


def forward_stacked(stacked, cfg, ids, rng=None):
    """Logits of N models whose params are stacked on a leading axis. ids (B,T) -> (N,B,T,V)."""
    x = norm(embed(stacked, onp.asarray(ids)), stacked["emb_norm"], cfg.eps)
    for p in stacked["layers"]:
        x = block(x, p, cfg, rng)
    return output_logits(x, stacked, cfg)


def forward_level(params, cfg, level, ids, rng=None):
    """Logits of every model of one level, batched. ids (B,T) -> (N,B,T,V), N = split**level."""
    return forward_stacked(level_view(params, cfg, level), cfg.sub(level), ids, rng)


def cross_entropy_per_model(logits, targets):
    """Mean cross-entropy of each model. logits (N,B,T,V), targets (B,T) -> (N,)."""
    return ops.cross_entropy(logits, onp.asarray(targets))


def read_once(params):
    """The same params as plain dicts and lists, each array read once.

    Under autograd, every `params[key]` on the traced dict records an op whose gradient rebuilds the
    vector space of the whole dict. Reading each array once per step, not once per level, cuts that
    bookkeeping by the number of levels.
    """
    out = {k: params[k] for k in params if k != "layers"}
    layers = params["layers"]
    out["layers"] = [{k: layer[k] for k in layer} for layer in (layers[i] for i in range(len(layers)))]
    return out


def node_losses(params, cfg, ids, targets, rng=None):
    """Per-level arrays of per-model losses: [ (1,), (s,), (s^2,), ... ]."""
    params = read_once(params)
    return [cross_entropy_per_model(forward_level(params, cfg, level, ids, rng), targets)
            for level in range(cfg.levels)]
