"""The fractal estimators recover known exponents; the surprisal series is the model's, window by window.

Tolerances come from the estimators' measured bias and spread on exact fractional Gaussian noise
(n = 8192, 50 seeds 1000..1049, which the tests below do not use), measured with:

    python -c "import numpy as np; from tinyfractal import fractal as F
    for H in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        d = [F.parameters(F.fgn(8192, H, np.random.default_rng(s))) for s in range(1000, 1050)]
        print(H, {k: (round(np.mean([p[k] for p in d]) - H, 3), round(np.std([p[k] for p in d]), 3))
                  for k in ('H', 'S', 'J', 'H_dfa')})"

    bias (sd)  H=0.3          0.5            0.7            0.9
    R/S        +0.070 (.015)  +0.037 (.019)  +0.005 (.021)  -0.050 (.020)
    S          -0.001 (.017)  +0.001 (.027)  +0.002 (.040)  -0.027 (.051)
    J          -0.002 (.014)  -0.005 (.018)  -0.015 (.021)  -0.052 (.024)
    DFA        -0.000 (.019)  -0.004 (.025)  -0.006 (.029)  -0.007 (.031)

A test averages 8 seeds, so its tolerance is max over H of |bias| + 4 sd / sqrt(8), rounded up:
R/S 0.10, S 0.10, J 0.09, DFA 0.06. An estimator stuck at 0.5 misses H = 0.3 and 0.9 by 0.2.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyfractal as tf
from tinyfractal import fractal as F
from tinyfractal.lessons import fractal as lesson

from strategies import examples

TOLERANCE = {"H": 0.10, "S": 0.10, "J": 0.09, "H_dfa": 0.06}
HURSTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
N = 8192


def mean_parameters(make, seeds=range(8)):
    """Each estimator's mean over the series make(rng) for 8 seeds."""
    draws = [F.parameters(make(np.random.default_rng(s))) for s in seeds]
    return {k: float(np.mean([d[k] for d in draws])) for k in TOLERANCE}


@pytest.mark.parametrize("hurst", HURSTS)
def test_estimators_recover_the_hurst_exponent_of_fgn(hurst):
    """On fGn with Hurst exponent H, R/S, S, J and DFA all read H, within the tolerances of the module
    docstring (fBm is self-similar with exponent H, and its increments have spread tau^H)."""
    got = mean_parameters(lambda rng: F.fgn(N, hurst, rng))
    assert {k: abs(v - hurst) <= TOLERANCE[k] for k, v in got.items()} == {k: True for k in TOLERANCE}, got


def test_a_larger_hurst_exponent_reads_larger():
    """Each estimator's mean over 8 seeds increases strictly along H = 0.3, 0.4, ..., 0.9."""
    means = [mean_parameters(lambda rng: F.fgn(N, h, rng), seeds=range(8, 16)) for h in HURSTS]
    for k in TOLERANCE:
        series = [m[k] for m in means]
        assert all(b > a for a, b in zip(series, series[1:])), (k, series)


@pytest.mark.parametrize("noise", ["normal", "exponential", "uniform"])
def test_white_noise_reads_one_half(noise):
    """Independent draws (Gaussian or not) have no memory: S, J and DFA read 0.5 within 0.07
    (measured |bias| <= 0.026, sd of an 8-seed mean <= 0.012). R/S reads a little above 0.5 on
    finite series (measured +0.031 .. +0.041; Anis and Lloyd 1976), so it must land in [0.5, 0.57].
    Measured over seeds 1000..1049 with n = 8192, for example for exponential draws:
    python -c "import numpy as np; from tinyfractal import fractal as F
    d = [F.parameters(np.random.default_rng(s).exponential(size=8192)) for s in range(1000, 1050)]
    print({k: (np.mean([p[k] for p in d]) - 0.5, np.std([p[k] for p in d])) for k in ('H', 'S', 'J', 'H_dfa')})"
    """
    draw = {"normal": lambda r: r.standard_normal(N), "exponential": lambda r: r.exponential(size=N),
            "uniform": lambda r: r.uniform(size=N)}[noise]
    got = mean_parameters(draw)
    assert 0.5 <= got["H"] <= 0.57, got
    assert all(abs(got[k] - 0.5) <= 0.07 for k in ("S", "J", "H_dfa")), got


