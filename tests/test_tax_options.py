"""The options that issue 15's study measures, each doing what it says and keeping the laws.

Model options (Config): logit_scale ("sqrt": each node's logits over sqrt(d_l); "learned": times a
learnable (1 + mean of the node's row of logit_gain)), node_gains (an output gain per node). Both go
through one function, model.output_gain, which every logits site calls.
Training options (TrainConfig): loss_weights, clip_mode, width_lr.

Random configs come from tests/strategies.py; params get every gain and bias nonzero (strategies) and
random per-node tables, so a node reading another node's row gives different numbers.
"""
import math

import numpy as np
import pytest
from autograd import grad, value_and_grad
from hypothesis import given
from hypothesis import strategies as st

from strategies import configs, examples, node_of, random_params, spec_mask
from tinyfractal import Tokenizer
from tinyfractal.config import Config
from tinyfractal.api import forward, forward_level, forward_node, init_params, tree_loss, tree_loss_reference
from tinyfractal.core.model import count_params, cross_entropy, output_gain
from tinyfractal.core.tree import flatten, index_mask, level_view, nodes, unflatten, view
from tinyfractal.inference import decoder
from tinyfractal.training.checkpoint import load, save
from tinyfractal.training.data import batch_at, load_tokens, train_val_split
from tinyfractal.training.merge import extract, merge
from tinyfractal.training.train import (TrainConfig, clip_threshold, level_weights_at, train, width_lr_scales)

OPTIONS = [dict(logit_scale=scale, node_gains=gains) for scale in ("none", "sqrt", "learned") for gains in (False, True)]
TABLES = ("logit_gain", "node_gain")
CLOSE = dict(rtol=1e-9, atol=1e-9)


def with_tables(cfg, params, seed, dtype=np.float64):
    """params plus random per-node tables for the options cfg has on (a copy of the dict, same arrays)."""
    rng = np.random.default_rng(seed)
    params = dict(params)
    for name in TABLES:
        if name in init_params(cfg, 0):
            params[name] = rng.normal(0.0, 0.4, (cfg.levels, cfg.hidden)).astype(dtype)
    return params


