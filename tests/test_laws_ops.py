"""Laws 10-11: the operators the model is built from, and its gradients.

Every reference here is written plainly in this file from the formulas in docs/design.md (loops and
hand-derived derivatives), never taken from the code under test.
"""
import tinyfractal as tf
from tinyfractal.core import formulas
import importlib
import importlib.util
import math

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies import array_paths, examples, get, models
from tinyfractal.core import fast
from tinyfractal.core import model
from tinyfractal.core.tree import stacked_blocks, stacked_blocks_np

small_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def finite(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# Law 10: operator laws

@st.composite
def rows_and_scale(draw):
    """(x, g, c): rows with root-mean-square >= 1e-3 (so 0/0 never arises), a gain, and c > 0."""
    shape = draw(small_shapes)
    x = draw(arrays(np.float64, shape, elements=finite(-100, 100)))
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    x = np.where(rms < 1e-3, 1.0, x)
    g = draw(arrays(np.float64, shape[-1:], elements=finite(-2, 2)))
    c = draw(finite(1e-3, 1e3))
    return x, g, c


@examples(200)
@given(rows_and_scale())
def test_rmsnorm_is_scale_invariant(args):
    """Operator law: rmsnorm(c*x) = rmsnorm(x) for every c > 0 (eps = 0), and with gain 0 every output row
    has root-mean-square 1; the level-batched norm (a gain per model) obeys the same law."""
    x, g, c = args
    np.testing.assert_allclose(formulas.rmsnorm(c * x, g, 0.0), formulas.rmsnorm(x, g, 0.0), rtol=1e-12, atol=1e-12)
    y = formulas.rmsnorm(x, np.zeros_like(g), 0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, rtol=1e-12)
    stacked, gains = x[None], g[None]
    np.testing.assert_allclose(fast.norm(c * stacked, gains, 0.0), fast.norm(stacked, gains, 0.0),
                               rtol=1e-12, atol=1e-12)


@st.composite
def score_rows(draw):
    """Rows of attention scores: large values, and masked entries (-1e30), but never a fully masked row."""
    shape = draw(small_shapes)
    x = draw(arrays(np.float64, shape, elements=finite(-1e4, 1e4)))
    masked = draw(arrays(bool, shape))
    masked[..., 0] = False
    return np.where(masked, -1e30, x)


@examples(200)
@given(score_rows(), finite(-1e3, 1e3))
def test_softmax_rows_sum_to_one(x, shift):
    """Operator law: every row of softmax(x) is in [0, 1] and sums to 1, masked entries get exactly 0,
    and softmax(x + c) = softmax(x), in float64 and float32."""
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        p = formulas.softmax(x.astype(dtype))
        assert p.dtype == dtype and p.shape == x.shape
        assert np.all(p >= 0) and np.all(p <= 1)
        np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, rtol=tol, atol=tol)
        assert np.all(p[x == -1e30] == 0)
    np.testing.assert_allclose(formulas.softmax(x + shift), formulas.softmax(x), atol=1e-9)


def rope_one(v, pos, theta):
    """RoPE of one vector (h,) at position pos via the library's tables: (h,)."""
    cos, sin = formulas.rope_tables(1, len(v), theta, start=pos)
    return formulas.rope(v.reshape(1, 1, len(v)), cos, sin).reshape(len(v))


head_dims = st.integers(1, 8).map(lambda n: 2 * n)
thetas = st.sampled_from([10.0, 100.0, 10000.0]) | finite(2.0, 1e4)


@examples(200)
@given(head_dims.flatmap(lambda h: st.tuples(arrays(np.float64, h, elements=finite(-3, 3)),
                                             arrays(np.float64, h, elements=finite(-3, 3)))),
       st.integers(0, 64), st.integers(0, 64), st.integers(0, 64), thetas)
def test_rope_dot_products_depend_only_on_relative_position(qk, m, n, shift, theta):
    """Operator law (RoPE): <rope(q, m), rope(k, n)> depends only on m - n:
    it equals <rope(q, m + d), rope(k, n + d)> for every shift d."""
    q, k = qk
    here = np.dot(rope_one(q, m, theta), rope_one(k, n, theta))
    there = np.dot(rope_one(q, m + shift, theta), rope_one(k, n + shift, theta))
    bound = np.linalg.norm(q) * np.linalg.norm(k)
    assert abs(here - there) <= 1e-5 * bound + 1e-12


