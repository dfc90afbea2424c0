"""Laws of the coupled trees (variants/coupled.py): upstream and downstream residual links between levels.

Base-model answers come from fast.py and model.py (the base paths), index sets from the role table of
docs/design.md (strategies.spec_mask), and the one-layer formula test writes docs/design.md §8.1 out by hand.
"""
import json

import numpy as np
import pytest
from autograd import grad, value_and_grad
from hypothesis import given
from hypothesis import strategies as st

from strategies import astype, examples, get, models, node_of, spec_mask
from tinyfractal.variants import coupled as C
from tinyfractal.core import fast
from tinyfractal.training.checkpoint import load, save
from tinyfractal.config import Config
import tinyfractal as tf
from tinyfractal.core.formulas import rmsnorm
from tinyfractal.api import init_params
from tinyfractal.core.model import attention, cross_entropy, forward, mlp
from tinyfractal import api
from tinyfractal.core import flops
from tinyfractal.inference import decoder
from tinyfractal.inference.sample import generate_reference as sample_generate_reference
from tinyfractal.core.tree import flatten, index_mask, level_view, nodes, view

COUPLINGS = ("upstream", "downstream")
# The level-batched path (fast.py's fused ops) and model.py's reference sum in different orders and may
# build RoPE tables at different precisions, so "equal" between them means equal to this tolerance in
# float64; a coupling mistake moves logits by O(1).
CLOSE = dict(rtol=1e-7, atol=1e-7)


@st.composite
def coupled(draw, coupling=None, max_nodes=21, min_levels=1, dtype=np.float64, min_T=1, scale=None):
    """(cfg, params, ids, targets): a random coupled model (any options) with a random coupling scale."""
    cfg, params, ids, targets = draw(models(max_nodes, dtype, min_levels, min_T))
    cfg = cfg.override(coupling=coupling or draw(st.sampled_from(COUPLINGS)), dropout=0.0,
                       coupling_cumulative=draw(st.booleans()), coupling_sublayer=draw(st.booleans()))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    shape = (cfg.levels, cfg.layers)
    params["coupling_scale"] = (rng.normal(0.0, 1.0, shape) if scale is None else np.full(shape, scale)).astype(dtype)
    return cfg, params, ids, targets


def base_of(params, cfg):
    """The same arrays without the scale, and the base config."""
    return {k: v for k, v in params.items() if k != "coupling_scale"}, cfg.override(coupling="none")


def with_node(strategy):
    return strategy.flatmap(lambda m: st.tuples(*map(st.just, m), node_of(m[0])))


# Scale 0 is the base model

@examples(20)
@given(coupled(scale=0.0))
def test_scale_zero_is_the_base_model_logits_and_gradients(args):
    """With every coupling scale 0, upstream and downstream (any options) give the base model's logits
    for every node and the base tree loss's gradients for every base array, exactly in float64."""
    cfg, params, ids, targets = args
    base, bcfg = base_of(params, cfg)
    coupled_logits = C.forward_tree(params, cfg, ids)
    for level in range(cfg.levels):
        assert np.array_equal(coupled_logits[level], fast.forward_level(base, bcfg, level, ids))
    g = flatten(grad(lambda p: tf.tree_loss(p, cfg, ids, targets))(params))
    g_base = flatten(grad(lambda p: tf.tree_loss(p, bcfg, ids, targets))(base))
    for name in g_base:
        assert np.array_equal(g[name], g_base[name]), name


@examples(15)
@given(coupled(scale=0.0))
def test_scale_zero_per_node_reference_is_model_forward(args):
    """With scale 0 the per-node reference gives every node exactly model.forward of its view."""
    cfg, params, ids, _ = args
    base, bcfg = base_of(params, cfg)
    ref = C.forward_nodes_reference(params, cfg, ids)
    for level, j in nodes(cfg):
        assert np.array_equal(ref[(level, j)], forward(view(base, bcfg, level, j), bcfg.sub(level), ids))


# What each coupling leaves alone

@examples(20)
@given(coupled(coupling="upstream"))
def test_upstream_leaves_are_unchanged(args):
    """Under upstream, with any scale, every leaf's logits equal the base model's, exactly."""
    cfg, params, ids, _ = args
    base, bcfg = base_of(params, cfg)
    leaves = cfg.levels - 1
    assert np.array_equal(C.forward_tree(params, cfg, ids)[leaves], fast.forward_level(base, bcfg, leaves, ids))