@st.composite
def optioned(draw, max_nodes=13, min_levels=1, dtype=np.float64):
    """(cfg, params, ids, targets): a random base model with one of OPTIONS on."""
    cfg = draw(configs(max_nodes, min_levels)).override(dropout=0.0, **draw(st.sampled_from(OPTIONS)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    params = with_tables(cfg, random_params(cfg, seed, dtype), seed, dtype)
    rng = np.random.default_rng(seed + 1)
    T = draw(st.integers(1, cfg.context))
    ids, targets = rng.integers(0, cfg.vocab_size, (2, T)), rng.integers(0, cfg.vocab_size, (2, T))
    return cfg, params, ids, targets


# The laws, with every option on

@examples(15)
@given(optioned())
def test_level_batched_loss_and_gradients_equal_the_reference_with_options(case):
    """Same-program law with options: the level-batched tree_loss and its gradient with respect to every
    array (the per-node tables included) equal tree_loss_reference, node by node, in float64."""
    cfg, params, ids, targets = case
    a, ga = value_and_grad(lambda p: tree_loss(p, cfg, ids, targets))(params)
    b, gb = value_and_grad(lambda p: tree_loss_reference(p, cfg, ids, targets))(params)
    assert np.allclose(a, b, **CLOSE)
    ga, gb = flatten(ga), flatten(gb)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert np.allclose(ga[name], gb[name], **CLOSE), name
    for name in TABLES:
        if name in params:
            assert np.abs(ga[name]).max() > 0, f"{name} gets no gradient"


@examples(15)
@given(optioned().flatmap(lambda c: st.tuples(st.just(c), node_of(c[0]))))
def test_a_sub_model_is_a_model_with_options(args):
    """A sub-model is a model, with options: the logits of view(P, l, j) under cfg.sub(l) equal those of a
    standalone copy (extract) of it, and entry j of the level-batched logits."""
    (cfg, params, ids, _), (level, j) = args
    sub = cfg.sub(level)
    through_view = forward(view(params, cfg, level, j), sub, ids)
    standalone = forward(extract(params, cfg, level, j), sub, ids)
    assert np.array_equal(through_view, standalone)
    assert np.allclose(forward_level(params, cfg, level, ids)[j], through_view, **CLOSE)


@examples(15)
@given(optioned().flatmap(lambda c: st.tuples(st.just(c), node_of(c[0]))))
def test_locality_with_options(args):
    """Locality, with options: the gradient of node (l, j)'s loss is zero outside its index set
    (index_mask), per-node tables included: a node reads its own row of them and its descendants' rows
    lie inside its set too."""
    (cfg, params, ids, targets), (level, j) = args
    g = grad(lambda p: cross_entropy(forward(view(p, cfg, level, j), cfg.sub(level), ids), targets))(params)
    mask = flatten(index_mask(params, cfg, level, j))
    for name, value in flatten(g).items():
        assert not np.any(value[~mask[name]]), name


@examples(20)
@given(configs(max_nodes=40, min_levels=2), st.sampled_from(TABLES), st.data())
def test_per_node_tables_own_row_and_childrens_sets_tile_the_parents_set(cfg, name, data):
    """The law that per-node tables change. For the base arrays a child's index set is a diagonal block of
    its parent's and the children's sets tile the parent's. A (levels, D) per-node table (logit_gain,
    node_gain) is not a slice the parent reads: node (l, j) reads only row l, columns R(l, j), which
    no other node reads. Restated: the parent's index set is the disjoint union of its own row block
    (row l, columns R(l, j)) and its children's index sets (rows l+1.., columns R of each child)."""
    cfg = cfg.override(**({"logit_scale": "learned"} if name == "logit_gain" else {"node_gains": True}))
    level, j = data.draw(node_of(cfg).filter(lambda n: n[0] < cfg.levels - 1))
    params = init_params(cfg, 0)
    parent = index_mask(params, cfg, level, j)[name]
    d = cfg.width(level)
    own = np.zeros_like(parent)
    own[level, j * d:(j + 1) * d] = True
    union = own.copy()
    for r in range(cfg.split):
        child = index_mask(params, cfg, level + 1, cfg.split * j + r)[name]
        assert not np.any(child & union), "children overlap each other or the parent's own row"
        union |= child
    assert np.array_equal(union, parent)


@examples(10)
@given(optioned(max_nodes=7))
def test_cached_decoding_equals_forward_with_options(case):
    """The KV-cached decoder folds output_gain into its output matrix: its logits equal forward's, for
    every node, with options."""
    cfg, params, ids, _ = case
    params = {k: (v if k == "layers" else v.astype(np.float32)) for k, v in params.items()}
    params["layers"] = [{k: v.astype(np.float32) for k, v in layer.items()} for layer in params["layers"]]
    for level, j in nodes(cfg):
        logits, _ = decoder.prefill(decoder.node_decoder(params, cfg, level, j), ids)
        want = forward(view(params, cfg, level, j), cfg.sub(level), ids)
        assert np.allclose(logits[0], want, rtol=1e-4, atol=1e-4), (level, j)


@examples(10)
@given(optioned(max_nodes=7), st.sampled_from(["upstream", "downstream"]))
def test_coupled_paths_agree_with_options(case, coupling):
    """Coupled trees with options: level-batched loss = node-by-node reference, and cached decoding of every
    node = the reference forward of the nodes it needs."""
    cfg, params, ids, targets = case
    cfg = cfg.override(coupling=coupling)
    params = dict(params, coupling_scale=np.random.default_rng(0).normal(0, 1, (cfg.levels, cfg.layers)))
    assert np.allclose(tree_loss(params, cfg, ids, targets), tree_loss_reference(params, cfg, ids, targets), **CLOSE)
    for level, j in nodes(cfg):
        got, _ = decoder.prefill(decoder.node_decoder(params, cfg, level, j), ids)
        assert np.allclose(got[0], forward_node(params, cfg, level, j, ids), rtol=1e-4, atol=1e-4)


@examples(10)
@given(st.sampled_from(OPTIONS), st.integers(0, 2 ** 16))
def test_byte_model_paths_agree_with_options(options, seed):
    """Byte models with options: the level-batched tree loss equals the node-by-node reference."""
    cfg = Config(vocab_size=256, tokenizer="bytes", context=4, layers=1, heads=2, head_dim=8, hidden=8, levels=2,
                 **options)
    params = with_tables(cfg, unflatten({k: v.astype(np.float64) + np.random.default_rng(seed).normal(0, .3, v.shape)
                                         * (v.ndim == 1) for k, v in flatten(init_params(cfg, seed)).items()}), seed)
    rng = np.random.default_rng(seed)
    ids, targets = rng.integers(0, 256, (2, 3, 2)), rng.integers(0, 256, (2, 3, 2))
    assert np.allclose(tree_loss(params, cfg, ids, targets), tree_loss_reference(params, cfg, ids, targets), **CLOSE)


@examples(10)
@given(st.sampled_from(OPTIONS), st.integers(0, 2 ** 16))
def test_merge_keeps_every_child_node_with_options(options, seed):
    """Merge keeps children exact with options: every node of child r, now inside the merged tree, gives
    bit for bit its standalone logits; the new root's own rows of the per-node tables start at zero."""
    cfg = Config.preset("micro").override(**options)
    children = [with_tables(cfg, random_params(cfg, seed + r, np.float64), seed + r) for r in range(cfg.split)]
    merged, pcfg = merge(children, cfg, cfg.split)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 5))
    for r, child in enumerate(children):
        for level, j in nodes(cfg):
            inside = forward(view(merged, pcfg, level + 1, r * cfg.split ** level + j), cfg.sub(level), ids)
            assert np.array_equal(inside, forward(view(child, cfg, level, j), cfg.sub(level), ids))
    for name in TABLES:
        if name in merged:
            assert not np.any(merged[name][0])


