"""Laws of model merging (docs/design.md §8.2): merge puts children on the diagonal blocks and changes
nothing about them; extract takes them back out; frozen training moves only the new blocks.

Children are drawn from random valid configs (tests/strategies.py) with every gain and bias nonzero,
so a child placed in the wrong slice gives different numbers. Which entries are new is computed
from the role table of docs/design.md (strategies.spec_mask), not from tree.py.
"""
import tinyfractal as tf
import dataclasses

import numpy as np
import pytest
from autograd import grad
from hypothesis import given
from hypothesis import strategies as st

from strategies import arrays_with_roles, configs, examples, get, random_params, spec_mask
from tinyfractal.core import fast
from tinyfractal.config import Config
from tinyfractal.training.merge import extract, merge, parent_config, root_loss, trainable_mask
from tinyfractal.core.model import forward
from tinyfractal.training.train import TrainConfig, evaluate, train
from tinyfractal.core.tree import flatten, nodes, view


@st.composite
def families(draw, dtype=np.float64, max_nodes=7):
    """(child_cfg, children, off_diagonal, seed): `split` random models of one random config."""
    cfg = draw(configs(max_nodes=max_nodes))
    seeds = draw(st.lists(st.integers(0, 2 ** 32 - 1), min_size=cfg.split, max_size=cfg.split))
    children = [random_params(cfg, seed, dtype) for seed in seeds]
    return cfg, children, draw(st.sampled_from(["zero", "random"])), draw(st.integers(0, 2 ** 16))


def batch(cfg, seed, B=2):
    """(B, T) random ids with T >= 2, so attention has something to attend to."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, max(2, cfg.context)))


def new_entries_from_spec(params, cfg):
    """{flat name: bool}: entries no level-1 model owns, by docs/design.md's role table (not tree.py)."""
    covered = {}
    for level, j in [(1, r) for r in range(cfg.split)]:
        for path, m in spec_mask(params, cfg, level, j).items():
            covered[path] = covered.get(path, False) | m
    return {".".join(map(str, path)): ~m for path, m in covered.items()}


@examples(25)
@given(families())
def test_merge_keeps_every_child_node_bit_for_bit(family):
    """After a merge, every node (l, j) of child r, now node (l+1, r*s^l + j), gives exactly the logits it
    gave standalone (float64, bit for bit), with zero and with random off-diagonal blocks."""
    cfg, children, off_diagonal, seed = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    ids = batch(cfg, seed)
    for r, child in enumerate(children):
        for level, j in nodes(cfg):
            inside = forward(view(merged, pcfg, level + 1, r * cfg.split ** level + j), cfg.sub(level), ids)
            alone = forward(view(child, cfg, level, j), cfg.sub(level), ids)
            assert inside.dtype == np.float64
            np.testing.assert_array_equal(inside, alone)


@examples(25)
@given(families())
def test_merge_fast_path_children_give_their_standalone_losses(family):
    """The level-batched path that training uses agrees: level l+1 of the merged tree holds the level-l
    losses of all children side by side, bit for bit."""
    cfg, children, off_diagonal, seed = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    ids = batch(cfg, seed)
    targets = batch(cfg, seed + 1)
    inside = fast.node_losses(merged, pcfg, ids, targets)
    alone = [fast.node_losses(child, cfg, ids, targets) for child in children]
    for level in range(cfg.levels):
        np.testing.assert_array_equal(inside[level + 1], np.concatenate([a[level] for a in alone]))


@examples(25)
@given(families(dtype=np.float32))
def test_extract_of_merge_is_each_child(family):
    """extract(merge(children), 1, r) == child r bit for bit, for every r, and is a copy, not a view."""
    cfg, children, off_diagonal, seed = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    for r, child in enumerate(children):
        out = flatten(extract(merged, pcfg, 1, r))
        want = flatten(child)
        assert out.keys() == want.keys()
        for name in want:
            assert out[name].dtype == want[name].dtype
            np.testing.assert_array_equal(out[name], want[name])
            assert out[name].flags["C_CONTIGUOUS"]
            assert not np.shares_memory(out[name], flatten(merged)[name])


