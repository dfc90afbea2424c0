"""The level-batched fast path: all N = split**level models of a level run as one computation.

`level_view` stacks each level's diagonal blocks on a leading N axis (still views of the shared
arrays), and every op below carries that axis, so a level costs one batched matmul per weight
instead of N small ones. This is the path training uses; `model.py` is the readable reference,
and a test proves the two give the same loss and gradients.
"""
import numpy as onp
import autograd.numpy as np

from .model import dropout, gelu, level_weight_table, rmsnorm, rope, rope_tables, softmax
from .tree import level_view


def matmul_rows(x, W):
    """(N, ..., A) @ (N, A, ...) -> (N, ..., rest): flatten to one batched 2-D matmul per model."""
    N, A = x.shape[0], x.shape[-1]
    lead = x.shape[1:-1]
    rest = W.shape[2:]
    out = np.matmul(np.reshape(x, (N, -1, A)), np.reshape(W, (N, A, -1)))
    return np.reshape(out, (N,) + lead + rest)


def embed(P, ids):
    """Token embeddings of every model. P['E'] (N,V,d), ids (B,T) -> (N,B,T,d)."""
    return P["E"][:, ids]


def attention(x, p, cfg, start=0):
    """Causal multi-query attention with RoPE for N models at once. (N,B,T,d) -> (N,B,T,d)."""
    N, B, T, d = x.shape
    H, K, h = p["Wq"].shape[2], p["Wk"].shape[2], p["Wq"].shape[3]
    q = matmul_rows(x, p["Wq"])                                               # (N,B,T,H,h)
    k = matmul_rows(x, p["Wk"])                                               # (N,B,T,K,h)
    v = matmul_rows(x, p["Wv"])
    cos, sin = rope_tables(T, h, cfg.rope_theta, start)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = np.repeat(k, H // K, axis=3), np.repeat(v, H // K, axis=3)          # (N,B,T,H,h)
    q, k, v = (np.transpose(a, (0, 1, 3, 2, 4)) for a in (q, k, v))            # (N,B,H,T,h)
    scores = np.matmul(q, np.transpose(k, (0, 1, 2, 4, 3))) / onp.float32(onp.sqrt(h))
    causal = onp.tril(onp.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, onp.float32(-1e30))
    out = np.matmul(softmax(scores), v)                                        # (N,B,H,T,h)
    out = np.reshape(np.transpose(out, (0, 1, 3, 2, 4)), (N, B, T, H * h))
    return matmul_rows(out, np.reshape(p["Wo"], (N, H * h, d)))


def mlp(x, p):
    """GeGLU MLP for N models. (N,B,T,d) -> (N,B,T,d)."""
    gate = matmul_rows(x, p["Wgate"]) + p["bgate"][:, None, None, :]
    up = matmul_rows(x, p["Wup"]) + p["bup"][:, None, None, :]
    return matmul_rows(gelu(gate) * up, p["Wdown"]) + p["bdown"][:, None, None, :]


def norm(x, g, eps):
    """rmsnorm with a gain per model: x (N,...,d), g (N,d)."""
    return rmsnorm(x, g.reshape((g.shape[0],) + (1,) * (x.ndim - 2) + (g.shape[1],)), eps)


def block(x, p, cfg, rng=None, start=0):
    """One transformer layer for N models: pre-norm attention, then pre-norm MLP. (N,B,T,d) -> same."""
    x = x + dropout(attention(norm(x, p["attn_norm"], cfg.eps), p, cfg, start), cfg.dropout, rng)
    return x + dropout(mlp(norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)


def output_logits(x, P, cfg):
    """Tied output: rmsnorm(x, final_norm) against the row-normalised embedding. (N,B,T,d) -> (N,B,T,V)."""
    out_emb = norm(P["E"], P["out_norm"], cfg.eps)                            # (N,V,d)
    return matmul_rows(norm(x, P["final_norm"], cfg.eps), np.transpose(out_emb, (0, 2, 1)))


def forward_stacked(P, cfg, ids, rng=None):
    """Logits of N models whose params are stacked on a leading axis. ids (B,T) -> (N,B,T,V)."""
    x = norm(embed(P, onp.asarray(ids)), P["emb_norm"], cfg.eps)
    for p in P["layers"]:
        x = block(x, p, cfg, rng)
    return output_logits(x, P, cfg)


def forward_level(params, cfg, level, ids, rng=None):
    """Logits of every model of one level, batched. ids (B,T) -> (N,B,T,V), N = split**level."""
    return forward_stacked(level_view(params, cfg, level), cfg.sub(level), ids, rng)


def cross_entropy_per_model(logits, targets):
    """Mean cross-entropy of each model. logits (N,B,T,V), targets (B,T) -> (N,)."""
    N, V = logits.shape[0], logits.shape[-1]
    flat = np.reshape(logits, (N, -1, V))
    m = np.max(flat, axis=2, keepdims=True)
    logz = np.log(np.sum(np.exp(flat - m), axis=2)) + m[:, :, 0]
    t = onp.asarray(targets).reshape(-1)
    picked = flat[:, onp.arange(t.size), t]
    return np.mean(logz - picked, axis=1)


def node_losses(params, cfg, ids, targets, rng=None):
    """Per-level arrays of per-model losses: [ (1,), (s,), (s^2,), ... ]."""
    return [cross_entropy_per_model(forward_level(params, cfg, level, ids, rng), targets)
            for level in range(cfg.levels)]


def tree_loss(params, cfg, ids, targets, level_weights=None, rng=None):
    """Mean next-token cross-entropy over every node of the tree (weighted per level if asked)."""
    weights = level_weight_table(cfg, level_weights)
    losses = node_losses(params, cfg, ids, targets, rng)
    return sum(weights[level] * np.sum(losses[level]) for level in range(cfg.levels))
