"""The fused primitives of tinyfractal/core/ops.py prove themselves: values, check_grads, float32.

For every primitive: its values equal the plain autograd.numpy reference next to it (float64), its
hand-written VJP passes autograd's check_grads in float64, and a float32 run agrees with the
reference in value and gradient, with float32 gradients. Shapes are small and random, size-1 axes
included.
"""
import contextlib
import gc
import os
import time
import warnings

import numpy as np
import pytest
from autograd import grad
import autograd.numpy as anp
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st

from strategies import examples
from tinyfractal.core import machinery, ops


def seeds():
    return st.integers(0, 2 ** 32 - 1)


@st.composite
def linear_args(draw):
    """x (N, lead..., A...) and W (N, A..., out...): `axes` contracted axes, any lead and out shapes."""
    N, axes = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    lead, contracted, out = (tuple(draw(st.lists(st.integers(1, 3), min_size=lo, max_size=2)))
                             for lo in (1, axes, 1))
    contracted = contracted[:axes]
    rng = np.random.default_rng(draw(seeds()))
    x, W = rng.normal(size=(N,) + lead + contracted), rng.normal(size=(N,) + contracted + out)
    if draw(st.booleans()):
        return ((lambda x, W: ops.linear(x, W, axes=axes)), (lambda x, W: ops.linear_reference(x, W, axes=axes))), (x, W)
    b = rng.normal(size=(N,) + out)
    return ((lambda x, W, b: ops.linear(x, W, b, axes)), (lambda x, W, b: ops.linear_reference(x, W, b, axes))), (x, W, b)


@st.composite
def rmsnorm_args(draw):
    N, d = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    mid = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    eps = draw(st.sampled_from([1e-6, 1e-2]))
    rng = np.random.default_rng(draw(seeds()))
    x, g = rng.normal(size=(N,) + mid + (d,)), rng.normal(0, 0.5, size=(N, d))
    return ((lambda x, g: ops.rmsnorm(x, g, eps)), (lambda x, g: ops.rmsnorm_reference(x, g, eps))), (x, g)


@st.composite
def embedding_args(draw):
    N, V, d, B, T = (draw(st.integers(1, 4)) for _ in range(5))
    rng = np.random.default_rng(draw(seeds()))
    ids = rng.integers(0, V, size=(B, T))          # small V: ids repeat, so the gradient must sum them
    return ((lambda E: ops.embedding(E, ids)), (lambda E: ops.embedding_reference(E, ids))), (rng.normal(size=(N, V, d)),)


@st.composite
def geglu_args(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    rng = np.random.default_rng(draw(seeds()))
    return (ops.geglu, ops.geglu_reference), (rng.normal(0, scale, size=shape), rng.normal(size=shape))


@st.composite
def attention_args(draw):
    N, B, T = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 9))
    K = draw(st.integers(1, 2))
    H = K * draw(st.integers(1, 3))
    h = 2 * draw(st.integers(1, 3))
    theta, start = draw(st.sampled_from([10.0, 100.0, 1e4])), draw(st.integers(0, 7))
    block = draw(st.sampled_from([1, 2, 3, 64]))       # one causal block, or several, or ragged ones
    rng = np.random.default_rng(draw(seeds()))

    def fast(q, k, v):
        saved, ops.ATTENTION_BLOCK = ops.ATTENTION_BLOCK, block
        try:
            return ops.causal_attention(q, k, v, theta, start)
        finally:
            ops.ATTENTION_BLOCK = saved

    def reference(q, k, v):
        return ops.causal_attention_reference(q, k, v, theta, start)
    return (fast, reference), (rng.normal(size=(N, B, T, H, h)), rng.normal(size=(N, B, T, K, h)),
                               rng.normal(size=(N, B, T, K, h)))


@st.composite
def cross_entropy_args(draw):
    N, B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(seeds()))
    targets = rng.integers(0, V, size=(B, T))
    return ((lambda x: ops.cross_entropy(x, targets)), (lambda x: ops.cross_entropy_reference(x, targets))), \
        (rng.normal(0, 3, size=(N, B, T, V)),)


PRIMITIVES = {"linear": linear_args(), "rmsnorm": rmsnorm_args(), "embedding": embedding_args(),
              "geglu": geglu_args(), "causal_attention": attention_args(), "cross_entropy": cross_entropy_args()}


MODES = ["inline", "split"]


@contextlib.contextmanager
def threading_mode(mode):
    """'inline': everything in the calling thread; 'split': every op forced to split its work over two
    worker threads (even these tiny shapes), so the chunking code is checked too."""
    with machinery.forced_split(2 if mode == "split" else 1):
        yield


def weighted_sum(f, weights):
    """A scalar of f's output that depends on every entry: sum(f(...) * weights)."""
    return lambda *args: anp.sum(f(*args) * weights)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@examples(15)
