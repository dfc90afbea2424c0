"""Reference solutions to the exercises of lesson 0, the plain transformer (handout: lessons/transformer.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check transformer --solutions

Each check runs your function on random inputs and compares it with the engine's own code. Use NumPy
(imported below as np); read tinyfractal/core/formulas.py only after you have tried.
Shapes: T positions, D width, H query heads, K key/value heads, h head dim, F MLP width, V vocabulary.
"""
import numpy as np


def rmsnorm(x, g, eps):
    """RMSNorm over the last axis, with the learned gain (1 + g).

    x (..., D) floats, g (D,), eps a small float -> (..., D):
        x / sqrt(mean(x^2 over the last axis) + eps) * (1 + g)
    """
    x = np.asarray(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + g)


def causal_mask(T):
    """The causal mask of attention: (T, T) bool, True where query position t may read key position s.

    Position t may read itself and every earlier position, never a later one.
    """
    t = np.arange(T)
    return t[None, :] <= t[:, None]                     # [t, s]: s <= t


def rope(x, positions, theta):
    """RoPE with half-split pairs, for one head.

    x (T, h) with h even, positions (T,) ints, theta a float -> (T, h). Component m (m < h/2) turns
    together with component m + h/2, as a 2-D point, by the angle positions[t] * theta^(-2m/h):
        (a, b) -> (a cos - b sin, a sin + b cos)
    """
    T, h = x.shape
    half = h // 2
    m = np.arange(half)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * theta ** (-2.0 * m / h)[None, :]   # (T, h/2)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=1).astype(x.dtype)


def attention(x, Wq, Wk, Wv, Wo, theta):
    """Causal multi-query attention with RoPE, for one sequence.

    x (T, D); Wq (D, H, h); Wk, Wv (D, K, h) with H a multiple of K; Wo (H, h, D) -> (T, D).
    q = x Wq, k = x Wk, v = x Wv; RoPE on q and k (positions 0..T-1); query head i reads key/value
    head i // (H/K); scores q.k / sqrt(h) per head, the causal mask, softmax over the keys, times v;
    the H heads side by side (T, H*h), times Wo.
    Your rope and causal_mask above may help.
    """
    T, D = x.shape
    H, K, h = Wq.shape[1], Wk.shape[1], Wq.shape[2]
    q = np.einsum("td,dhc->thc", x, Wq)                 # (T, H, h)
    k = np.einsum("td,dkc->tkc", x, Wk)                 # (T, K, h)
    v = np.einsum("td,dkc->tkc", x, Wv)
    positions = np.arange(T)
    out = np.zeros((T, H, h), dtype=x.dtype)
    for i in range(H):
        j = i // (H // K)                               # the key/value head query head i reads
        qi = rope(q[:, i], positions, theta)
        kj = rope(k[:, j], positions, theta)
        scores = qi @ kj.T / np.sqrt(h)                 # (T, T)
        scores = np.where(causal_mask(T), scores, -np.inf)
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        w = w / w.sum(axis=1, keepdims=True)
        out[:, i] = w @ v[:, j]
    return out.reshape(T, H * h) @ Wo.reshape(H * h, D)


def geglu(x, Wgate, bgate, Wup, bup, Wdown, bdown):
    """The GeGLU MLP: (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown.

    x (T, D), Wgate and Wup (D, F), bgate and bup (F,), Wdown (F, D), bdown (D,) -> (T, D).
    gelu is the tanh approximation: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
    """
    def gelu(z):
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    return (gelu(x @ Wgate + bgate) * (x @ Wup + bup)) @ Wdown + bdown


def tied_logits(x, E, final_norm, out_norm, eps):
    """The tied output: rmsnorm(x, final_norm) . rmsnorm(E, out_norm)^T.

    x (T, D) the residual stream after the last layer, E (V, D) the embedding, final_norm and
    out_norm (D,) gains -> (T, V) logits. Every row of E is normalised with the out_norm gain.
    (The model then multiplies these dot products by its output gain, 1/sqrt(D) by default: lesson 0,
    section 4. Leave that out here.)
    """
    return rmsnorm(x, final_norm, eps) @ rmsnorm(E, out_norm, eps).T


def param_count(V, D, H, K, h, F, layers):
    """How many numbers a one-level model holds (count_params(init_params(cfg))), from its sizes.

    Lesson 0, section 1 lists the arrays. Count every one of them, biases, norm gains and the default
    output's two small tables included.
    """
    per_layer = (2 * D                                  # attn_norm, mlp_norm
                 + D * H * h + 2 * D * K * h + H * h * D  # Wq, Wk, Wv, Wo
                 + 2 * D * F + 2 * F                    # Wgate, Wup and their biases
                 + F * D + D)                           # Wdown, bdown
    # E; emb_norm, final_norm, out_norm; the default output's logit_gain and node_gain, one row of D each
    return V * D + 3 * D + 2 * D + layers * per_layer


def unrelated_logit_std(d):
    """Predict, from the width d alone, the standard deviation of a FRESH model's raw logits over the
    tokens that are not the input token itself (lesson 0, section 4). Raw: the dot products themselves,
    as in the prototype's output (logit_scale="none"), before the default's 1/sqrt(d). Return a float.

    The check measures it on fresh models of several widths and accepts answers within 15%.
    """
    # Two RMS-normalised vectors have length sqrt(d) each; in random directions their dot product is
    # sqrt(d) * sqrt(d) * cos, and the cosine of two random directions in d dims has std 1/sqrt(d).
    return float(np.sqrt(d))
