"""Laws 5-9 of self-similarity: every sub-model is a model of its own, it sees only its own numbers,
the level-batched path computes the same thing, and nothing looks into the future.

Index sets come from the role table of docs/design.md (strategies.spec_mask), not from tinyfractal.core.tree, so a view that
reads the wrong block fails here even if index_mask makes the same mistake.
"""
import numpy as np
import pytest
from autograd import grad
from hypothesis import given
from hypothesis import strategies as st

from strategies import array_paths, astype, examples, get, models, node_of, random_params, spec_copy, spec_mask
from tinyfractal.config import Config
from tinyfractal.core import fast
from tinyfractal.api import tree_loss, tree_loss_reference
from tinyfractal.core.model import cross_entropy, forward
from tinyfractal.core.tree import nodes, view


def with_node(model_strategy):
    """(cfg, params, ids, targets, (level, index)) with a random node of the drawn config."""
    return model_strategy.flatmap(lambda m: st.tuples(*map(st.just, m), node_of(m[0])))


def node_logits(params, cfg, level, index, ids):
    """The logits of model (level, index) through the reference path."""
    return forward(view(params, cfg, level, index), cfg.sub(level), ids)


# Law 5: a sub-model is a model

@examples(60)
@given(with_node(models(max_nodes=40, dtype=np.float64)))
def test_a_sub_model_is_a_model(args):
    """A sub-model is a model: the logits of view(P, cfg, l, j) under cfg.sub(l) equal, in float64, those
    of a standalone model of config cfg.sub(l) built from copies of those arrays, and from copies of the
    blocks docs/design.md gives model (l, j): bit for bit in almost every case, always to 1e-12 (before model.dense, NumPy's BLAS
    summed a strided weight vector in another order than its contiguous copy; see the test below)."""
    cfg, params, ids, _, (level, index) = args
    sub = cfg.sub(level)
    through_view = node_logits(params, cfg, level, index, ids)
    standalone = forward(astype(view(params, cfg, level, index), np.float64), sub, ids)
    from_spec = forward(spec_copy(params, cfg, level, index), sub, ids)
    assert through_view.shape == ids.shape + (cfg.vocab_size,)
    np.testing.assert_allclose(through_view, standalone, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(through_view, from_spec, rtol=1e-12, atol=1e-12)


def test_a_sub_model_is_a_model_bit_for_bit_found_by_hypothesis():
    """A sub-model is a model, bit for bit: the example hypothesis found (thorough profile) where the logits
    through the view and through contiguous copies differ in the last bit."""
    cfg = Config(vocab_size=8, context=4, layers=2, heads=1, kv_heads=1, head_dim=16, hidden=4, mlp_mult=2,
                 levels=2, split=4, rope_theta=100.0, eps=0.001, dropout=0.0)
    params, ids = random_params(cfg, 5, np.float64), np.array([[7]])
    through_view = node_logits(params, cfg, 1, 2, ids)
    standalone = forward(astype(view(params, cfg, 1, 2), np.float64), cfg.sub(1), ids)
    assert np.array_equal(through_view, standalone)


# Law 6: locality

def masked_out(g, mask):
    """{path: largest |gradient| outside the node's index set}."""
    return {path: float(np.max(np.abs(get(g, path)[~mask[path]]), initial=0.0)) for path in mask}


@examples(40)
@given(with_node(models(max_nodes=21, dtype=np.float64)))
def test_locality_a_nodes_gradient_is_zero_outside_its_index_set(args):
    """Locality: the gradient of one node's loss with respect to the full arrays is exactly zero outside
    that node's index set (and not zero inside it)."""
    cfg, params, ids, targets, (level, index) = args

    def loss(P):
        return cross_entropy(forward(view(P, cfg, level, index), cfg.sub(level), ids), targets)
    g = grad(loss)(params)
    mask = spec_mask(params, cfg, level, index)
    outside = masked_out(g, mask)
    assert all(v == 0.0 for v in outside.values()), {p: v for p, v in outside.items() if v}
    assert any(np.any(get(g, path)[mask[path]] != 0) for path in mask)


@examples(40)
@given(with_node(models(max_nodes=21, dtype=np.float64)))
def test_locality_holds_on_the_level_batched_path(args):
    """Locality, on the path training uses: the gradient of fast.node_losses(...)[l][j] is exactly zero
    outside model (l, j)'s index set."""
    cfg, params, ids, targets, (level, index) = args

    def loss(P):
        return fast.node_losses(P, cfg, ids, targets)[level][index]
    g = grad(loss)(params)
    outside = masked_out(g, spec_mask(params, cfg, level, index))
    assert all(v == 0.0 for v in outside.values()), {p: v for p, v in outside.items() if v}


# Law 7: isolation

def perturbed(params, mask, seed, inside):
    """A copy of params with random noise added inside (or outside) the index set `mask`."""
    rng = np.random.default_rng(seed)
    out = astype(params, params["E"].dtype)
    for path, own in mask.items():   # every array, the per-node tables included
        a = get(out, path)
        where = own if inside else ~own
        a[where] += rng.normal(0.0, 1.0, size=int(where.sum())).astype(a.dtype)
    return out


@examples(50)
@given(with_node(models(max_nodes=40)), st.integers(0, 2 ** 32 - 1))
def test_isolation_changing_other_entries_leaves_a_nodes_logits_unchanged(args, seed):
    """Isolation: adding noise to every entry outside a node's index set leaves its logits exactly as
    they were, on the reference path and on the level-batched path; noise inside changes them."""
    cfg, params, ids, _, (level, index) = args
    mask = spec_mask(params, cfg, level, index)
    before = node_logits(params, cfg, level, index, ids)
    others = perturbed(params, mask, seed, inside=False)
    assert np.array_equal(node_logits(others, cfg, level, index, ids), before)
    assert np.array_equal(fast.forward_level(others, cfg, level, ids)[index],
                          fast.forward_level(params, cfg, level, ids)[index])
    own = perturbed(params, mask, seed, inside=True)
    assert not np.array_equal(node_logits(own, cfg, level, index, ids), before)


# Law 8: the level-batched path equals the per-node path

TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@examples(40)
@given(data=st.data())
def test_level_batched_logits_equal_per_node_logits(dtype, data):
    """The level-batched path equals the per-node path: fast.forward_level(P, cfg, l, ids)[j] equals
    model.forward(view(P, cfg, l, j), cfg.sub(l), ids) for every node, within float32 tolerance, and
    to 1e-10 in float64."""
    cfg, params, ids, _ = data.draw(models(max_nodes=40, dtype=dtype))
    for level in range(cfg.levels):
        batched = fast.forward_level(params, cfg, level, ids)
        assert batched.shape == (cfg.split ** level,) + ids.shape + (cfg.vocab_size,)
        assert batched.dtype == dtype
        for j in range(cfg.split ** level):
            np.testing.assert_allclose(batched[j], node_logits(params, cfg, level, j, ids), **TOL[dtype],
                                       err_msg=f"node {(level, j)}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@examples(24)
@given(data=st.data())
def test_level_batched_tree_loss_and_gradient_equal_the_reference(dtype, data):
    """The level-batched path equals the per-node path: fast.tree_loss and its gradient equal
    model.tree_loss_reference and its gradient (any level weights), within float32 tolerance, and to
    1e-10 in float64."""
    cfg, params, ids, targets = data.draw(models(max_nodes=15, dtype=dtype))
    weights = data.draw(st.none() | st.lists(st.floats(0.0, 3.0), min_size=cfg.levels, max_size=cfg.levels)
                        .filter(lambda w: sum(w) > 0.1))
    fast_loss = tree_loss(params, cfg, ids, targets, weights)
    ref_loss = tree_loss_reference(params, cfg, ids, targets, weights)
    np.testing.assert_allclose(fast_loss, ref_loss, **TOL[dtype])
    g_fast = grad(tree_loss)(params, cfg, ids, targets, weights)
    g_ref = grad(tree_loss_reference)(params, cfg, ids, targets, weights)
    paths = array_paths(params)   # every array, the per-node tables included
    scale = max(float(np.max(np.abs(get(g_ref, path)))) for path in paths)
    for path in paths:
        assert get(g_fast, path).dtype == dtype, path
        np.testing.assert_allclose(get(g_fast, path), get(g_ref, path), rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * max(scale, 1.0), err_msg=str(path))


@examples(40)
@given(models(max_nodes=40))
def test_level_batched_node_losses_equal_per_node_losses(args):
    """The level-batched path equals the per-node path: fast.node_losses(...)[l][j] is the
    cross-entropy of model (l, j)'s reference logits, for every node."""
    cfg, params, ids, targets = args
    losses = fast.node_losses(params, cfg, ids, targets)
    assert [np.shape(x) for x in losses] == [(cfg.split ** level,) for level in range(cfg.levels)]
    for level, j in nodes(cfg):
        ref = cross_entropy(node_logits(params, cfg, level, j, ids), targets)
        np.testing.assert_allclose(losses[level][j], ref, rtol=1e-5, atol=1e-5)


# Law 9: causality

@examples(50)
@given(models(max_nodes=40, min_T=2), st.data())
def test_causality_future_tokens_leave_earlier_logits_unchanged(args, data):
    """Causality: changing the tokens after position t leaves the logits at positions <= t unchanged,
    exactly, for every node of the tree (reference and level-batched paths)."""
    cfg, params, ids, _ = args
    T = ids.shape[1]
    t = data.draw(st.integers(0, T - 2))
    shift = data.draw(st.integers(1, cfg.vocab_size - 1))
    changed = ids.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] + shift) % cfg.vocab_size
    for level in range(cfg.levels):
        a, b = fast.forward_level(params, cfg, level, ids), fast.forward_level(params, cfg, level, changed)
        assert np.array_equal(a[:, :, :t + 1], b[:, :, :t + 1]), f"level {level}, batched"
        for j in range(cfg.split ** level):
            a = node_logits(params, cfg, level, j, ids)
            b = node_logits(params, cfg, level, j, changed)
            assert np.array_equal(a[:, :t + 1], b[:, :t + 1]), f"node {(level, j)}"