def test_a_random_walk_reads_one_half_from_its_increments_and_one_from_its_positions():
    """R/S, J and DFA of a coin-flip walk's increments read 0.5 (R/S up to 0.57, as for white noise);
    R/S of the positions themselves reads about 1 (measured 0.999 +- 0.010): feed increments, not sums.
    The walk lives on a lattice, so it never comes back within eps at odd tau: S refuses it."""
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.choice([-1.0, 1.0], N + 1))
    steps = np.diff(walk)
    assert 0.5 <= F.hurst_rs(steps).exponent <= 0.57
    assert abs(F.joseph(steps).exponent - 0.5) <= 0.07
    assert abs(F.dfa(steps).exponent - 0.5) <= 0.07
    assert F.hurst_rs(walk).exponent >= 0.9
    with pytest.raises(ValueError, match="eps"):
        F.self_similarity(steps)


@given(st.sampled_from([0.3, 0.5, 0.8]), st.integers(0, 2 ** 16), st.floats(1e-3, 1e3),
       st.sampled_from([1.0, -1.0]), st.floats(-1e3, 1e3))
@examples(10)
def test_exponents_are_invariant_under_affine_maps(hurst, seed, scale, sign, shift):
    """Every estimator standardises first, so x -> a*x + b (a != 0) changes no exponent (R/S, DFA and
    both fits on X see the same standardised series, up to its sign, and all four are even in it)."""
    x = F.fgn(1024, hurst, np.random.default_rng(seed))
    before, after = F.parameters(x), F.parameters(sign * scale * x + shift)
    assert all(abs(before[k] - after[k]) < 1e-6 for k in before), (before, after)


@given(st.sampled_from([0.3, 0.5, 0.8]), st.integers(0, 2 ** 16))
@examples(10)
def test_reading_a_series_backwards_changes_neither_s_nor_j(hurst, seed):
    """S and J look at every pair (t, t + tau); backwards, the tau-increments of X are the same set,
    negated, so both exponents are unchanged."""
    x = F.fgn(1000, hurst, np.random.default_rng(seed))
    assert F.self_similarity(x[::-1]).exponent == pytest.approx(F.self_similarity(x).exponent, abs=1e-9)
    assert F.joseph(x[::-1]).exponent == pytest.approx(F.joseph(x).exponent, abs=1e-9)


def test_fgn_has_the_fgn_autocovariance():
    """Over 3000 draws, the empirical covariance of Davies-Harte fGn is the fGn covariance
    gamma(k) = (|k+1|^2H - 2|k|^2H + |k-1|^2H) / 2, checked against values worked out by hand:
    H = 0.75: gamma(0) = 1, gamma(1) = 2^0.5 - 1 = 0.4142; H = 0.5: gamma(1) = 0; H = 0.25: gamma(1) =
    2^-0.5 - 1 = -0.2929. Standard error of each mean here is under 0.01; tolerance 0.04."""
    for hurst, g1 in ((0.75, 0.4142), (0.5, 0.0), (0.25, -0.2929)):
        rng = np.random.default_rng(int(hurst * 100))
        x = np.stack([F.fgn(64, hurst, rng) for _ in range(3000)])                # (draws, 64)
        assert np.mean(x[:, 10] ** 2) == pytest.approx(1.0, abs=0.04)
        assert np.mean(x[:, 20] * x[:, 21]) == pytest.approx(g1, abs=0.04)
        assert np.mean(x[:, 5] * x[:, 6]) == pytest.approx(g1, abs=0.04)
    assert F.fgn_autocovariance([0, 1], 0.75) == pytest.approx([1.0, 0.4142], abs=1e-4)


@pytest.mark.parametrize("bad, words", [
    (np.ones(500), "constant"), (np.arange(10.0), "at least"), (np.full(500, np.nan), "finite"),
    (np.ones((30, 30)), "1-D")])
def test_estimators_refuse_series_they_cannot_measure(bad, words):
    for estimator in (F.hurst_rs, F.self_similarity, F.joseph, F.dfa):
        with pytest.raises(ValueError, match=words):
            estimator(bad)


@pytest.mark.parametrize("n, hurst", [(1, 0.5), (100, 0.0), (100, 1.0), (True, 0.5)])
def test_fgn_refuses_bad_arguments(n, hurst):
    with pytest.raises(ValueError):
        F.fgn(n, hurst, np.random.default_rng(0))


MICRO = tf.Config.preset("micro")
TOKEN_VARIANTS = {"base": MICRO, "upstream": MICRO.override(coupling="upstream"),
                  "downstream": MICRO.override(coupling="downstream")}


