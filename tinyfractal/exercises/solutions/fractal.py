"""Reference solutions to the exercises of lesson 7, is Shakespeare fractal? (handout: lessons/fractal.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check fractal --solutions

x is a 1-D NumPy array of float64: a series such as the surprisals z_t of lesson 7, one number per
token. Write these with NumPy alone; tinyfractal/fractal.py holds the engine's versions, which the
checks compare yours with, so do not call it here.
"""
import numpy as np


def token_bits(logits, target):
    """The surprisal of one token in bits: -log2 softmax(logits)[target].

    logits (V,) float64, target an int in 0..V-1 -> a float. Large logits (hundreds) must not overflow.
    """
    z = np.asarray(logits, dtype=np.float64)
    top = z.max()                                   # log-sum-exp with the largest logit taken out
    log_sum = top + np.log(np.sum(np.exp(z - top)))
    return float((log_sum - z[target]) / np.log(2.0))


def integral_process(x):
    """The random walk of a series: standardise x to zero mean and unit variance,
    x_t -> (x_t - mean) / std (np.std, no ddof), then X_0 = 0, X_t = x_1 + ... + x_t.

    (N,) -> (N+1,).
    """
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum((x - x.mean()) / x.std())])


def rescaled_range(x, n):
    """The mean rescaled range R/S of x over blocks of n points.

    Cut x into floor(N/n) consecutive blocks of n points (drop the rest). In each block,
    Y_k = sum_{i<=k} (x_i - mean of the block), R = max_k Y_k - min_k Y_k and S = the standard
    deviation of the block (np.std). Return the mean of R/S over the blocks, a float.
    """
    x = np.asarray(x, dtype=np.float64)
    blocks = x[:len(x) // n * n].reshape(-1, n)                                  # (blocks, n)
    Y = np.cumsum(blocks - blocks.mean(axis=1, keepdims=True), axis=1)
    R, S = Y.max(axis=1) - Y.min(axis=1), blocks.std(axis=1)
    return float(np.mean(R / S))


def hurst(x, windows):
    """The Hurst exponent H of x by rescaled range: the slope of the least-squares line through the
    points (log n, log mean R/S over blocks of n), one point per window size n in `windows`. A float."""
    ratios = [rescaled_range(x, int(n)) for n in windows]
    slope, _ = np.polyfit(np.log(np.asarray(windows, dtype=np.float64)), np.log(ratios), 1)
    return float(slope)


def self_similarity(x, eps, taus):
    """The self-similarity exponent S of x, and with it the fractal dimension D = 2 - S.

    Let X be the integral process of x (standardised, X_0 = 0). For each tau in `taus`,
    p_tau = the fraction of t = 0 .. len(X)-1-tau with |X_{t+tau} - X_t| <= eps. Then p_tau ~ tau^(-S):
    return S = MINUS the least-squares slope of log p_tau against log tau. A float.
    """
    X = integral_process(x)
    p = [np.mean(np.abs(X[tau:] - X[:-tau]) <= eps) for tau in taus]
    slope, _ = np.polyfit(np.log(np.asarray(taus, dtype=np.float64)), np.log(p), 1)
    return float(-slope)
