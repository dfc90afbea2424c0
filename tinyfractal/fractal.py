"""Is language fractal? Self-similarity estimators, and the surprisal series a node assigns to a text.

Alabdulmohsin, Tran and Dehghani (2024, "Fractal Patterns May Unravel the Intelligence in Next-Token
Prediction", arXiv:2402.01825) turn a text into a number series with a language model: the surprisal
z_t = -log2 p(w_t | w_<t) of every token, in bits, normalised by the token's length. They standardise
the series to zero mean and unit variance, x_t = (z_t - mean) / std, and study its integral process

    X_t = x_1 + ... + x_t        (a random walk whose steps are the standardised surprisals)

with four exponents (their medians over many domains and PaLM-scale models in brackets):

    S   self-similarity (Holder) exponent: P(|X_{t+tau} - X_t| <= eps) ~ tau^-S        (0.59 +- 0.08)
    H   Hurst exponent, rescaled range of the increments x: E[R(n)/S(n)] ~ n^H          (0.70 +- 0.09)
    D   fractal dimension of the graph of X: D = 2 - S                                 (1.41 +- 0.08)
    J   Joseph exponent, spread of the tau-increments of X: std(X_{t+tau} - X_t) ~ tau^J (0.49 +- 0.08)

plus detrended fluctuation analysis (DFA), a second estimate of H that shares no code with R/S.
For fractional Gaussian noise with Hurst exponent H every one of them is H in theory, which is how
they are tested (`fgn` draws it exactly). H > 0.5 means long-range dependence: a surprising stretch
of text tends to be followed by more surprise, at every scale.

Every estimator standardises its input first, so all of them are unchanged by x -> a*x + b (a != 0):
dividing each surprisal by one constant (bits per token -> bits per average character) would change
nothing. What matters is dividing each token by ITS OWN length, `bits_per_character`.

The surprisal series of a node (`surprisal_bits`) runs the node over the text with a KV cache and a
sliding window (`decoder.decode`, teacher-forced: the "chosen" next token is the real one), and a fast
path runs the same windows as one batched prefill; a test proves the two equal. Token variants (base,
upstream, downstream: a coupled node runs with the relatives it needs) are read; byte models are refused.
"""
from dataclasses import dataclass

import numpy as onp

from tinyfractal.inference import decoder
from tinyfractal.inference.sample import generate
from tinyfractal.variants import unsupported, variant_of

MIN_LENGTH = 128      # R/S and DFA fit windows of 16 .. N/4 points: fewer than 128 leaves under a factor 2
LN2 = float(onp.log(2.0))
EPS = 0.2             # the ball of S, in standard deviations of one step: measured on fGn, 0.1 fails on
                      # short series (no return within eps at some tau) and 0.5 starts to bias S downwards


@dataclass(frozen=True)
class Fit:
    """A power law fitted in log-log space: log(values) = slope * log(scales) + intercept.

    `exponent` is the parameter the fit estimates (the slope, or minus it for S).
    """
    name: str
    exponent: float
    slope: float
    intercept: float
    scales: onp.ndarray
    values: onp.ndarray

    def line(self, scales):
        """The fitted power law at the given scales (for plotting)."""
        return onp.exp(self.intercept) * onp.asarray(scales, dtype=float) ** self.slope


def as_series(x, min_length=MIN_LENGTH):
    """A 1-D float64 copy of x, or ValueError if it is not a long enough, finite, non-constant series."""
    x = onp.asarray(x, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"a series must be 1-D, got shape {x.shape}")
    if len(x) < min_length:
        raise ValueError(f"a series needs at least {min_length} points for a log-log fit, got {len(x)}")
    if not onp.all(onp.isfinite(x)):
        raise ValueError("the series holds NaN or infinite values; every point must be finite")
    if onp.std(x) <= 1e-12 * max(1.0, float(onp.max(onp.abs(x)))):
        raise ValueError("the series is constant: it has no fluctuations to measure")
    return x


def standardise(x):
    """x_t -> (x_t - mean(x)) / std(x): zero mean, unit variance (the paper's normalisation)."""
    x = as_series(x)
    return (x - x.mean()) / x.std()


def integral_process(x):
    """X_0 = 0, X_t = x_1 + ... + x_t of the standardised series: (N,) -> (N+1,).

    Starting at 0 makes X_{t+tau} - X_t run over every stretch of tau consecutive steps exactly once.
    """
    return onp.concatenate([[0.0], onp.cumsum(standardise(x))])