def rope_reference(x, start, theta):
    """RoPE as docs/design.md defines it, a loop: component m pairs with m + h/2 and turns by pos * theta^(-2m/h)."""
    B, T, H, h = x.shape
    out = np.empty_like(x)
    for t in range(T):
        for m in range(h // 2):
            a = (start + t) * theta ** (-2.0 * m / h)
            c, s = math.cos(a), math.sin(a)
            out[:, t, :, m] = x[:, t, :, m] * c - x[:, t, :, m + h // 2] * s
            out[:, t, :, m + h // 2] = x[:, t, :, m] * s + x[:, t, :, m + h // 2] * c
    return out


@examples(120)
@given(st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), head_dims)
       .flatmap(lambda s: arrays(np.float64, s, elements=finite(-3, 3))),
       st.integers(0, 50), thetas)
def test_rope_rotates_the_spec_pairs(x, start, theta):
    """Operator law (RoPE): rope(x, *rope_tables(T, h, theta, start)) rotates each pair (m, m + h/2) by
    angle pos * theta^(-2m/h), as docs/design.md says, and so keeps every vector's length."""
    B, T, H, h = x.shape
    cos, sin = formulas.rope_tables(T, h, theta, start)
    assert cos.shape == sin.shape == (T, h // 2)
    y = formulas.rope(x, cos, sin)
    np.testing.assert_allclose(y, rope_reference(x, start, theta), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5, atol=1e-12)


C = math.sqrt(2.0 / math.pi)


def gelu_reference(u):
    return 0.5 * u * (1.0 + np.tanh(C * (u + 0.044715 * u ** 3)))


def gelu_derivative(u):
    """d/du of the tanh GELU, by hand."""
    t = np.tanh(C * (u + 0.044715 * u ** 3))
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * C * (1.0 + 3 * 0.044715 * u * u)


def geglu_reference(x, p):
    """The GeGLU MLP and the pieces its gradient needs, plainly: x (n, D) -> (n, D)."""
    a = x @ p["Wgate"] + p["bgate"]
    b = x @ p["Wup"] + p["bup"]
    hidden = gelu_reference(a) * b
    return hidden @ p["Wdown"] + p["bdown"], (a, b, hidden)


def geglu_reference_grad(x, p, R):
    """Gradient of sum(geglu(x) * R) with respect to x and every weight, derived by hand."""
    _, (a, b, hidden) = geglu_reference(x, p)
    dh = R @ p["Wdown"].T
    da = dh * b * gelu_derivative(a)
    db = dh * gelu_reference(a)
    return {"x": da @ p["Wgate"].T + db @ p["Wup"].T,
            "Wgate": x.T @ da, "bgate": da.sum(0), "Wup": x.T @ db, "bup": db.sum(0),
            "Wdown": hidden.T @ R, "bdown": R.sum(0)}


@st.composite
def geglu_cases(draw):
    B, T, D, F = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    p = {"Wgate": rng.normal(0, scale, (D, F)), "bgate": rng.normal(0, scale, F), "Wup": rng.normal(0, 1, (D, F)),
         "bup": rng.normal(0, 1, F), "Wdown": rng.normal(0, 1, (F, D)), "bdown": rng.normal(0, 1, D)}
    return rng.normal(0, 1, (B, T, D)), p, rng.normal(0, 1, (B, T, D))


@examples(120)
@given(geglu_cases())
def test_geglu_value_and_gradient_match_a_plain_reference(case):
    """Operator law (GeGLU): mlp(x) = (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown with the tanh
    GELU, and its gradient equals the hand-derived one, in float64 (the level-batched mlp too)."""
    x, p, R = case
    B, T, D = x.shape
    want, _ = geglu_reference(x.reshape(B * T, D), p)
    np.testing.assert_allclose(model.mlp(x, p), want.reshape(B, T, D), rtol=1e-10, atol=1e-10)
    stacked = {k: v[None] for k, v in p.items()}
    np.testing.assert_allclose(fast.mlp(x[None], stacked)[0], want.reshape(B, T, D), rtol=1e-10, atol=1e-10)
    ref = geglu_reference_grad(x.reshape(B * T, D), p, R.reshape(B * T, D))
    gx, gp = grad(lambda x, p: np.sum(model.mlp(x, p) * R), argnum=(0, 1))(x, p)
    np.testing.assert_allclose(gx, ref["x"].reshape(B, T, D), rtol=1e-9, atol=1e-9)
    for k in p:
        np.testing.assert_allclose(gp[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)


# Law 11: gradients

def zeros_like(params):
    return {**{k: np.zeros_like(v) for k, v in params.items() if k != "layers"},
            "layers": [{k: np.zeros_like(v) for k, v in layer.items()} for layer in params["layers"]]}


def add_scaled(params, direction, h):
    return {**{k: params[k] + h * direction[k] for k in params if k != "layers"},
            "layers": [{k: layer[k] + h * d[k] for k in layer} for layer, d in zip(params["layers"], direction["layers"])]}


@examples(16)
@given(models(max_nodes=7, dtype=np.float64), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(["reference", "level-batched"]))
def test_gradients_of_the_full_model_match_finite_differences(args, seed, path):
    """Gradients: the gradient of the tree loss (reference or level-batched) matches finite differences
    (central, Richardson-extrapolated) in float64, along random directions and on random single coordinates."""
    cfg, params, ids, targets = args
    loss = tf.tree_loss_reference if path == "reference" else tf.tree_loss
    f = lambda P: loss(P, cfg, ids, targets)
    g = grad(f)(params)
    rng = np.random.default_rng(seed)
    h = 1e-6          # small: a width-1 rmsnorm bends on the scale sqrt(eps) = 1e-3
    directions = [{**{k: rng.normal(size=v.shape) for k, v in params.items() if k != "layers"},
                   "layers": [{k: rng.normal(size=v.shape) for k, v in layer.items()} for layer in params["layers"]]}]
    all_paths = array_paths(params)   # every array, the per-node tables included
    for _ in range(4):
        one_hot = zeros_like(params)
        where = all_paths[rng.integers(len(all_paths))]
        a = get(params, where)
        get(one_hot, where)[np.unravel_index(rng.integers(a.size), a.shape)] = 1.0
        directions.append(one_hot)
    def central(d, h):
        return (f(add_scaled(params, d, h)) - f(add_scaled(params, d, -h))) / (2 * h)
    for d in directions:
        numeric = (4 * central(d, h / 2) - central(d, h)) / 3     # Richardson: error O(h^4), not O(h^2)
        exact = sum(float(np.sum(get(g, p) * get(d, p))) for p in all_paths)
        assert abs(numeric - exact) <= 1e-6 * max(1.0, abs(exact)), (numeric, exact)


ROLE_PATTERNS = [("R",), ("M",), (None, "R"), ("R", "M"), ("M", "R"), ("R", None, "C"), (None, "C", "R")]


@st.composite
def stacked_block_cases(draw):
    roles = draw(st.sampled_from(ROLE_PATTERNS))
    n = draw(st.integers(1, 4))
    shape = tuple(n * draw(st.integers(1, 3)) if r else draw(st.integers(1, 3)) for r in roles)
    a = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).normal(size=shape)
    return a, roles, n


@examples(80)
@given(stacked_block_cases())
def test_gradients_of_stacked_blocks_land_on_the_diagonal_blocks(case):
    """Gradients: the gradient through tree.stacked_blocks (the primitive under level_view) is exactly
    1 on the n diagonal blocks of the array and 0 elsewhere."""
    a, roles, n = case
    g = grad(lambda a: np.sum(stacked_blocks(a, roles, n)))(a)
    on_diagonal = np.zeros(a.shape)
    stacked_blocks_np(on_diagonal, roles, n)[...] = 1.0
    assert np.array_equal(g, on_diagonal)


def custom_vjps():
    """'module.name' of every autograd primitive (custom VJP) defined in the tinyfractal package."""
    import pkgutil
    import tinyfractal
    found = []
    for info in pkgutil.walk_packages(tinyfractal.__path__, "tinyfractal."):
        if info.ispkg or info.name.rsplit(".", 1)[-1] in ("cli", "__main__") or ".lessons." in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "_is_autograd_primitive", False) and getattr(obj.fun, "__module__", None) == module.__name__:
                found.append(f"{module.__name__}.{name}")
    return sorted(found)


def rng_of(draw):
    return np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))