@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
@given(st.lists(st.integers(0, 127), min_size=2, max_size=60), st.integers(1, MICRO.context), st.integers(1, 7))
@examples(10)
def test_batched_windows_equal_cached_decoding(variant, ids, keep, batch):
    """The fast path (windows as rows of batched prefills) gives every token the bits that
    teacher-forced decoding with the KV cache gives it, for any keep and batch size, in every token
    variant (a coupled node decodes with the relatives it needs)."""
    cfg = TOKEN_VARIANTS[variant]
    params = tf.init_params(cfg, 1)
    for level, index in ((0, 0), (1, 1)):
        fast = F.surprisal_bits(params, cfg, ids, level, index, keep, batch)
        reference = F.surprisal_bits_reference(params, cfg, ids, level, index, keep)
        assert fast.shape == (len(ids) - 1,)
        np.testing.assert_allclose(fast, reference, atol=1e-4)


@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
def test_the_first_window_is_read_by_the_reference_forward_pass(variant):
    """Within the first window, the bits of token t are -log2 softmax(forward_node(ids[:t]))[ids[t]],
    computed with the readable reference path of the variant and no cache."""
    cfg = TOKEN_VARIANTS[variant]
    params = tf.init_params(cfg, 2)
    ids = list(np.random.default_rng(0).integers(0, 128, cfg.context))
    for level, index in ((0, 0), (1, 0)):
        logits = np.asarray(tf.forward_node(params, cfg, level, index, np.asarray([ids]))[0], dtype=float)   # (T,V)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        want = -logp[np.arange(len(ids) - 1), ids[1:]] / np.log(2)
        np.testing.assert_allclose(F.surprisal_bits(params, cfg, ids, level, index), want, atol=1e-4)


def test_a_model_that_knows_nothing_pays_log2_v_bits_per_token():
    """With a zero embedding every logit is 0: each token costs log2(128) = 7 bits, so a token of k
    characters costs 7/k bits per character (values worked out by hand)."""
    params = tf.init_params(MICRO, 0)
    params["E"][:] = 0
    tok = tf.Tokenizer.default()
    ids = tok.encode("the king and the queen")
    z = F.surprisal(params, MICRO, tok, ids)
    lengths = [len(tok.decode([t])) for t in ids[1:]]
    np.testing.assert_allclose(z, [7.0 / k for k in lengths], atol=1e-5)


def test_bits_per_character_divides_each_token_by_its_own_length():
    tok = tf.Tokenizer.default()
    the, a = tok.encode("the"), tok.encode("a")
    assert len(the) == 1 and len(a) == 1
    np.testing.assert_allclose(F.bits_per_character([6.0, 2.0], [the[0], a[0]], tok), [2.0, 2.0])
    with pytest.raises(ValueError, match="one bit count per target"):
        F.bits_per_character([1.0], [the[0], a[0]], tok)


def test_surprisal_refuses_byte_models():
    """A byte model's positions are groups of bytes: a ValueError naming the variant, not wrong bits."""
    cfg = MICRO.override(tokenizer="bytes", vocab_size=256)
    params = tf.init_params(cfg, 0)
    for reader in (F.surprisal_bits, F.surprisal_bits_reference):
        with pytest.raises(ValueError, match="bytes variant"):
            reader(params, cfg, [1, 2, 3])


@pytest.mark.parametrize("ids, words", [([5], "at least 2"), ([1, 200], "0..127"), ([[1, 2]], "1-D")])
def test_surprisal_refuses_bad_ids(ids, words):
    with pytest.raises(ValueError, match=words):
        F.surprisal_bits(tf.init_params(MICRO, 0), MICRO, ids)


def test_generated_surprisal_has_the_requested_length():
    """A sample is re-encoded and read by the observer: exactly `length` finite values per sample."""
    params, tok = tf.init_params(MICRO, 0), tf.Tokenizer.default()
    text, z = F.generated_surprisal(params, MICRO, tok, 130, 1, 1, 1.0, seed=3)
    assert isinstance(text, str) and z.shape == (130,) and np.all(np.isfinite(z)) and np.all(z >= 0)


def test_lesson_command_line_mistakes_are_one_line_and_exit_code_2(tmp_path, capsys):
    assert lesson.main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert lesson.main(["--steps", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--steps" in err[0]