@examples(20)
@given(coupled(coupling="downstream"))
def test_downstream_root_is_unchanged(args):
    """Under downstream, with any scale, the root's logits equal the base model's, exactly."""
    cfg, params, ids, _ = args
    base, bcfg = base_of(params, cfg)
    assert np.array_equal(C.forward_tree(params, cfg, ids)[0], fast.forward_level(base, bcfg, 0, ids))


@examples(20)
@given(coupled(min_levels=2, scale=1.0))
def test_coupling_changes_the_receivers(args):
    """With scale 1 the coupling does something: some receiving node's logits differ from base
    (upstream: the root; downstream: the first child)."""
    cfg, params, ids, _ = args
    base, bcfg = base_of(params, cfg)
    level = 0 if cfg.coupling == "upstream" else 1
    diff = np.abs(C.forward_tree(params, cfg, ids)[level] - fast.forward_level(base, bcfg, level, ids)).max()
    assert diff > 1e-9


# docs/design.md §8.1 written out for one layer

def one_layer(params, cfg, level, j, ids):
    """(state after the layer, attention + MLP outputs) of base node (level, j), with model.py's blocks."""
    p, sub = view(params, cfg, level, j), cfg.sub(level)
    w = p["layers"][0]
    x = rmsnorm(p["E"][ids], p["emb_norm"], cfg.eps)
    a = attention(rmsnorm(x, w["attn_norm"], cfg.eps), w, sub)
    b = mlp(rmsnorm(x + a, w["mlp_norm"], cfg.eps), w)
    return x + a + b, a + b