def test_checkpoints_keep_the_per_node_tables(tmp_path):
    """save then load returns the per-node tables bit for bit, and the config with its options."""
    cfg = Config.preset("micro").override(logit_scale="learned", node_gains=True)
    params = with_tables(cfg, init_params(cfg, 0), 3, np.float32)
    save(tmp_path / "ck", params, cfg)
    loaded, cfg2, _ = load(tmp_path / "ck")
    assert cfg2 == cfg
    for name in TABLES:
        assert np.array_equal(loaded[name], params[name])


# Each option does what it says

@pytest.fixture(scope="module")
def text_batch():
    train_tokens, _ = train_val_split(load_tokens(Tokenizer.default()))
    return batch_at(train_tokens, 4, 16, 0, 0)   # 16: the micro preset's context


def first_losses(cfg, batch):
    ids, targets = batch
    return {node: float(cross_entropy(forward(view(init_params(cfg, 0), cfg, *node), cfg.sub(node[0]), ids), targets))
            for node in nodes(cfg)}


def test_logit_scale_sqrt_bounds_a_fresh_nodes_first_loss(text_batch):
    """Tied logits compare two RMS-1 vectors of length d (gains start at 1), so |logit| <= d (Cauchy-Schwarz)
    and a fresh node starts far from ln V: its input token's embedding is still in its final state, so
    that token's logit is near d. Over sqrt(d) every logit is at most sqrt(d), so the first loss is at
    most ln V + 2 sqrt(d), at every width. Measured on real text with the tiny preset."""
    cfg = Config.preset("tiny")
    plain, scaled = first_losses(cfg.override(logit_scale="none"), text_batch), \
        first_losses(cfg.override(logit_scale="sqrt"), text_batch)
    for (level, j), loss in scaled.items():
        d = cfg.width(level)
        assert loss <= math.log(cfg.vocab_size) + 2 * math.sqrt(d), (level, j, loss)
        assert plain[(level, j)] > d / 2, (level, j, plain[(level, j)])      # O(d) without the scale
        assert loss < plain[(level, j)] / 2


