"""Every formula of the transformer, written once, plainly.

These are the definitions. The readable per-node model (`model.py`), the references of the fused
primitives (`ops.py`), the KV-cached decoder (`inference/decoder.py`) and the lessons all call them;
the fused primitives must agree with them (tests/test_ops.py), and so must a JAX engine.

Each function takes `xp`, the array namespace, as its last argument: `autograd.numpy` by default
(so autograd can differentiate through it), plain `numpy` for inference, or `jax.numpy`. Nothing here
knows about the tree: leading axes (models N, batch B, ...) just ride along.

Shapes: B batch, T time (Tq queries, Tk keys), d width, H query heads, K key/value heads, h head dim,
V vocabulary.
"""
import numpy as onp
import autograd.numpy as anp

GELU_C = 0.7978845608028654   # sqrt(2 / pi), of the tanh approximation of GELU
GELU_K = 0.044715
MASKED = -1e30                # the score of a key a query may not see: exp() of it is exactly 0


def rmsnorm(x, g, eps, xp=anp):
    """rmsnorm: x / sqrt(mean(x²) + eps) · (1 + g), over the last axis. g broadcasts against x."""
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + g)


def gelu(x, xp=anp):
    """The tanh approximation of GELU: x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))."""
    return 0.5 * x * (1.0 + xp.tanh(GELU_C * (x + GELU_K * x * x * x)))


def geglu(a, u, xp=anp):
    """The gated unit of the MLP: gelu(a) · u."""
    return gelu(a, xp) * u


def softmax(x, xp=anp):
    """softmax over the last axis, shifted by the max so exp never overflows."""
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def log_softmax(x, xp=anp):
    """log softmax over the last axis: x − logsumexp(x)."""
    m = xp.max(x, axis=-1, keepdims=True)
    return x - m - xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True))


def rope_tables(T, h, theta, start=0):
    """cos and sin of the angle pos · theta^(−2m/h) for pos in [start, start+T), m < h/2: (T, h/2) each.

    Computed in float64 on the host and rounded once, so every engine rotates by the same numbers.
    """
    m = onp.arange(h // 2, dtype=onp.float64)
    pos = onp.arange(start, start + T, dtype=onp.float64)
    angles = pos[:, None] * theta ** (-2.0 * m / h)[None, :]
    return onp.cos(angles).astype(onp.float32), onp.sin(angles).astype(onp.float32)


def rope(x, cos, sin, xp=anp):
    """Rotate each pair (m, m + h/2) of the last axis by its angle (half-split pairing).

    x (..., T, H, h), cos and sin (T, h/2) -> (..., T, H, h).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return xp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def causal_mask(Tq, Tk):
    """(Tq, Tk) booleans: query t (the last Tq of Tk positions) may see key u iff u <= Tk − Tq + t."""
    return onp.arange(Tk)[None, :] <= (Tk - Tq) + onp.arange(Tq)[:, None]


def attention_weights(q, k, xp=anp):
    """softmax(q·kᵀ/√h, causal) of rotated heads, each key head serving H/K query heads (multi-query).

    q (..., Tq, H, h), k (..., Tk, K, h) with K dividing H. The Tq queries are the last Tq of the Tk
    positions, so a cache of Tk − Tq earlier keys is seen whole. -> (..., H, Tq, Tk).
    """
    Tq, H, h = q.shape[-3:]
    Tk, K = k.shape[-3], k.shape[-2]
    k = xp.repeat(k, H // K, axis=k.ndim - 2)   # a positive axis: autograd's repeat VJP mishandles negative ones
    scores = xp.matmul(xp.swapaxes(q, -3, -2), xp.moveaxis(k, -3, -1)) / float(onp.sqrt(h))   # (..., H, Tq, Tk)
    return softmax(xp.where(causal_mask(Tq, Tk), scores, MASKED), xp)


def weighted_values(probs, v, xp=anp):
    """The attention output: probs · v per head. probs (..., H, Tq, Tk), v (..., Tk, K, h) -> (..., Tq, H, h)."""
    H, K = probs.shape[-3], v.shape[-2]
    v = xp.swapaxes(xp.repeat(v, H // K, axis=v.ndim - 2), -3, -2)            # (..., H, Tk, h)
    return xp.swapaxes(xp.matmul(probs, v), -3, -2)


def attend(q, k, v, xp=anp):
    """Causal multi-query attention: softmax(q·kᵀ/√h, causal) · v. q (..., Tq, H, h), k, v (..., Tk, K, h) -> (..., Tq, H, h)."""
    return weighted_values(attention_weights(q, k, xp), v, xp)


def tied_logits(x, E, final_gain, out_gain, eps, xp=anp):
    """The tied output: rmsnorm(x, final_norm) · rmsnorm_rows(E, out_norm)ᵀ. x (..., d), E (V, d) -> (..., V)."""
    return xp.matmul(rmsnorm(x, final_gain, eps, xp), xp.swapaxes(rmsnorm(E, out_gain, eps, xp), -1, -2))


def cross_entropy(logits, targets, xp=anp):
    """Mean next-token cross-entropy in nats: mean over rows of logsumexp(logits) − logits[target].

    logits (..., V), targets (...) integers.
    """
    V = logits.shape[-1]
    flat = xp.reshape(logits, (-1, V))
    rows = onp.arange(flat.shape[0])
    # xp.asarray, not onp.asarray: under jax.jit the targets are a traced array NumPy cannot read
    return -xp.mean(log_softmax(flat, xp)[rows, xp.reshape(xp.asarray(targets), (-1,))])