def log_scales(lo, hi, count=24):
    """About `count` distinct integers from lo to hi, evenly spaced in log scale."""
    if not 1 <= lo < hi:
        raise ValueError(f"scales need 1 <= lo < hi, got lo={lo}, hi={hi}; the series may be too short")
    return onp.unique(onp.round(onp.geomspace(lo, hi, count)).astype(int))


def fit_power_law(name, scales, values, sign=1.0):
    """Least squares of log(values) on log(scales); the exponent is sign * slope."""
    scales, values = onp.asarray(scales, dtype=float), onp.asarray(values, dtype=float)
    if len(scales) < 3:
        raise ValueError(f"{name}: a fit needs at least 3 scales, got {len(scales)}; the series is too short")
    if not onp.all(values > 0):
        # dropping the zeros would bias the slope; a zero means eps is too small for this series, or its
        # values sit on a lattice (a coin-flip walk never returns within eps at odd tau)
        raise ValueError(f"{name}: the statistic is 0 at scales {scales[values <= 0].astype(int).tolist()}; "
                         f"use a longer series or a larger eps")
    slope, intercept = onp.polyfit(onp.log(scales), onp.log(values), 1)
    return Fit(name, float(sign * slope), float(slope), float(intercept), scales, values)


def default_max_scale(n):
    """The largest time scale fitted: n/32, so that each scale has at least 32 non-overlapping samples."""
    return max(4, n // 32)


def hurst_rs(x, min_window=16, max_window=None):
    """Hurst exponent by rescaled range (R/S) analysis of the increments x (not of their sum).

    Cut x into floor(N/n) blocks of n points. In each block, Y_k = sum_{i<=k} (x_i - mean of the block),
    R(n) = max_k Y_k - min_k Y_k and S(n) = std of the block. Then E[R(n)/S(n)] ~ c * n^H, fitted over
    window sizes n from `min_window` to `max_window` (default N/4). The slope is H (0.5 for white noise).
    """
    x = standardise(x)
    N = len(x)
    max_window = max_window or N // 4
    ratios, sizes = [], log_scales(min_window, max_window)
    for n in sizes:
        blocks = x[:N // n * n].reshape(N // n, n)                               # (blocks, n)
        Y = onp.cumsum(blocks - blocks.mean(axis=1, keepdims=True), axis=1)
        R, S = Y.max(axis=1) - Y.min(axis=1), blocks.std(axis=1)
        ok = S > 0
        ratios.append(onp.mean(R[ok] / S[ok]) if ok.any() else 0.0)
    return fit_power_law("H (R/S)", sizes, ratios)


def self_similarity(x, eps=EPS, max_scale=None):
    """Self-similarity (Holder) exponent S from the peak probability of the integral process X.

    p_tau = P(|X_{t+tau} - X_t| <= eps), over every t, for tau = 1 .. max_scale (default N/32).
    If X is self-similar, X_{t+tau} - X_t has the law of tau^S * (X_{t+1} - X_t), so for eps small
    against the spread, p_tau ~ 2 eps f(0) tau^-S (f: the density of one increment): S = -slope.
    (A small ball, not a large excursion: P(|dX| > eps) tends to 1 and has no power law.)
    The paper fixes a small eps and checks that S does not depend on it; `eps` is in units of the
    standard deviation of one step of X, which is 1. For Gaussian steps the small-ball approximation
    errs by a factor 1 - eps^2 / (6 sigma_tau^2) at most, under 1% at eps = 0.2.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    X = integral_process(x)
    taus = log_scales(1, max_scale or default_max_scale(len(X)))
    p = [onp.mean(onp.abs(X[tau:] - X[:-tau]) <= eps) for tau in taus]
    return fit_power_law("S (peak probability)", taus, p, sign=-1.0)


def joseph(x, max_scale=None):
    """Joseph exponent J: how the spread of the tau-increments of X grows with tau.

    sigma_tau = std over t of (X_{t+tau} - X_t) ~ tau^J, for tau = 1 .. max_scale (default N/32),
    the quantity the paper plots against tau for J. Brownian motion gives 1/2; fractional Brownian
    motion gives its H. (Some work on the Joseph, Noah and Moses effects measures a "Joseph exponent"
    with the rescaled range instead, which is this module's H; the names here follow Alabdulmohsin et al.)
    """
    X = integral_process(x)
    taus = log_scales(1, max_scale or default_max_scale(len(X)))
    sigma = [onp.std(X[tau:] - X[:-tau]) for tau in taus]
    return fit_power_law("J (increment spread)", taus, sigma)


def dfa(x, min_window=16, max_window=None):
    """Detrended fluctuation analysis (DFA-1): a second estimate of H, independent of R/S.

    Profile Y_t = sum_{k<=t} (x_k - mean x). Cut Y into floor(N/n) blocks of n points, subtract from
    each block its least-squares line, and let F(n) = sqrt(mean of the squared residuals over all
    blocks). Then F(n) ~ n^alpha; for fractional Gaussian noise alpha = H.
    """
    x = standardise(x)
    N = len(x)
    Y = onp.cumsum(x)
    max_window = max_window or N // 4
    sizes, F = log_scales(min_window, max_window), []
    for n in sizes:
        blocks = Y[:N // n * n].reshape(N // n, n)                                # (blocks, n)
        t = onp.arange(n) - (n - 1) / 2.0                                          # centred time
        slope = blocks @ t / (t @ t)                                               # (blocks,)
        resid = blocks - blocks.mean(axis=1, keepdims=True) - slope[:, None] * t
        F.append(onp.sqrt(onp.mean(resid ** 2)))
    return fit_power_law("H (DFA)", sizes, F)


def fits(x, eps=EPS):
    """All four fits of one series: {"H": R/S, "S": peak probability, "J": increment spread, "DFA": DFA}."""
    return {"H": hurst_rs(x), "S": self_similarity(x, eps), "J": joseph(x), "DFA": dfa(x)}


def parameters(x, eps=EPS):
    """The fractal parameters of a series as floats: H, S, D = 2 - S, J, and H_dfa."""
    f = fits(x, eps)
    return {"H": f["H"].exponent, "S": f["S"].exponent, "D": 2.0 - f["S"].exponent, "J": f["J"].exponent,
            "H_dfa": f["DFA"].exponent}


def fgn_autocovariance(k, hurst):
    """gamma(k) = (|k+1|^2H - 2|k|^2H + |k-1|^2H) / 2: fractional Gaussian noise of unit variance."""
    k = onp.abs(onp.asarray(k, dtype=float))
    h2 = 2.0 * hurst
    return 0.5 * (onp.abs(k + 1) ** h2 - 2.0 * k ** h2 + onp.abs(k - 1) ** h2)


def fgn(n, hurst, rng):
    """n points of fractional Gaussian noise with Hurst exponent `hurst`, exactly (Davies and Harte, 1987).

    Embed the n x n Toeplitz covariance in a circulant of size M = 2n whose first row is
    c = (gamma(0), ..., gamma(n), gamma(n-1), ..., gamma(1)). A circulant is diagonalised by the FFT:
    its eigenvalues are lambda = FFT(c), all >= 0 for fGn. With Z complex standard normal (E|Z_k|^2 = 2),
    Y = FFT(sqrt(lambda / M) * Z) has real part with covariance exactly circulant(c), whose top-left
    n x n block is the fGn covariance. Cost O(n log n); NumPy only.
    """
    if isinstance(n, bool) or not isinstance(n, (int, onp.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not 0 < hurst < 1:
        raise ValueError(f"the Hurst exponent of fGn must be in (0, 1), got {hurst!r}")
    gamma = fgn_autocovariance(onp.arange(n + 1), hurst)
    c = onp.concatenate([gamma, gamma[-2:0:-1]])                                   # (2n,)
    lam = onp.fft.fft(c).real
    if lam.min() < -1e-9 * lam.max():
        raise ValueError(f"circulant embedding failed for H={hurst} (negative eigenvalue {lam.min():.2e})")
    M = len(c)
    Z = rng.standard_normal(M) + 1j * rng.standard_normal(M)
    return onp.fft.fft(onp.sqrt(onp.clip(lam, 0, None) / M) * Z).real[:n]


def check_ids(ids, cfg):
    """Token ids as a list of ints in [0, vocab_size), at least 2 of them; else ValueError."""
    arr = onp.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    if len(arr) < 2:
        raise ValueError(f"a surprisal series needs at least 2 tokens, got {len(arr)}")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}, got values {arr.min()}..{arr.max()}")
    return [int(t) for t in arr]


def check_keep(keep, cfg):
    """The tokens a full window slides back to: default context // 2 (see `surprisal_bits`).

    Token variants (base, upstream, downstream) are read here; byte models raise a ValueError.
    """
    v = variant_of(cfg)
    if v.name == "bytes":
        raise unsupported(v, "a surprisal series per token", "its positions are groups of bytes, one "
                          "distribution per slot; this module reads one token per position")
    return decoder.check_keep(max(1, cfg.context // 2) if keep is None else keep, cfg.context)


def token_bits(logits, target):
    """-log2 softmax(logits)[target], in float64: logits (V,) -> bits."""
    z = onp.asarray(logits, dtype=float)
    top = z.max()
    return (top + onp.log(onp.exp(z - top).sum()) - z[target]) / LN2


def surprisal_bits_reference(params, cfg, ids, level=0, index=0, keep=None):
    """Bits of ids[1:] under node (level, index), decoding one token at a time with the KV cache.

    Teacher forcing: `decoder.decode` starts from ids[0] and its `choose` returns the real next token
    after reading the bits the model gave it. Windows slide as in decoding: when `context` tokens are
    cached, the cache restarts from the last `keep` of them. (N-1,) float64.
    """
    ids, keep = check_ids(ids, cfg), check_keep(keep, cfg)
    future, bits = iter(ids[1:]), []

    def choose(logits):
        target = next(future)
        bits.append(token_bits(logits, target))
        return target

    decoder.decode(decoder.node_decoder(params, cfg, level, index), ids[:1], len(ids) - 1, choose, keep)
    return onp.asarray(bits)


def windows(n, context, keep):
    """The windows teacher-forced decoding of n tokens runs: [(start, first scored input, end)].

    Window 0 is ids[0:context] and scores every input in it. Each later window restarts from the last
    `keep` tokens, so it starts `context - keep + 1` after the previous one and scores its inputs
    keep-1 .. context-1 (each sees between keep and context tokens). Input j predicts token j+1.
    """
    stride, out = context - keep + 1, [(0, 0, min(context, n - 1))]
    start = stride
    while start + keep <= n - 1:
        out.append((start, keep - 1, min(context, n - 1 - start)))
        start += stride
    return out


def surprisal_bits(params, cfg, ids, level=0, index=0, keep=None, batch=64):
    """Bits of ids[1:] under node (level, index): the same windows as `surprisal_bits_reference`,
    each window a row of one batched prefill through the cache code. (N-1,) float64.

    keep: the tokens a full window slides back to (default context // 2), so every token after the
    first window is predicted from between keep and context tokens of text before it.
    """
    ids, keep = check_ids(ids, cfg), check_keep(keep, cfg)
    dec = decoder.node_decoder(params, cfg, level, index)
    arr, bits = onp.asarray(ids), onp.empty(len(ids) - 1)
    spans = windows(len(ids), cfg.context, keep)
    groups = {}                                   # windows of one length run together
    for span in spans:
        groups.setdefault(span[2], []).append(span)
    for length, group in groups.items():
        for b in range(0, len(group), batch):
            part = group[b:b + batch]
            rows = onp.stack([arr[s:s + length] for s, _, _ in part])            # (B,length)
            logits, _ = decoder.prefill(dec, rows)                               # (1,B,length,V)
            logp = log_softmax(logits[0])                                        # (B,length,V)
            for row, (s, first, end) in enumerate(part):
                j = onp.arange(first, end)
                bits[s + j] = -logp[row, j, arr[s + j + 1]] / LN2
    return bits


def log_softmax(logits):
    """(..., V) -> (..., V) log-probabilities in float64."""
    z = onp.asarray(logits, dtype=float)
    z = z - z.max(axis=-1, keepdims=True)
    return z - onp.log(onp.exp(z).sum(axis=-1, keepdims=True))


def token_lengths(tokenizer):
    """(V,) characters each token decodes to."""
    return onp.array([len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)])


def bits_per_character(bits, targets, tokenizer):
    """Each token's bits divided by the characters it decodes to: bits[t] / len(decode(targets[t])).

    The paper divides by bytes; input.txt is ASCII, so here characters are bytes. A 3-letter token
    "the" that cost 3 bits counts as 1 bit per character, the same as a 1-letter token that cost 1 bit.
    """
    bits, targets = onp.asarray(bits, dtype=float), onp.asarray(targets)
    if bits.shape != targets.shape:
        raise ValueError(f"one bit count per target token: got {bits.shape} bits for {targets.shape} targets")
    return bits / token_lengths(tokenizer)[targets]


def surprisal(params, cfg, tokenizer, ids, level=0, index=0, keep=None):
    """z_t in bits per character of ids[1:] under node (level, index): `surprisal_bits` / token length."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.vocab_size}")
    ids = check_ids(ids, cfg)
    return bits_per_character(surprisal_bits(params, cfg, ids, level, index, keep), ids[1:], tokenizer)


def generated_surprisal(params, cfg, tokenizer, length, level, index, temperature, seed=0, observer=(0, 0),
                        keep=None, prompt="\n"):
    """Text sampled from node (level, index), read by the observer node: (text, z of `length` tokens).

    The sample is decoded back to text and re-encoded, so the observer reads it tokenized the way it
    reads real text. The first `context` tokens are dropped: they are predicted from less context than
    the rest. Sampling and scoring use the same sliding window (`keep`).
    """
    keep = check_keep(keep, cfg)
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise ValueError(f"length must be an integer >= {MIN_LENGTH}, got {length!r}")
    text, rounds = prompt, 0
    while True:
        # re-encoding merges some sampled token pairs (under 1% fewer tokens for a trained model; a
        # degenerate one that repeats a letter can lose half), so sample more until the text is long enough
        need = cfg.context + length + 1 - (len(tokenizer.encode(text)) if rounds else 0)
        text = generate(params, cfg, tokenizer, text, level, index, need + need // 16 + 8, temperature,
                        seed=seed + 7919 * rounds, keep=keep)
        ids, rounds = tokenizer.encode(text), rounds + 1
        if len(ids) >= cfg.context + length + 1:
            break
        if rounds == 20:
            raise RuntimeError(f"after 20 rounds of sampling the text re-encodes to only {len(ids)} tokens")
    z = surprisal(params, cfg, tokenizer, ids, *observer, keep=keep)[cfg.context:]
    return text, z[:length]


def segments(z, length):
    """The series cut into consecutive, non-overlapping pieces of `length`: (pieces, length)."""
    z = onp.asarray(z, dtype=float)
    if length < MIN_LENGTH or len(z) < length:
        raise ValueError(f"cannot cut {len(z)} points into segments of {length} (need {MIN_LENGTH} <= length <= {len(z)})")
    return z[:len(z) // length * length].reshape(-1, length)


def real_vs_generated(params, cfg, tokenizer, real_z, nodes, temperatures, length, seeds=(0,),
                      observer=(0, 0), keep=None, eps=EPS, log=None):
    """Fractal parameters of real text and of text generated by each node at each temperature.

    The real rows are the observer's surprisal of the real text, `real_z`, cut into segments of
    `length`; each generated row is one sample of `length` scored tokens, read by the same observer.
    Returns a list of dicts: source ("real" or "(l,j)"), temperature, seed, mean_z, H, S, D, J, H_dfa.
    A sample whose series cannot be fitted (a model that repeats one token) gets NaN parameters and
    a "failed" entry saying why.
    """
    rows = []
    for i, piece in enumerate(segments(real_z, length)):
        rows.append({"source": "real", "temperature": None, "seed": i, "mean_z": float(piece.mean()),
                     **parameters(piece, eps)})
    jobs = [(node, t, s) for node in nodes for t in temperatures for s in seeds]
    for done, ((level, index), t, s) in enumerate(jobs, 1):
        _, z = generated_surprisal(params, cfg, tokenizer, length, level, index, t, s, observer, keep)
        row = {"source": f"({level},{index})", "temperature": t, "seed": s, "mean_z": float(z.mean())}
        try:
            row.update(parameters(z, eps))
        except ValueError as e:   # a degenerate sample (one token repeated) has no fluctuations to fit
            row.update({k: float("nan") for k in ("H", "S", "D", "J", "H_dfa")}, failed=str(e))
        rows.append(row)
        if log:
            log(done, len(jobs), rows[-1])
    return rows