def test_learned_scale_starts_at_sqrt_and_multiplies_a_nodes_logits(text_batch):
    """logit_scale='learned' starts exactly as 'sqrt' (its table is zero), and setting node (l, j)'s own row
    to c multiplies that node's logits by (1 + c) and leaves every other node's logits alone."""
    ids, _ = text_batch
    cfg = Config.preset("micro").override(logit_scale="learned", levels=2)
    params = init_params(cfg, 0)
    sqrt_cfg = cfg.override(logit_scale="sqrt")
    sqrt_params = {k: v for k, v in params.items() if k != "logit_gain"}
    before = {n: forward(view(params, cfg, *n), cfg.sub(n[0]), ids) for n in nodes(cfg)}
    for n in nodes(cfg):
        assert np.array_equal(before[n], forward(view(sqrt_params, sqrt_cfg, *n), sqrt_cfg.sub(n[0]), ids))
    d = cfg.width(1)
    params["logit_gain"][1, d:2 * d] = 0.5                                  # node (1, 1)'s own row block
    for n in nodes(cfg):
        after = forward(view(params, cfg, *n), cfg.sub(n[0]), ids)
        want = before[n] * 1.5 if n == (1, 1) else before[n]
        assert np.allclose(after, want, rtol=1e-5, atol=1e-5), n


def test_node_gains_start_as_nothing_and_are_each_nodes_own(text_batch):
    """node_gains=True starts bit for bit as without it (its table is zero). A node's output gain is its
    own: changing a child's row changes that child's logits and not its parent's, and the reverse."""
    ids, _ = text_batch
    cfg = Config.preset("micro").override(node_gains=True, levels=2)
    params = init_params(cfg, 0)
    plain = {k: v for k, v in params.items() if k != "node_gain"}
    base_cfg = cfg.override(node_gains=False)
    for n in nodes(cfg):
        assert np.array_equal(forward(view(params, cfg, *n), cfg.sub(n[0]), ids),
                              forward(view(plain, base_cfg, *n), base_cfg.sub(n[0]), ids))
    before = {n: forward(view(params, cfg, *n), cfg.sub(n[0]), ids) for n in nodes(cfg)}
    params["node_gain"][1, :cfg.width(1)] = 0.7                              # child (1, 0)'s row
    changed = {n for n in nodes(cfg) if not np.array_equal(forward(view(params, cfg, *n), cfg.sub(n[0]), ids),
                                                          before[n])}
    assert changed == {(1, 0)}
    params["node_gain"][1] = 0.0
    params["node_gain"][0, :cfg.width(1)] = 0.7                              # the root's row, the same columns
    changed = {n for n in nodes(cfg) if not np.array_equal(forward(view(params, cfg, *n), cfg.sub(n[0]), ids),
                                                          before[n])}
    assert changed == {(0, 0)}


def test_output_gain_is_one_without_options():
    """With every option off the output factor is the float 1.0, so the base path multiplies by nothing."""
    cfg = Config.preset("micro").faithful()
    assert output_gain(init_params(cfg, 0), cfg) == 1.0 and isinstance(output_gain(init_params(cfg, 0), cfg), float)


@pytest.mark.parametrize("field,value", [("logit_scale", "cube"), ("logit_scale", None), ("node_gains", "maybe"),
                                         ("node_gains", 1)])
def test_bad_model_options_are_value_errors_naming_the_field(field, value):
    """A bad option value is a ValueError that names the field."""
    with pytest.raises(ValueError, match=field):
        Config.preset("micro").override(**{field: value}) if isinstance(value, str) else \
            Config(**{**Config.preset("micro").to_dict(), field: value})