def logits_of(params, cfg, level, j, x):
    p = view(params, cfg, level, j)
    out = rmsnorm(p["E"], p["out_norm"], cfg.eps)
    gain = 1.0 if cfg.logit_scale == "none" else 1 / np.sqrt(cfg.width(level))   # the node's output gain:
    if cfg.logit_scale == "learned":                                                # its own rows come first
        gain = gain * (1 + np.mean(p["logit_gain"][0]))
    if cfg.node_gains:
        gain = gain * (1 + p["node_gain"][0])
    return (rmsnorm(x, p["final_norm"], cfg.eps) * gain) @ out.T


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("sublayer", [False, True])
def test_one_layer_follows_the_formula(coupling, cumulative, sublayer):
    """One layer, three levels, split 3: every node's final state is its base state plus the scaled
    concatenation of its children's (upstream) or the slice of its parent's (downstream), where what is
    sent is the state or the layer outputs, before or after the sender's own coupling."""
    cfg = Config(vocab_size=13, context=5, layers=1, heads=2, kv_heads=1, head_dim=18, hidden=27, mlp_mult=2,
                 levels=3, split=3, coupling=coupling, coupling_cumulative=cumulative, coupling_sublayer=sublayer)
    params = astype(init_params(cfg, 3), np.float64)
    params["coupling_scale"] = np.array([[0.7], [-1.3], [0.4]])
    ids = np.random.default_rng(0).integers(0, 13, size=(2, 5))
    base = {n: one_layer(params, cfg.override(coupling="none"), *n, ids) for n in nodes(cfg)}
    final, sent = {}, {}
    order = [2, 1, 0] if coupling == "upstream" else [0, 1, 2]
    for level in order:
        for j in range(3 ** level):
            y, delta = base[(level, j)]
            own = delta if sublayer else y
            if coupling == "upstream" and level < 2:
                got = np.concatenate([sent[(level + 1, 3 * j + r)] for r in range(3)], axis=-1)
            elif coupling == "downstream" and level > 0:
                d = cfg.width(level)
                got = sent[(level - 1, j // 3)][..., (j % 3) * d:(j % 3 + 1) * d]
            else:
                got = None
            final[(level, j)] = y if got is None else y + params["coupling_scale"][level, 0] * got
            if cumulative and got is not None:
                own = own + params["coupling_scale"][level, 0] * got
            sent[(level, j)] = own
    tree = C.forward_tree(params, cfg, ids)
    for level, j in nodes(cfg):
        np.testing.assert_allclose(tree[level][j], logits_of(params, cfg, level, j, final[(level, j)]),
                                   **CLOSE)


def test_cumulative_carries_a_signal_across_levels_in_one_layer():
    """With one layer and three levels, what level 1 receives (scaled by coupling_scale[1]) reaches the
    far level (upstream: the root; downstream: the leaves) only when cumulative; otherwise level 1
    sends its state from before its own coupling, and a signal moves one level per layer."""
    for coupling in COUPLINGS:
        for cumulative in (False, True):
            for sublayer in (False, True):
                cfg = Config(vocab_size=11, context=4, layers=1, heads=2, kv_heads=1, head_dim=8, hidden=8,
                             mlp_mult=2, levels=3, split=2, coupling=coupling, coupling_cumulative=cumulative,
                             coupling_sublayer=sublayer)
                params = astype(init_params(cfg, 1), np.float64)
                ids = np.array([[1, 2, 3]])
                far = 0 if coupling == "upstream" else 2
                before = C.forward_tree(params, cfg, ids)[far]
                params["coupling_scale"][1, 0] = 3.0
                moved = np.abs(C.forward_tree(params, cfg, ids)[far] - before).max()
                assert (moved > 1e-9) == cumulative, (coupling, cumulative, sublayer, moved)


# Level-batched == per node; one node == its place in the tree

@examples(20)
@given(coupled())
def test_level_batched_equals_per_node(args):
    """The level-batched coupled forward equals the per-node reference for every node, and the two tree
    losses have the same gradients (float64, to CLOSE)."""
    cfg, params, ids, targets = args
    tree = C.forward_tree(params, cfg, ids)
    ref = C.forward_nodes_reference(params, cfg, ids)
    for level, j in nodes(cfg):
        np.testing.assert_allclose(tree[level][j], ref[(level, j)], **CLOSE)
    g = flatten(grad(lambda p: tf.tree_loss(p, cfg, ids, targets))(params))
    g_ref = flatten(grad(lambda p: tf.tree_loss_reference(p, cfg, ids, targets))(params))
    for name in g:
        np.testing.assert_allclose(g[name], g_ref[name], **CLOSE, err_msg=name)


@examples(20)
@given(with_node(coupled()))
def test_running_one_node_equals_its_place_in_the_tree(args):
    """forward_node (level-batched, only the needed nodes) and forward_node_reference both give the node's
    logits in the whole coupled tree; needed_nodes is the subtree (upstream) or the ancestor chain."""
    cfg, params, ids, _, (level, index) = args
    whole = C.forward_tree(params, cfg, ids)[level][index]
    np.testing.assert_allclose(C.forward_node(params, cfg, level, index, ids), whole, **CLOSE)
    np.testing.assert_allclose(C.forward_node_reference(params, cfg, level, index, ids), whole,
                               **CLOSE)
    need = api.needed_nodes(cfg, level, index)
    if cfg.coupling == "upstream":
        assert need == [(m, j) for m in range(level, cfg.levels) for j in range(cfg.n_models(m))
                        if j // cfg.split ** (m - level) == index]
    else:
        assert need == [(m, index // cfg.split ** (level - m)) for m in range(level + 1)]


@examples(20)
@given(with_node(coupled(coupling="upstream")))
def test_an_upstream_subtree_is_a_coupled_tree_of_its_own(args):
    """Self-similarity survives upstream coupling: node (l, j) in the tree equals the root of the coupled
    model view(params, cfg, l, j) under cfg.sub(l), whose coupling_scale view is rows [l:]."""
    cfg, params, ids, _, (level, index) = args
    sub_params = view(params, cfg, level, index)
    assert np.shares_memory(sub_params["coupling_scale"], params["coupling_scale"])
    assert np.array_equal(sub_params["coupling_scale"], params["coupling_scale"][level:])
    np.testing.assert_allclose(C.forward_tree(sub_params, cfg.sub(level), ids)[0][0],
                               C.forward_tree(params, cfg, ids)[level][index], **CLOSE)


# Locality, adapted

def node_loss_in_tree(cfg, level, index, ids, targets):
    """The loss of one node, computed by running the WHOLE coupled tree (so nothing is left out)."""
    return lambda p: cross_entropy(C.forward_tree(p, cfg, ids)[level][index], targets)


def allowed_mask(params, cfg, level, index):
    """{path: bool}: the union of the index sets (docs/design.md) the node may depend on, and its coupling_scale rows
    (upstream: its subtree's levels l..; downstream: levels 0..l of its chain)."""
    chain = [(level, index)] if cfg.coupling == "upstream" else api.needed_nodes(cfg, level, index)
    base = {k: v for k, v in params.items() if k != "coupling_scale"}
    masks = [spec_mask(base, cfg, *n) for n in chain]
    out = {path: np.logical_or.reduce([m[path] for m in masks]) for path in masks[0]}
    rows = np.zeros((cfg.levels, cfg.layers), dtype=bool)
    if cfg.coupling == "upstream":
        rows[level:] = True
    else:
        rows[:level + 1] = True
    out[("coupling_scale",)] = rows
    return out


@examples(20)
@given(with_node(coupled(max_nodes=13)))
def test_locality_a_node_depends_only_on_its_subtree_or_its_ancestors(args):
    """Locality, adapted: a node's loss (computed by running the whole coupled tree) has exactly zero
    gradient outside its own index set under upstream (its subtree's sets lie inside it), and outside the
    union of its ancestors' index sets under downstream; also no gradient for coupling scales of levels
    it does not run (upstream: above it; downstream: below it)."""
    cfg, params, ids, targets, (level, index) = args
    g = grad(node_loss_in_tree(cfg, level, index, ids, targets))(params)
    allowed = allowed_mask(params, cfg, level, index)
    for path, mask in allowed.items():
        outside = get(g, path)[~mask]
        assert np.all(outside == 0), (path, float(np.abs(outside).max()))


@examples(20)
@given(with_node(coupled(max_nodes=13, coupling="upstream")))
def test_locality_perturbing_outside_the_subtree_leaves_upstream_logits_unchanged(args):
    """Under upstream, changing every parameter entry outside node (l, j)'s index set (and the scale rows
    above l) leaves its logits in the whole coupled tree unchanged, bit for bit."""
    cfg, params, ids, _, (level, index) = args
    allowed = allowed_mask(params, cfg, level, index)
    rng = np.random.default_rng(7)
    changed = astype(params, np.float64)
    changed["coupling_scale"] = np.array(params["coupling_scale"])
    for path, mask in allowed.items():
        a = get(changed, path)
        a[~mask] += rng.normal(size=a[~mask].shape)
    before = C.forward_tree(params, cfg, ids)[level][index]
    after = C.forward_tree(changed, cfg, ids)[level][index]
    assert np.array_equal(before, after)


def test_downstream_locality_is_wide_the_root_sees_everything():
    """Downstream's index-set law is weak by nature: every node's ancestors include the root, whose
    index set is every entry, so a leaf's logits DO depend on entries outside the leaf's own set."""
    cfg = Config.preset("micro").override(coupling="downstream")
    params = astype(init_params(cfg, 0), np.float64)
    ids = np.array([[3, 1, 4, 1, 5]])
    targets = np.array([[1, 4, 1, 5, 9]])
    g = grad(node_loss_in_tree(cfg, 1, 1, ids, targets))(params)
    own = index_mask(params, cfg, 1, 1)
    assert np.abs(g["layers"][0]["Wq"][~own["layers"][0]["Wq"]]).max() > 0


# Causality

@examples(20)
@given(coupled(min_T=2), st.data())
def test_causality_a_future_token_leaves_earlier_logits_unchanged_for_every_node(args, data):
    """Changing the token at position t leaves every node's logits at positions < t unchanged, exactly,
    under any coupling (a node's coupled inputs are causal too)."""
    cfg, params, ids, _ = args
    T = ids.shape[1]
    t = data.draw(st.integers(1, T - 1))
    changed = ids.copy()
    changed[:, t:] = (changed[:, t:] + 1 + data.draw(st.integers(0, cfg.vocab_size - 2))) % cfg.vocab_size
    before, after = C.forward_tree(params, cfg, ids), C.forward_tree(params, cfg, changed)
    for level in range(cfg.levels):
        assert np.array_equal(before[level][:, :, :t], after[level][:, :, :t])


# Training in float32

@examples(8)
@given(coupled(dtype=np.float32))
def test_every_gradient_leaf_is_float32(args):
    """Training stays float32: the coupled tree loss and every gradient leaf (coupling_scale too) are float32."""
    cfg, params, ids, targets = args
    loss, g = value_and_grad(lambda p: tf.tree_loss(p, cfg, ids, targets))(params)
    assert np.asarray(loss).dtype == np.float32
    for name, a in flatten(g).items():
        assert a.dtype == np.float32, name


def test_train_uses_the_coupled_loss_and_learns_the_scale():
    """train.train on a coupled config logs the coupled tree loss (not the base loss) and moves coupling_scale."""
    from tinyfractal.training.data import batch_at
    from tinyfractal.training.train import TrainConfig, level_weights_at, train
    cfg = Config.preset("micro").override(coupling="upstream", levels=2)
    params = init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=400).astype(np.int32)
    tc = TrainConfig(steps=2, batch_size=2, eval_interval=2, eval_batches=1, log_interval=1, warmup=0)
    ids, targets = batch_at(tokens, 2, cfg.context, tc.seed, 0)
    weights = level_weights_at(tc, cfg, 0)   # the default loss weights at step 0
    want = float(tf.tree_loss(params, cfg, ids, targets, weights))
    base = float(tf.tree_loss(params, cfg.override(coupling="none"), ids, targets, weights))
    before = params["coupling_scale"].copy()
    _, metrics = train(params, cfg, tc, tokens, tokens, log=lambda *a: None)
    assert metrics["loss"][0] == pytest.approx(want, rel=1e-6)
    assert abs(want - base) > 1e-3
    assert not np.array_equal(params["coupling_scale"], before)


# Generation: KV caches == recompute

@examples(10)
@given(with_node(coupled(dtype=np.float32, max_nodes=13)), st.integers(1, 12), st.integers(0, 2 ** 16))
def test_cached_generation_equals_recompute(args, prompt_len, seed):
    """Decoding node (l, j) with KV caches (prompt once, then one token per step, sliding when the window
    is full) gives the same next-token logits at every step as recomputing the window with forward_node."""
    cfg, params, _, _, (level, index) = args
    ids = list(np.random.default_rng(seed).integers(0, cfg.vocab_size, prompt_len))
    steps = cfg.context + 3
    cached = []
    decoder.decode(decoder.node_decoder(params, cfg, level, index), list(ids), steps, lambda lg: int(np.argmax(lg)),
                   on_logits=lambda start, lg: cached.append((start, lg)))
    seq = list(ids)
    for start, lg in cached:
        assert start == max(0, len(seq) - cfg.context)
        want = C.forward_node(params, cfg, level, index, np.asarray(seq[start:])[None])[0, -1]
        np.testing.assert_allclose(lg, want, rtol=1e-4, atol=1e-4)
        seq.append(int(np.argmax(lg)))
    assert len(cached) == steps


def test_sample_generate_sends_coupled_models_here():
    """sample.generate and sample.generate_reference on a coupled config give the coupled node's text."""
    from tinyfractal.inference.sample import generate, generate_reference
    from tinyfractal.text.bpe import Tokenizer
    tok = Tokenizer.default()
    cfg = Config.preset("micro").override(coupling="downstream", levels=2)
    params = init_params(cfg, 2)
    seen = []
    want = sample_generate_reference(params, cfg, tok, "ROMEO:", 1, 1, 20, temperature=0, seed=0,
                                     on_logits=lambda s, lg: seen.append(lg))
    assert generate(params, cfg, tok, "ROMEO:", 1, 1, 20, temperature=0, seed=0) == want
    assert generate_reference(params, cfg, tok, "ROMEO:", 1, 1, 20, temperature=0, seed=0) == want
    base_logits = forward(view(params, cfg, 1, 1), cfg.sub(1), np.array([tok.encode("ROMEO:")]))[0, -1]
    assert np.abs(seen[0] - base_logits).max() > 1e-4      # the coupled node is not the base node


# Costs

@examples(15)
@given(with_node(coupled(dtype=np.float32, max_nodes=40)), st.integers(1, 8))
def test_flop_formula_matches_the_counted_matmuls(args, T):
    """node_run_flops minus the coupling adds equals the multiply-adds the decoder counts while running the
    node's needed models on T tokens (every matmul counted from its real shapes)."""
    cfg, params, _, _, (level, index) = args
    T = min(T, cfg.context)
    dec = decoder.node_decoder(params, cfg, level, index)
    decoder.prefill(dec, np.zeros((1, T), dtype=int))
    receives = (lambda m: m < cfg.levels - 1) if cfg.coupling == "upstream" else (lambda m: m > 0)
    adds = sum(flops.coupling_add_flops(cfg, m, T) for m, _ in api.needed_nodes(cfg, level, index) if receives(m))
    assert dec.flops == api.node_run_flops(cfg, level, index, T) - adds


# Config, tree roles and checkpoints

def test_config_parses_coupling_fields_from_strings():
    """--coupling=upstream --coupling_cumulative=true ... parse to the right types; bad values are
    ValueErrors that name the field and what is allowed."""
    cfg = Config.preset("tiny").override(coupling="upstream", coupling_cumulative="true",
                                         coupling_sublayer="No", coupling_scale_init="0")
    assert (cfg.coupling, cfg.coupling_cumulative, cfg.coupling_sublayer, cfg.coupling_scale_init) == \
        ("upstream", True, False, 0.0)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, words in [({"coupling": "sideways"}, ("coupling", "upstream", "downstream")),
                       ({"coupling_cumulative": "maybe"}, ("coupling_cumulative", "true or false")),
                       ({"coupling_sublayer": 1}, ("coupling_sublayer", "true or false")),
                       ({"coupling_scale_init": "inf"}, ("coupling_scale_init", "finite")),
                       ({"coupling_scale_init": True}, ("coupling_scale_init",))]:
        with pytest.raises(ValueError) as e:
            Config.preset("tiny").override(**bad)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_coupling_scale_needs_the_right_shape():
    """A coupled config with params lacking coupling_scale (or of the wrong shape) is a clear ValueError."""
    cfg = Config.preset("micro").override(coupling="upstream")
    params = init_params(cfg.override(coupling="none"), 0)
    with pytest.raises(ValueError, match="coupling_scale"):
        C.forward_tree(params, cfg, np.array([[1, 2]]))
    params["coupling_scale"] = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        C.forward_tree(params, cfg, np.array([[1, 2]]))


@examples(20)
@given(coupled(max_nodes=40), st.data())
def test_level_role_views(args, data):
    """coupling_scale has the level role: view (l, j) is rows [l:] (shared memory), level_view(l) gives
    every model of the level those same rows, and gradients through level_view add over the models."""
    cfg, params, _, _ = args
    level = data.draw(st.integers(0, cfg.levels - 1))
    a = params["coupling_scale"]
    stacked = level_view(params, cfg, level)["coupling_scale"]
    assert stacked.shape == (cfg.n_models(level), cfg.levels - level, cfg.layers)
    for j in range(cfg.n_models(level)):
        v = view(params, cfg, level, j)["coupling_scale"]
        assert np.shares_memory(v, a) and np.shares_memory(stacked[j], a)
        assert np.array_equal(stacked[j], v) and np.array_equal(v, a[level:])
    w = np.random.default_rng(0).normal(size=stacked.shape)
    g = grad(lambda p: np.sum(level_view(p, cfg, level)["coupling_scale"] * w))(params)["coupling_scale"]
    want = np.zeros_like(a)
    want[level:] = w.sum(axis=0)
    np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)


def test_checkpoint_round_trip_keeps_the_coupling(tmp_path):
    """A coupled model saves and loads with its config and coupling_scale; its logits come back the same."""
    cfg = Config.preset("micro").override(coupling="downstream", coupling_sublayer=True, coupling_scale_init=0.5)
    params = init_params(cfg, 4)
    params["coupling_scale"][1, 0] = -2.0
    save(tmp_path / "ck", params, cfg)
    loaded, cfg2, _ = load(tmp_path / "ck")
    assert cfg2 == cfg
    ids = np.array([[5, 6, 7, 8]])
    assert np.array_equal(C.forward_node(loaded, cfg2, 1, 1, ids), C.forward_node(params, cfg, 1, 1, ids))


def test_cli_trains_a_coupled_model(tmp_path, capsys):
    """python -m tinyfractal train --preset micro --coupling=upstream ... trains, saves and evals."""
    from tinyfractal.cli import main
    out = tmp_path / "run"
    code = main(["train", "--preset", "micro", "--coupling=upstream", "--coupling_scale_init=0",
                 "--steps=2", "--batch_size=2", "--eval_interval=2", "--eval_batches=1", "--out", str(out)])
    assert code == 0
    _, cfg, _ = load(out)
    assert cfg.coupling == "upstream" and cfg.coupling_scale_init == 0.0
    assert main(["train", "--preset", "micro", "--coupling=sideways", "--out", str(out)]) == 2
    assert "coupling" in capsys.readouterr().err


def test_lesson_runs_quick(tmp_path, capsys):
    """python -m tinyfractal.lessons.coupling --quick runs, prints the three-way table and saves figures."""
    from tinyfractal.lessons import coupling as lesson
    assert lesson.main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "upstream" in text and "downstream" in text and "(0,0)" in text
    for name in ("loss_curves.png", "node_val_loss.png", "node_run_flops.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["val"]) == {"base", "upstream", "downstream"}
    assert all(len(table) == 7 for table in summary["val"].values())        # every node of tiny
    assert set(summary["step_seconds_median"]) == {"base", "upstream", "downstream"}