@given(data=st.data())
def test_primitive_equals_its_plain_reference_in_float64(name, mode, data):
    """Value law: each fused primitive computes the same numbers as its plain autograd.numpy reference."""
    (fast, reference), args = data.draw(PRIMITIVES[name])
    with threading_mode(mode):
        np.testing.assert_allclose(fast(*args), reference(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@examples(10)
@given(data=st.data())
def test_primitive_gradient_passes_check_grads_in_float64(name, mode, data):
    """Gradient law: each hand-written VJP agrees with finite differences (autograd's check_grads)."""
    (fast, _), args = data.draw(PRIMITIVES[name])
    np.random.seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    with threading_mode(mode):
        check_grads(fast, modes=["rev"], order=1, argnum=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@examples(10)
@given(data=st.data())
def test_primitive_in_float32_agrees_with_the_reference_and_keeps_float32(name, mode, data):
    """float32 law: in float32 the primitive's value and gradient agree with the float64 reference within
    float32 rounding, and its output and every gradient stay float32."""
    (fast, reference), args64 = data.draw(PRIMITIVES[name])
    args32 = tuple(a.astype(np.float32) for a in args64)
    with threading_mode(mode):
        out32 = fast(*args32)
        weights = np.random.default_rng(0).normal(size=np.shape(out32))
        g32 = grad(weighted_sum(fast, weights.astype(np.float32)), tuple(range(len(args32))))(*args32)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, reference(*args64), rtol=2e-4, atol=2e-4)
    g64 = grad(weighted_sum(reference, weights), tuple(range(len(args64))))(*args64)
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(b).max()))


def test_geglu_far_into_the_tails_is_finite_and_silent():
    """GeGLU law: gelu(a) -> 0 for a -> -inf and -> a for a -> +inf, with no overflow warning and finite
    gradients (autograd's tanh rule 1/cosh² overflowed there)."""
    a = np.array([-1e4, -200.0, -60.0, -10.0, 10.0, 60.0, 200.0, 1e4], dtype=np.float32)
    u = np.ones_like(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.geglu(a, u)
        da, du = grad(lambda a, u: anp.sum(ops.geglu(a, u)), (0, 1))(a, u)
    np.testing.assert_allclose(out, np.where(a < 0, 0.0, a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(da, np.where(a < 0, 0.0, 1.0), atol=1e-6)
    assert np.isfinite(du).all()


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@examples(8)
@given(data=st.data())
def test_splitting_work_over_threads_changes_no_number_beyond_rounding(name, data):
    """Threading law: each primitive's value and gradient are the same (to float32 rounding of a sum's
    order) whether its work runs in one piece or is split over worker threads."""
    (fast, _), args = data.draw(PRIMITIVES[name])
    args = tuple(a.astype(np.float32) for a in args)
    weights = np.random.default_rng(1).normal(size=np.shape(fast(*args))).astype(np.float32)
    argnum = tuple(range(len(args)))
    results = []
    for mode in MODES:
        with threading_mode(mode):
            results.append((fast(*args), grad(weighted_sum(fast, weights), argnum)(*args)))
    (out1, g1), (out2, g2) = results
    np.testing.assert_allclose(out1, out2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_rows_see_only_the_past():
    """Causality law: changing the keys and values at position t leaves the outputs before t unchanged."""
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(2, 1, 9, 2, 4)), rng.normal(size=(2, 1, 9, 1, 4)), rng.normal(size=(2, 1, 9, 1, 4))
    saved, ops.ATTENTION_BLOCK = ops.ATTENTION_BLOCK, 4
    try:
        before = ops.causal_attention(q, k, v, 100.0)
        k2, v2 = k.copy(), v.copy()
        k2[:, :, 5:] += 1.0
        v2[:, :, 5:] -= 2.0
        after = ops.causal_attention(q, k2, v2, 100.0)
    finally:
        ops.ATTENTION_BLOCK = saved
    np.testing.assert_array_equal(before[:, :, :5], after[:, :, :5])
    assert not np.allclose(before[:, :, 5:], after[:, :, 5:])


def test_saved_results_are_released_after_the_backward_and_after_a_plain_forward():
    """Memory law: what a forward keeps for its backward is gone once the gradient has been taken, and
    once the output of a forward without gradient is dropped."""
    rng = np.random.default_rng(4)
    q, k, v = rng.normal(size=(1, 2, 5, 2, 4)), rng.normal(size=(1, 2, 5, 1, 4)), rng.normal(size=(1, 2, 5, 1, 4))
    gc.collect()
    before = len(ops._saved)
    grad(lambda q: anp.sum(ops.rmsnorm(ops.causal_attention(q, k, v, 100.0)[:, :, :, 0], np.zeros((1, 4)), 1e-6)))(q)
    gc.collect()
    assert len(ops._saved) == before
    out = ops.causal_attention(q, k, v, 100.0)
    assert len(ops._saved) == before + 1
    del out
    gc.collect()
    assert len(ops._saved) == before


def test_bad_attention_shapes_are_refused_with_a_clear_error():
    """Error law: q, k, v whose head counts or head dims do not fit give a ValueError naming the shapes."""
    q, k = np.zeros((1, 1, 3, 3, 4)), np.zeros((1, 1, 3, 2, 4))
    with pytest.raises(ValueError, match="K dividing H"):
        ops.causal_attention(q, k, k, 100.0)
    with pytest.raises(ValueError, match="one shape"):
        ops.geglu(np.zeros(3), np.zeros(4))


def test_free_core_estimate_stays_within_the_machine():
    """Threads law: the estimate of cores that other processes leave free is a number no larger than the
    machine's core count (our own busy loop in between is not taken for another process's load)."""
    meter = machinery._FreeCores(every=0.05)
    meter()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        pass
    free = meter()
    assert isinstance(free, float) and free <= (os.cpu_count() or 1) + 1e-9