# Training options

def test_loss_weight_schemes_give_the_documented_weights():
    """nodes: every node 1/n_nodes; width: each level's total the same (1/L); sqrtwidth: a node of level
    l weighs sqrt(split) times one of level l+1; params: a node's weight is
    proportional to its parameter count (counted on a real view); numbers are per-level node weights;
    'A>B' is A at step 0, B at the last step and their mean half way."""
    cfg = Config.preset("tiny")
    L, n = cfg.levels, cfg.n_nodes
    at = lambda lw, step=0: level_weights_at(TrainConfig(steps=11, loss_weights=lw), cfg, step)  # noqa: E731
    assert np.allclose(at("nodes"), [1 / n] * L)
    assert np.allclose([cfg.n_models(l) * w for l, w in enumerate(at("width"))], [1 / L] * L)
    counts = [count_params(view(init_params(cfg, 0), cfg, l, 0)) for l in range(L)]
    params_w = at("params")
    assert np.allclose([w / c for w, c in zip(params_w, counts)], params_w[0] / counts[0])
    assert np.isclose(sum(cfg.n_models(l) * w for l, w in enumerate(params_w)), 1.0)
    assert np.allclose(at("4,2,1"), at("width"))
    sqrt_w = at("sqrtwidth")            # per node sqrt(d_l): each level's node sqrt(split) times lighter
    assert np.allclose([sqrt_w[l] / sqrt_w[l + 1] for l in range(L - 1)], math.sqrt(cfg.split))
    assert np.isclose(sum(cfg.n_models(l) * w for l, w in enumerate(sqrt_w)), 1.0)
    assert np.allclose(at("width>nodes", 0), at("width")) and np.allclose(at("width>nodes", 10), at("nodes"))
    assert np.allclose(at("width>nodes", 5), (np.array(at("width")) + at("nodes")) / 2)
    with pytest.raises(ValueError, match="levels"):
        at("1,1")


def micro_data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 128, 4000).astype(np.int32), rng.integers(0, 128, 500).astype(np.int32)


def trained(cfg, tc, **kwargs):
    params = init_params(cfg, 0)
    tr, va = micro_data()
    train(params, cfg, tc, tr, va, log=lambda s: None, **kwargs)
    return flatten(params)


def test_loss_weights_train_exactly_as_the_explicit_level_weights():
    """Training with loss_weights='width' is bit for bit training with level_weights=[d_0, d_1, ...]."""
    cfg = Config.preset("micro")
    tc = TrainConfig(steps=3, batch_size=2, eval_interval=100, eval_batches=1)
    a = trained(cfg, tc.override(loss_weights="width"))
    b = trained(cfg, tc, level_weights=[cfg.width(l) for l in range(cfg.levels)])
    c = trained(cfg, tc)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_clip_mode_tree_scales_the_threshold_by_the_node_weights():
    """clip_mode='tree' clips at grad_clip * sqrt(sum over nodes of w^2): grad_clip / sqrt(n) for n equal
    nodes; for a one-level model it is grad_clip, so training is bit for bit the same as 'global'."""
    cfg = Config.preset("tiny")
    tc = TrainConfig(grad_clip=1.0, clip_mode="tree", loss_weights="nodes")
    assert np.isclose(clip_threshold(tc, cfg, level_weights_at(tc, cfg, 0)), 1 / math.sqrt(cfg.n_nodes))
    assert clip_threshold(tc.override(clip_mode="global"), cfg, level_weights_at(tc, cfg, 0)) == 1.0
    one = Config.preset("micro").override(levels=1)
    tc = TrainConfig(steps=3, batch_size=2, grad_clip=0.01, eval_interval=100, eval_batches=1, clip_mode="global")
    a, b = trained(one, tc.override(clip_mode="tree")), trained(one, tc)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    tree = Config.preset("micro")
    a, b = trained(tree, tc.override(grad_clip=0.3, clip_mode="tree")), trained(tree, tc.override(grad_clip=0.3))
    assert not all(np.array_equal(a[k], b[k]) for k in a)


