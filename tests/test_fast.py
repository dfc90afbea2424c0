"""The level-batched fast path (tinyfractal/core/fast.py) equals the per-node reference path (model.py).

Random small configs (split 2-3, levels 1-3, kv heads dividing heads, contexts long enough for
several causal blocks when the block is shrunk), random parameters with nonzero gains and biases.
"""
import tinyfractal as tf
import numpy as np
from autograd import value_and_grad
from hypothesis import given
from hypothesis import strategies as st

from strategies import examples
from tinyfractal.core import fast
from tinyfractal.core import model
from tinyfractal.core import machinery, ops
from tinyfractal.config import Config
from tinyfractal.core.tree import flatten, unflatten, view


@st.composite
def configs(draw):
    split, levels = draw(st.sampled_from([(2, 1), (2, 2), (3, 2), (2, 3), (3, 3)]))
    leaves = split ** (levels - 1)
    kv_heads = draw(st.sampled_from([1, 2]))
    return Config(vocab_size=draw(st.integers(5, 24)), context=draw(st.integers(2, 10)),
                  layers=draw(st.integers(1, 2)), heads=kv_heads * draw(st.integers(1, 3)), kv_heads=kv_heads,
                  head_dim=2 * leaves * draw(st.integers(1, 2)), hidden=leaves * draw(st.integers(1, 3)),
                  mlp_mult=draw(st.integers(1, 3)), levels=levels, split=split,
                  rope_theta=draw(st.sampled_from([10.0, 100.0])), eps=draw(st.sampled_from([1e-6, 1e-3])))


def random_params(cfg, seed, dtype):
    """init_params, then nonzero gains and biases, so a wrong slice of any of them shows."""
    rng = np.random.default_rng(seed)
    params = tf.init_params(cfg, seed)
    flat = {k: (v + (rng.normal(0, 0.3, v.shape) if v.ndim == 1 else 0)).astype(dtype)
            for k, v in flatten(params).items()}
    return unflatten(flat)


@st.composite
def cases(draw, dtype=np.float64):
    cfg = draw(configs())
    params = random_params(cfg, draw(st.integers(0, 2 ** 31 - 1)), dtype)
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, cfg.context))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    ids, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    block = draw(st.sampled_from([2, 3, 64]))
    return cfg, params, ids, targets, block


def with_block(block, f, *args):
    saved, ops.ATTENTION_BLOCK = ops.ATTENTION_BLOCK, block
    try:
        return f(*args)
    finally:
        ops.ATTENTION_BLOCK = saved


def both_paths(cfg, params, ids, targets, block, level_weights):
    fast_vg = value_and_grad(lambda p: tf.tree_loss(p, cfg, ids, targets, level_weights))
    ref_vg = value_and_grad(lambda p: tf.tree_loss_reference(p, cfg, ids, targets, level_weights))
    return with_block(block, fast_vg, params), ref_vg(params)


@examples(12)
@given(cases(), st.sampled_from([None, "random"]), st.booleans())
def test_level_batched_loss_and_every_gradient_equal_the_per_node_path_in_float64(case, weights, split):
    """Same-program law: the level-batched tree loss and its gradient with respect to every array equal the
    per-node reference (tf.tree_loss_reference) to float64 rounding, with or without level weights,
    with the ops running in one thread or forced to split their work over two."""
    cfg, params, ids, targets, block = case
    with machinery.forced_split(2 if split else 1):
        check_same_as_reference(cfg, params, ids, targets, block, weights)


def check_same_as_reference(cfg, params, ids, targets, block, weights):
    level_weights = None if weights is None else list(np.random.default_rng(0).uniform(0.1, 2.0, cfg.levels))
    (loss, g), (ref_loss, ref_g) = both_paths(cfg, params, ids, targets, block, level_weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-11)
    for name, ref in flatten(ref_g).items():
        np.testing.assert_allclose(flatten(g)[name], ref, rtol=1e-9, atol=1e-11, err_msg=name)


@examples(8)
@given(cases(dtype=np.float32))
def test_level_batched_path_in_float32_agrees_and_every_gradient_leaf_is_float32(case):
    """float32 law: in float32 the level-batched loss and gradients agree with the reference within float32
    rounding, and the loss and every gradient leaf are float32 (no silent float64 upcast)."""
    cfg, params, ids, targets, block = case
    (loss, g), (ref_loss, ref_g) = both_paths(cfg, params, ids, targets, block, None)
    assert np.asarray(loss).dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, ref in flatten(ref_g).items():
        assert flatten(g)[name].dtype == np.float32, name
        np.testing.assert_allclose(flatten(g)[name], ref, rtol=2e-3, atol=2e-4 * max(1.0, np.abs(ref).max()),
                                   err_msg=name)


@examples(12)
@given(cases())
def test_forward_level_model_j_is_the_per_node_forward_of_view_j(case):
    """Sub-model law: forward_level's model j equals model.forward(view(params, cfg, l, j), cfg.sub(l), ids)."""
    cfg, params, ids, _, block = case
    for level in range(cfg.levels):
        logits = with_block(block, fast.forward_level, params, cfg, level, ids)
        assert logits.shape == (cfg.n_models(level),) + ids.shape + (cfg.vocab_size,)
        for j in range(cfg.n_models(level)):
            want = model.forward(view(params, cfg, level, j), cfg.sub(level), ids)
            np.testing.assert_allclose(logits[j], want, rtol=1e-10, atol=1e-10)


@examples(8)
@given(cases())
def test_node_losses_are_the_per_node_cross_entropies(case):
    """Loss law: node_losses[l][j] is the mean next-token cross-entropy of model (l, j) alone."""
    cfg, params, ids, targets, block = case
    losses = with_block(block, fast.node_losses, params, cfg, ids, targets)
    for level in range(cfg.levels):
        for j in range(cfg.n_models(level)):
            want = model.cross_entropy(model.forward(view(params, cfg, level, j), cfg.sub(level), ids), targets)
            # A loss can be ~1e-6 (a confident, right model), where rtol alone would ask for 1e-17: float64
            # rounding. |d loss| <= 2 max |d logit|, and the logits agree to 1e-10 (the law above), so atol
            # 2e-10; a real mismatch (another node, a wrong slice) moves a loss by orders of magnitude more.
            np.testing.assert_allclose(losses[level][j], want, rtol=1e-11, atol=2e-10)


def test_tiny_preset_matches_the_reference_in_float32_on_a_real_step():
    """Same-program law at the classroom size: one tiny-preset training batch gives the same loss and
    gradients on both paths (float32, default attention blocks and threads)."""
    cfg = Config.preset("tiny")
    params = tf.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, cfg.vocab_size, (2, cfg.context)), rng.integers(0, cfg.vocab_size, (2, cfg.context))
    (loss, g), (ref_loss, ref_g) = both_paths(cfg, params, ids, targets, ops.ATTENTION_BLOCK, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, ref in flatten(ref_g).items():
        np.testing.assert_allclose(flatten(g)[name], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max(), err_msg=name)