@examples(25)
@given(families(dtype=np.float32))
def test_merge_config_is_one_level_up(family):
    """The merged config has split x the width and head dim, one more level, the rest unchanged, and
    its level-1 config is the children's."""
    cfg, children, off_diagonal, seed = family
    _, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    assert pcfg.sub(1) == cfg
    assert (pcfg.hidden, pcfg.head_dim, pcfg.levels) == (cfg.split * cfg.hidden, cfg.split * cfg.head_dim,
                                                         cfg.levels + 1)
    same = [f.name for f in dataclasses.fields(Config) if f.name not in ("hidden", "head_dim", "levels")]
    assert all(getattr(pcfg, name) == getattr(cfg, name) for name in same)


@examples(25)
@given(families(dtype=np.float32))
def test_new_entries_are_exactly_the_off_diagonal_blocks(family):
    """trainable_mask is True exactly where no child owns an entry (docs/design.md's blocks); those entries are
    0 with off_diagonal='zero' and within +-scale/sqrt(fan_in) with 'random'; gains, biases and E are
    wholly the children's. A per-node table's new entries are its row 0, the new root's own row: 0, as a
    fresh node's (its gain starts at 1); the children's rows move down by one level."""
    cfg, children, off_diagonal, seed = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed, scale=0.1)
    mask = trainable_mask(merged, pcfg)
    spec = new_entries_from_spec(merged, pcfg)
    assert mask.keys() == spec.keys()
    fan_in = {"Wq": pcfg.hidden, "Wk": pcfg.hidden, "Wv": pcfg.hidden, "Wgate": pcfg.hidden, "Wup": pcfg.hidden,
              "Wo": pcfg.heads * pcfg.head_dim, "Wdown": pcfg.mlp_hidden}
    flat = flatten(merged)
    for name, m in mask.items():
        np.testing.assert_array_equal(m, spec[name])
        short = name.split(".")[-1]
        if short in ("logit_gain", "node_gain"):
            assert m[0].all() and not m[1:].any(), f"{name}: only row 0 (the new root's) is new"
            assert not flat[name][0].any(), f"{name}: the new root's row starts at 0"
            continue
        if short not in fan_in:
            assert not m.any(), f"{name} has new entries, but the children should cover it"
            continue
        assert m.any(), f"{name} should have off-diagonal blocks"
        if off_diagonal == "zero":
            assert not flat[name][m].any()
        else:
            assert np.abs(flat[name][m]).max() <= 0.1 / np.sqrt(fan_in[short]) + 1e-7


def off_diagonal_blocks(a, roles, s):
    """Every block (i, j), i != j, of the two role axes of a 2-role array split s ways."""
    axes = [k for k, r in enumerate(roles) if r]
    size = [a.shape[k] // s for k in axes]
    for i in range(s):
        for j in range(s):
            if i != j:
                index = [slice(None)] * a.ndim
                index[axes[0]] = slice(i * size[0], (i + 1) * size[0])
                index[axes[1]] = slice(j * size[1], (j + 1) * size[1])
                yield (i, j), a[tuple(index)]


@examples(20)
@given(families(), st.integers(0, 2 ** 16))
def test_zero_off_diagonal_blocks_have_nonzero_gradient(family, seed):
    """With zero-initialised off-diagonal blocks, the parent's loss still has a nonzero gradient on every
    off-diagonal block of every projection and MLP matrix: training can start from zero."""
    cfg, children, _, _ = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal="zero")
    ids, targets = batch(pcfg, seed), batch(pcfg, seed + 1)
    g = grad(root_loss)(merged, pcfg, ids, targets)
    for path, a, roles in arrays_with_roles(g):
        if sum(r is not None for r in roles) < 2:
            continue
        for (i, j), block in off_diagonal_blocks(a, roles, pcfg.split):
            assert np.any(block != 0), f"{path} block ({i},{j}) has zero gradient"