def test_width_lr_scales_each_matrix_entry_by_its_deepest_owner():
    """width_lr=a multiplies the lr of a matrix entry by (D / d)^a, d the width of the deepest node whose
    block holds it (the role table of docs/design.md, strategies.spec_mask); gains, biases and E keep factor 1 (absent)."""
    cfg = Config.preset("micro").override(levels=3, hidden=16, head_dim=8)
    params = init_params(cfg, 0)
    scales = width_lr_scales(params, cfg, 1.0)
    assert width_lr_scales(params, cfg, 0.0) is None
    one = cfg.override(levels=1)
    assert width_lr_scales(init_params(one, 0), one, 1.0) is None             # one model of its own width: all 1
    assert set(scales) == {f"layers.{i}.{k}" for i in range(cfg.layers)
                           for k in ("Wq", "Wk", "Wv", "Wo", "Wgate", "Wup", "Wdown")}
    for path in [("layers", 0, "Wgate"), ("layers", 0, "Wo")]:
        want = np.ones(params["layers"][0][path[2]].shape)
        for level, j in nodes(cfg):
            want[spec_mask(params, cfg, level, j)[path]] = cfg.split ** level
        assert np.array_equal(scales[f"layers.0.{path[2]}"], want)


def test_lr_width_narrower_than_the_model_is_refused():
    """lr_width names the tree a one-level twin belongs to, so it is at least the model's own width."""
    cfg = Config.preset("micro")
    with pytest.raises(ValueError, match="lr_width"):
        width_lr_scales(init_params(cfg, 0), cfg, 1.0, cfg.hidden // 2)


def test_width_lr_multiplies_the_adam_step_of_leaf_entries():
    """One AdamW step with width_lr=1 moves a leaf-owned entry s^(L-1) times as far as with width_lr=0, and a
    root-only entry as far (the Adam direction is the same; only the step size differs)."""
    cfg = Config.preset("micro")
    tc = TrainConfig(steps=1, batch_size=2, weight_decay=0.0, eval_interval=100, eval_batches=1, width_lr=0.0)
    start = flatten(init_params(cfg, 0))
    a, b = trained(cfg, tc.override(width_lr=1.0)), trained(cfg, tc)
    da, db = a["layers.0.Wgate"] - start["layers.0.Wgate"], b["layers.0.Wgate"] - start["layers.0.Wgate"]
    d, f = cfg.width(1), cfg.mlp_width(1)
    assert np.allclose(da[:d, :f], 2 * db[:d, :f], rtol=1e-3, atol=1e-7)       # leaf (1, 0)'s block (float32 p + dp)
    assert np.allclose(da[:d, f:], db[:d, f:], rtol=1e-3, atol=1e-7)           # the root's off-diagonal block


@pytest.mark.parametrize("field,value,words", [("loss_weights", "heavy", "loss_weights"),
                                               ("loss_weights", "1,-1,1", ">= 0"),
                                               ("clip_mode", "node", "clip_mode"), ("width_lr", -0.5, "width_lr"),
                                               ("lr_width", -1, "lr_width"), ("lr_width", 1.5, "lr_width")])
def test_bad_train_options_are_value_errors_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**{field: value})


def test_tree_weights_refuse_a_custom_loss():
    """loss_weights and clip_mode weigh the tree loss; with a run's own loss_fn they would say nothing true,
    so train refuses them with a ValueError."""
    cfg = Config.preset("micro")
    tr, va = micro_data()
    with pytest.raises(ValueError, match="loss_fn"):
        train(init_params(cfg, 0), cfg, TrainConfig(steps=1, batch_size=2, loss_weights="width"), tr, va,
              loss_fn=lambda p, c, i, t, rng: tree_loss(p, c, i, t), log=lambda s: None)