@st.composite
def stacked_blocks_example(draw):
    a, roles, n = draw(stacked_block_cases())
    return (lambda a: stacked_blocks(a, roles, n)), (a,)


def ops_module():
    return importlib.import_module("tinyfractal.core.ops")


@st.composite
def linear_example(draw):
    N, M, A, O = (draw(st.integers(1, 3)) for _ in range(4))
    rng = rng_of(draw)
    x, W, b = rng.normal(size=(N, M, A)), rng.normal(size=(N, A, O)), rng.normal(size=(N, O))
    if draw(st.booleans()):
        return (lambda x, W: ops_module().linear(x, W)), (x, W)
    return (lambda x, W, b: ops_module().linear(x, W, b)), (x, W, b)


@st.composite
def rmsnorm_example(draw):
    N, B, T, d = (draw(st.integers(1, 3)) for _ in range(4))
    eps = draw(st.sampled_from([1e-6, 1e-2]))
    rng = rng_of(draw)
    return (lambda x, g: ops_module().rmsnorm(x, g, eps)), (rng.normal(size=(N, B, T, d)), rng.normal(size=(N, d)))


@st.composite
def embedding_example(draw):
    N, V, d, B, T = (draw(st.integers(1, 4)) for _ in range(5))
    rng = rng_of(draw)
    ids = rng.integers(0, V, size=(B, T))
    return (lambda E: ops_module().embedding(E, ids)), (rng.normal(size=(N, V, d)),)