def tokens(n, vocab, seed=0):
    """A random corpus with some structure (a repeated random phrase plus noise), so loss can fall."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(0, vocab, size=17)
    out = np.tile(phrase, n // 17 + 1)[:n]
    noise = rng.random(n) < 0.2
    out[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    return out.astype(np.int32)


@examples(6)
@given(families(dtype=np.float32, max_nodes=3), st.integers(0, 2 ** 16))
def test_frozen_training_moves_only_the_new_blocks(family, seed):
    """After N AdamW steps with weight decay, every frozen entry, and its moment estimates, is bit for bit
    as before, every child's loss is unchanged, and the new blocks did move: `trainable` given to train
    is the one way to freeze (the plain root loss gives frozen entries gradients; train drops them)."""
    cfg, children, off_diagonal, _ = family
    cfg = cfg.override(dropout=0.0)
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    before = {k: v.copy() for k, v in flatten(merged).items()}
    mask = trainable_mask(merged, pcfg)
    data = tokens(400, pcfg.vocab_size, seed)
    tc = TrainConfig(steps=5, batch_size=2, lr=0.05, min_lr=0.05, warmup=0, weight_decay=0.5,
                     eval_interval=5, eval_batches=1, log_interval=5, seed=seed, clip_mode="global",
                     loss_weights="nodes")
    loss_fn = root_loss
    losses_before = evaluate(merged, pcfg, data, 2, 2)
    state, _ = train(merged, pcfg, tc, data, data, trainable=mask, loss_fn=loss_fn, log=lambda msg: None)
    losses_after = evaluate(merged, pcfg, data, 2, 2)
    after = flatten(merged)
    moved = False
    for name, m in mask.items():
        np.testing.assert_array_equal(after[name][~m], before[name][~m], err_msg=name)
        assert not state["m"][name][~m].any() and not state["v"][name][~m].any(), name
        moved = moved or bool(np.any(after[name][m] != before[name][m]))
    assert moved, "no new entry moved"
    for node in nodes(pcfg):
        if node != (0, 0):
            assert losses_after[node] == losses_before[node], node


@examples(10)
@given(families(dtype=np.float32, max_nodes=3), st.integers(0, 2 ** 16))
def test_root_loss_is_the_tree_loss_weighted_to_the_root(family, seed):
    """root_loss, what a merge stage trains, is the tree loss with level weights [1, 0, ...]."""
    cfg, children, off_diagonal, _ = family
    merged, pcfg = merge(children, cfg, cfg.split, off_diagonal=off_diagonal, seed=seed)
    ids, targets = batch(pcfg, seed), batch(pcfg, seed + 1)
    weights = [1.0] + [0.0] * (pcfg.levels - 1)
    np.testing.assert_allclose(root_loss(merged, pcfg, ids, targets),
                               tf.tree_loss(merged, pcfg, ids, targets, weights), rtol=1e-6)


def test_merged_models_merge_again_and_keep_every_grandchild():
    """Merging merged models (two levels of growth) keeps every original leaf model bit for bit."""
    leaf = Config.preset("micro").override(levels=1, hidden=4, head_dim=2)
    leaves = [random_params(leaf, k, np.float64) for k in range(4)]
    mid = [merge(leaves[2 * g:2 * g + 2], leaf, 2, off_diagonal="random", seed=g) for g in range(2)]
    top, cfg = merge([p for p, _ in mid], mid[0][1], 2, off_diagonal="random", seed=9)
    assert cfg.levels == 3 and cfg.hidden == 16
    ids = batch(leaf, 0)
    for k in range(4):
        np.testing.assert_array_equal(forward(view(top, cfg, 2, k), leaf, ids), forward(leaves[k], leaf, ids))


def micro_children(n=2, **changes):
    cfg = Config.preset("micro").override(**changes)
    return cfg, [random_params(cfg, k) for k in range(n)]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_merge_wrong_child_count_is_an_error(count):
    """A child count other than split is a ValueError naming split and the count."""
    cfg, children = micro_children(3)
    with pytest.raises(ValueError, match=rf"exactly split=2 children, got {count}"):
        merge(children[:count], cfg, 2)


def test_merge_mismatched_child_is_an_error_naming_the_array():
    """A child whose arrays do not fit child_cfg is named, with the array, its shape and the one needed."""
    cfg, children = micro_children()
    wide, [other] = micro_children(1, hidden=32)
    with pytest.raises(ValueError, match=r"child 1: array E has shape \(128, 32\), child_cfg needs \(128, 16\)"):
        merge([children[0], other], cfg, 2)


def test_merge_mismatched_child_configs_name_the_field():
    """Given one config per child, a difference is named field by field."""
    cfg, children = micro_children()
    other = cfg.override(rope_theta=10.0)
    with pytest.raises(ValueError, match=r"child 1's config differs from child 0's: rope_theta 10.0 vs 100.0"):
        merge(children, [cfg, other], 2)


def test_merge_other_mismatches_are_errors():
    """Wrong layer count, mixed dtypes, a split that differs from the children's, coupled children and
    bad options are each a ValueError saying what is wrong."""
    cfg, children = micro_children()
    deep, [two_layers] = micro_children(1, layers=2)
    with pytest.raises(ValueError, match=r"child 1 has 2 layers, child_cfg has layers=1"):
        merge([children[0], two_layers], cfg, 2)
    with pytest.raises(ValueError, match=r"float32 or all float64"):
        merge([children[0], random_params(cfg, 5, np.float64)], cfg, 2)
    with pytest.raises(ValueError, match=r"child_cfg has split=2 but the merge uses split=3"):
        merge(children + [children[0]], cfg, 3)
    with pytest.raises(ValueError, match=r"not supported for the upstream variant"):
        merge(children, cfg.override(coupling="upstream"), 2)
    with pytest.raises(ValueError, match=r"off_diagonal must be one of"):
        merge(children, cfg, 2, off_diagonal="ones")
    with pytest.raises(ValueError, match=r"split must be an integer >= 2"):
        parent_config(cfg, 1)


def byte_child(cfg, seed):
    """float64 byte-model params with random slot gains and norm gains (zero at init would hide slips)."""
    from tinyfractal.api import init_params
    from tinyfractal.core.tree import map_roles
    rng = np.random.default_rng(seed)
    params = map_roles(lambda a, roles: a.astype(np.float64), init_params(cfg, seed))
    for name in ("P", "Q", "emb_norm", "out_norm"):
        if name in params:
            params[name] = rng.normal(size=params[name].shape)
    return params


@pytest.mark.parametrize("child_levels", [1, 2])
def test_merge_keeps_byte_model_children(child_levels):
    """Byte models (concepts.py) merge too: each child reads its own slot gains (rows of P and Q) in
    the parent and gives its standalone logits bit for bit; the parent's own slot rows are new."""
    from tinyfractal.variants import byte_model as concepts
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256, levels=child_levels, hidden=8,
                                          head_dim=4, context=4)
    children = [byte_child(cfg, seed) for seed in range(2)]
    merged, pcfg = merge(children, cfg, 2)
    groups = np.random.default_rng(0).integers(0, 256, size=(2, 3, 2 ** (cfg.levels - 1)))
    for r, child in enumerate(children):
        np.testing.assert_array_equal(concepts.forward(view(merged, pcfg, 1, r), cfg, groups),
                                      concepts.forward(child, cfg, groups))
    mask = trainable_mask(merged, pcfg)
    own_rows = 2 ** cfg.levels      # g_0 of the parent: the slots of its own level
    assert mask["P"][:own_rows].all() and not mask["P"][own_rows:].any()