def test_nested_init_starts_each_block_as_its_owner_would_alone():
    """Without nested_init every entry is uniform in +-1/sqrt(the root's fan_in). With it, the entries a node
    owns and no descendant owns (the role table of docs/design.md, strategies.spec_mask) are uniform in +-1/sqrt(that
    node's fan_in): d_l for Wq, Wgate, bgate..., H*h_l for Wo, f_l for Wdown and bdown, as in its twin."""
    cfg = Config.preset("original").override(nested_init=True)
    params = init_params(cfg, 0)
    twin_bounds = {}
    for level in range(cfg.levels):
        c = cfg.sub(level)
        twin_bounds[level] = {"Wgate": 1 / math.sqrt(c.hidden), "bup": 1 / math.sqrt(c.hidden),
                              "Wo": 1 / math.sqrt(c.heads * c.head_dim), "Wdown": 1 / math.sqrt(c.mlp_hidden)}
    for name, bounds in [(n, {l: twin_bounds[l][n] for l in range(cfg.levels)}) for n in ("Wgate", "bup", "Wo", "Wdown")]:
        path = ("layers", 1, name)
        deepest = np.full(params["layers"][1][name].shape, -1)
        for level, j in nodes(cfg):
            deepest[spec_mask(params, cfg, level, j)[path]] = level
        a = np.abs(params["layers"][1][name])
        for level in range(cfg.levels):
            own = a[deepest == level]
            if own.size == 0:      # a vector (bup) is tiled by the leaves: no entry is the root's alone
                assert name == "bup" and level < cfg.levels - 1
                continue
            assert own.max() <= bounds[level] * (1 + 1e-6) and own.max() > 0.9 * bounds[level], (name, level)
    plain = init_params(cfg.override(nested_init=False), 0)["layers"][1]["Wgate"]
    assert np.abs(plain).max() <= 1 / math.sqrt(cfg.hidden) * (1 + 1e-6)


def test_the_defaults_are_the_studys_chosen_combination():
    """The defaults are what lesson 9's full study chose: the learned logit scale and per-node gains
    (Config), width_lr=1, tree clipping and loss weights annealed from sqrt(width) to equal (TrainConfig);
    faithful() takes each back to the prototype's choice. The handout's 'defaults' row (a study command
    with no options) and its commands that spell out older settings rely on both. At step 0 a node of
    width d weighs sqrt(d) (normalised over the 7 nodes), so tree clipping's threshold is
    grad_clip * sqrt(sum of w^2); at the last step every node weighs 1/7 and the threshold is grad_clip/sqrt(7)."""
    cfg, tc = Config.preset("tiny"), TrainConfig()
    assert (cfg.logit_scale, cfg.node_gains, cfg.nested_init) == ("learned", True, True)
    assert (tc.loss_weights, tc.clip_mode, tc.width_lr, tc.lr_width) == ("sqrtwidth>nodes", "tree", 1.0, 0)
    assert (cfg.faithful().logit_scale, cfg.faithful().node_gains, cfg.faithful().nested_init) == ("none", False, False)
    assert Config.preset("seed") == Config.preset("original").faithful()
    assert (tc.faithful().loss_weights, tc.faithful().clip_mode, tc.faithful().width_lr) == ("nodes", "global", 0.0)
    per_node = [math.sqrt(96)] + [math.sqrt(48)] * 2 + [math.sqrt(24)] * 4      # the 7 nodes of 'tiny'
    w = [x / sum(per_node) for x in per_node]
    assert np.isclose(clip_threshold(tc, cfg, level_weights_at(tc, cfg, 0)), tc.grad_clip * math.sqrt(sum(x * x for x in w)))
    assert np.allclose(level_weights_at(tc, cfg, 0), [w[0], w[1], w[3]])
    assert np.allclose(level_weights_at(tc, cfg, tc.steps - 1), [1 / 7] * 3)
    assert np.isclose(clip_threshold(tc, cfg, level_weights_at(tc, cfg, tc.steps - 1)), tc.grad_clip / math.sqrt(7))
