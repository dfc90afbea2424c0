"""Exercises for lesson 0, the plain transformer (handout: lessons/transformer.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check transformer

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
    raise NotImplementedError


def causal_mask(T):
    """The causal mask of attention: (T, T) bool, True where query position t may read key position s.

    Position t may read itself and every earlier position, never a later one.
    """
    raise NotImplementedError


def rope(x, positions, theta):
    """RoPE with half-split pairs, for one head.

    x (T, h) with h even, positions (T,) ints, theta a float -> (T, h). Component m (m < h/2) turns
    together with component m + h/2, as a 2-D point, by the angle positions[t] * theta^(-2m/h):
        (a, b) -> (a cos - b sin, a sin + b cos)
    """
    raise NotImplementedError


def attention(x, Wq, Wk, Wv, Wo, theta):
    """Causal multi-query attention with RoPE, for one sequence.

    x (T, D); Wq (D, H, h); Wk, Wv (D, K, h) with H a multiple of K; Wo (H, h, D) -> (T, D).
    q = x Wq, k = x Wk, v = x Wv; RoPE on q and k (positions 0..T-1); query head i reads key/value
    head i // (H/K); scores q.k / sqrt(h) per head, the causal mask, softmax over the keys, times v;
    the H heads side by side (T, H*h), times Wo.
    Your rope and causal_mask above may help.
    """
    raise NotImplementedError


def geglu(x, Wgate, bgate, Wup, bup, Wdown, bdown):
    """The GeGLU MLP: (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown.

    x (T, D), Wgate and Wup (D, F), bgate and bup (F,), Wdown (F, D), bdown (D,) -> (T, D).
    gelu is the tanh approximation: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
    """
    raise NotImplementedError


def tied_logits(x, E, final_norm, out_norm, eps):
    """The tied output: rmsnorm(x, final_norm) . rmsnorm(E, out_norm)^T.

    x (T, D) the residual stream after the last layer, E (V, D) the embedding, final_norm and
    out_norm (D,) gains -> (T, V) logits. Every row of E is normalised with the out_norm gain.
    (The model then multiplies these dot products by its output gain, 1/sqrt(D) by default: lesson 0,
    section 4. Leave that out here.)
    """
    raise NotImplementedError


def param_count(V, D, H, K, h, F, layers):
    """How many numbers a one-level model holds (count_params(init_params(cfg))), from its sizes.

    Lesson 0, section 1 lists the arrays. Count every one of them, biases, norm gains and the default
    output's two small tables included.
    """
    raise NotImplementedError


def unrelated_logit_std(d):
    """Predict, from the width d alone, the standard deviation of a FRESH model's raw logits over the
    tokens that are not the input token itself (lesson 0, section 4). Raw: the dot products themselves,
    as in the prototype's output (logit_scale="none"), before the default's 1/sqrt(d). Return a float.

    The check measures it on fresh models of several widths and accepts answers within 15%.
    """
    raise NotImplementedError