@st.composite
def geglu_example(draw):
    shape = draw(small_shapes)
    scale = draw(st.sampled_from([0.5, 3.0]))
    rng = rng_of(draw)
    return (lambda a, u: ops_module().geglu(a, u)), (rng.normal(0, scale, size=shape), rng.normal(size=shape))


@st.composite
def causal_attention_example(draw):
    ops = ops_module()
    N, B, T = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 7))
    K = draw(st.integers(1, 2))
    H = K * draw(st.integers(1, 2))
    h = 2 * draw(st.integers(1, 3))
    theta, start = draw(st.sampled_from([10.0, 100.0])), draw(st.integers(0, 5))
    block = draw(st.sampled_from([2, 3, ops.ATTENTION_BLOCK]))   # several causal blocks, or one

    def attend(q, k, v):
        saved, ops.ATTENTION_BLOCK = ops.ATTENTION_BLOCK, block
        try:
            return ops.causal_attention(q, k, v, theta, start)
        finally:
            ops.ATTENTION_BLOCK = saved
    rng = rng_of(draw)
    return attend, (rng.normal(size=(N, B, T, H, h)), rng.normal(size=(N, B, T, K, h)), rng.normal(size=(N, B, T, K, h)))


@st.composite
def cross_entropy_example(draw):
    N, B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 6))
    rng = rng_of(draw)
    targets = rng.integers(0, V, size=(B, T))
    return (lambda logits: ops_module().cross_entropy(logits, targets)), (rng.normal(0, 2, size=(N, B, T, V)),)


# Example arguments for every custom VJP of the package. A new primitive without an entry here fails
# the law below on purpose: every hand-written gradient must prove itself.
CUSTOM_VJPS = {
    "tinyfractal.core.tree.stacked_blocks": stacked_blocks_example(),
    "tinyfractal.core.ops.linear": linear_example(),
    "tinyfractal.core.ops.rmsnorm": rmsnorm_example(),
    "tinyfractal.core.ops.embedding": embedding_example(),
    "tinyfractal.core.ops.geglu": geglu_example(),
    "tinyfractal.core.ops.causal_attention": causal_attention_example(),
    "tinyfractal.core.ops.cross_entropy": cross_entropy_example(),
}


@pytest.mark.parametrize("name", custom_vjps())
@examples(16)
@given(data=st.data())
def test_gradients_every_custom_vjp_passes_check_grads(name, data):
    """Gradients: every custom VJP (autograd primitive) in the tinyfractal package passes autograd's
    check_grads, reverse mode, in float64, on random shapes including size-1 axes."""
    if name not in CUSTOM_VJPS:
        pytest.fail(f"{name} is a custom VJP with no example arguments; add a strategy for it to CUSTOM_VJPS "
                    f"in tests/test_laws_ops.py so its gradient is checked")
    fn, args = data.draw(CUSTOM_VJPS[name])
    np.random.seed(data.draw(st.integers(0, 2 ** 31 - 1)))       # check_grads draws its directions here
    check_grads(fn, modes=["rev"], order=1, argnum=tuple(range(len(args))))(*args)
