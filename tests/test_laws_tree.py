"""Laws 1-4 of self-similarity: the shape of the tree, and how views cut models out of shared arrays.

Every test draws random valid configs (tests/strategies.py), so the laws are checked for any number
of levels and any split, not only the configs we train. The index sets are computed from `view`
itself (a params dict whose entries are their own flat positions, viewed), and compared with the
blocks docs/design.md assigns (strategies.spec_slices, written from the design, not from tree.py).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import (array_paths, arrays_with_roles, configs, examples, get, n_nodes, node_of, params_for, random_params,
                        spec_mask, spec_param_count, spec_slices)
from tinyfractal.core.model import forward
from tinyfractal.core.tree import children, index_mask, level_view, nodes, parent, view


def same_memory(a, b):
    """True if a and b are the very same window on memory: data pointer, shape, strides and dtype."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


def numbered(cfg):
    """A params dict of int64 arrays (the shapes of docs/design.md) whose every entry is its own flat position."""
    def number(a):
        return np.arange(a.size, dtype=np.int64).reshape(a.shape)
    shapes = random_params(cfg, 0)
    return {**{k: number(v) for k, v in shapes.items() if k != "layers"},
            "layers": [{k: number(v) for k, v in layer.items()} for layer in shapes["layers"]]}


def owned_by_view(full, cfg, level, index):
    """{path: bool mask}: the entries of every full array that view(full, cfg, level, index) reaches."""
    v = view(full, cfg, level, index)
    out = {}
    for path in array_paths(full):    # every array, the per-node tables included
        a = get(full, path)
        m = np.zeros(a.size, dtype=bool)
        m[np.asarray(get(v, path)).ravel()] = True
        out[path] = m.reshape(a.shape)
    return out


# Law 1: tree shape

@examples(120)
@given(configs())
def test_tree_shape_level_l_has_split_to_the_l_nodes(cfg):
    """Tree shape: level l has split^l nodes, indexed 0..split^l - 1, and the tree has (s^L - 1)/(s - 1)."""
    s, L = cfg.split, cfg.levels
    all_nodes = nodes(cfg)
    assert len(all_nodes) == len(set(all_nodes)) == n_nodes(L, s) == cfg.n_nodes
    for level in range(L):
        at_level = [j for l, j in all_nodes if l == level]
        assert at_level == list(range(s ** level))
        assert cfg.n_models(level) == s ** level
    assert all_nodes == sorted(all_nodes)


@examples(120)
@given(configs())
def test_tree_shape_parents_and_children_are_consistent(cfg):
    """Tree shape: the children of (l, j) are (l+1, s*j + r) for r < s, each child's parent is (l, j),
    the root has no parent, leaves have no children, and walking down from the root meets every node once."""
    s, L = cfg.split, cfg.levels
    assert parent(cfg, 0, 0) is None
    met = []
    todo = [(0, 0)]
    while todo:
        node = todo.pop()
        met.append(node)
        kids = children(cfg, *node)
        if node[0] == L - 1:
            assert kids == []
        else:
            assert kids == [(node[0] + 1, s * node[1] + r) for r in range(s)]
        for kid in kids:
            assert parent(cfg, *kid) == node
        todo.extend(kids)
    assert sorted(met) == sorted(nodes(cfg)) and len(met) == len(set(met))


@examples(60)
@given(configs(), st.data())
def test_tree_shape_nodes_outside_the_tree_are_rejected(cfg, data):
    """Tree shape: asking for a level or index outside the tree is a ValueError, not an IndexError or a wrong view."""
    level = data.draw(st.integers(-2, cfg.levels + 2))
    index = data.draw(st.integers(-2, cfg.split ** max(level, 0) + 2))
    inside = 0 <= level < cfg.levels and 0 <= index < cfg.split ** level
    params = random_params(cfg, 0)     # view needs a full parameter set of cfg (it checks the shapes first)
    for fn in (lambda: parent(cfg, level, index), lambda: children(cfg, level, index),
               lambda: view(params, cfg, level, index)):
        if inside:
            fn()
        else:
            with pytest.raises(ValueError, match="out of range"):
                fn()


# Law 2: views are views

@examples(80)
@given(configs().flatmap(lambda c: st.tuples(st.just(c), params_for(c), node_of(c))))
def test_views_are_views_every_array_shares_memory(args):
    """Views are views: every array of view(params, cfg, l, j) shares memory with the full array,
    sitting exactly on the block docs/design.md gives model (l, j)."""
    cfg, params, (level, index) = args
    v = view(params, cfg, level, index)
    for path, full, roles in arrays_with_roles(params):
        part = get(v, path)
        assert isinstance(part, np.ndarray)
        assert np.shares_memory(part, full)
        assert same_memory(part, full[spec_slices(full.shape, roles, cfg.split, level, index)])


@examples(80)
@given(configs().flatmap(lambda c: st.tuples(st.just(c), params_for(c), node_of(c))))
def test_views_are_views_writing_through_a_view_changes_the_full_model(args):
    """Views are views: writing through a view changes exactly those entries of the full arrays, and
    writing into the full arrays shows through the view."""
    cfg, params, (level, index) = args
    before = {path: a.copy() for path, a, _ in arrays_with_roles(params)}
    ids = np.arange(min(4, cfg.context))[None] % cfg.vocab_size
    logits_before = forward(params, cfg, ids)
    v = view(params, cfg, level, index)
    for path, full, roles in arrays_with_roles(params):
        part = get(v, path)
        marker = -1.0 - np.arange(part.size).reshape(part.shape)   # exact in float32, unlike any random entry
        part[...] = marker
        changed = full != before[path]
        assert changed.sum() == part.size
        assert np.array_equal(np.sort(full[changed]), np.sort(marker.ravel()))
        block = spec_slices(full.shape, roles, cfg.split, level, index)
        full[block] = before[path][block]
        assert np.array_equal(part, before[path][block])
    get(v, ("E",))[...] = 0.0
    assert not np.array_equal(forward(params, cfg, ids), logits_before)


@examples(80)
@given(configs().flatmap(lambda c: st.tuples(st.just(c), params_for(c), st.integers(0, c.levels - 1))))
def test_views_are_views_level_view_entry_j_is_view_j(args):
    """Views are views: level_view(P, cfg, l)[key][j] is the same memory (pointer, shape, strides) as
    view(P, cfg, l, j)[key] for every j, and writing through the stack changes the full arrays."""
    cfg, params, level = args
    stacked = level_view(params, cfg, level)
    n = cfg.split ** level
    for path, full, _ in arrays_with_roles(params):
        s = get(stacked, path)
        assert isinstance(s, np.ndarray) and s.shape[0] == n
        assert np.shares_memory(s, full)
        for j in range(n):
            assert same_memory(s[j], get(view(params, cfg, level, j), path))
        before = full.copy()
        s[n - 1] += 1.0
        assert np.count_nonzero(full != before) == s[n - 1].size


# Law 3: siblings are disjoint, children tile their parent

@examples(80)
@given(configs())
def test_siblings_are_disjoint(cfg):
    """Siblings are disjoint: at every level, no entry of any array is reached by the views of two models."""
    full = numbered(cfg)
    for level in range(cfg.levels):
        count = {path: np.zeros(get(full, path).shape, dtype=int) for path in array_paths(full)}
        for j in range(cfg.split ** level):
            for path, owned in owned_by_view(full, cfg, level, j).items():
                count[path] += owned
        for path, c in count.items():
            assert c.max() == 1, f"level {level}: {path} has entries owned by {c.max()} siblings"


def parent_diagonal_block(full_shape, roles, cfg, level, index, r):
    """Mask of the r-th diagonal block inside parent (level, index)'s block: along every role axis the
    r-th of split pieces of the parent's block (docs/design.md: children tile the parent in order)."""
    s = cfg.split
    parent_sl = spec_slices(full_shape, roles, s, level, index)
    m = np.zeros(full_shape, dtype=bool)
    inner = tuple(slice(sl.start + r * ((sl.stop - sl.start) // s), sl.start + (r + 1) * ((sl.stop - sl.start) // s))
                  if role else slice(None) for sl, role in zip(parent_sl, roles))
    m[inner] = True
    return m


@examples(80)
@given(configs(min_levels=2), st.data())
def test_children_tile_their_parent(cfg, data):
    """Children tile their parent: the union of the children's index sets lies inside the parent's, and
    per weight child r owns exactly the parent's r-th diagonal block (all r: the diagonal blocks exactly)."""
    level, index = data.draw(node_of(cfg).filter(lambda n: n[0] < cfg.levels - 1))
    full = numbered(cfg)
    parent_owned = owned_by_view(full, cfg, level, index)
    union = {p: np.zeros_like(m) for p, m in parent_owned.items()}
    for r, (child_level, child_index) in enumerate(children(cfg, level, index)):
        owned = owned_by_view(full, cfg, child_level, child_index)
        for path, a, roles in arrays_with_roles(full):
            assert np.array_equal(owned[path], parent_diagonal_block(a.shape, roles, cfg, level, index, r)), \
                f"child {r} of {(level, index)} does not own the parent's diagonal block {r} of {path}"
            union[path] |= owned[path]
    for path in union:
        assert not np.any(union[path] & ~parent_owned[path])


@examples(80)
@given(configs().flatmap(lambda c: st.tuples(st.just(c), node_of(c))))
def test_index_mask_is_the_index_set_of_the_view(args):
    """index_mask(l, j) is exactly the set of entries view(l, j) reaches, which is the block of docs/design.md,
    and a model owns as many scalars as a standalone model of config cfg.sub(l) has."""
    cfg, (level, index) = args
    full = numbered(cfg)
    owned = owned_by_view(full, cfg, level, index)
    expected = spec_mask(full, cfg, level, index)
    mask = index_mask(full, cfg, level, index)
    for path in owned:
        assert np.array_equal(owned[path], expected[path]), path
        assert np.array_equal(get(mask, path), expected[path]), path
    assert sum(int(m.sum()) for m in owned.values()) == spec_param_count(cfg.sub(level))


# Law 4: a child of a child is a grandchild

@st.composite
def node_and_descendant(draw):
    """(cfg, l, j, m, k): a node (l, j) and the k-th of its descendants m >= 1 levels below."""
    cfg = draw(configs(min_levels=2))
    level = draw(st.integers(0, cfg.levels - 2))
    m = draw(st.integers(1, cfg.levels - 1 - level))
    j = draw(st.integers(0, cfg.split ** level - 1))
    k = draw(st.integers(0, cfg.split ** m - 1))
    return cfg, level, j, m, k


@examples(120)
@given(node_and_descendant(), st.data())
def test_a_child_of_a_child_is_a_grandchild(args, data):
    """A child of a child is a grandchild: view(view(P, cfg, l, j), cfg.sub(l), m, k) is the same memory
    (pointer, shape, strides) as view(P, cfg, l+m, s^m*j + k); for m = 1, the k-th child of (l, j)."""
    cfg, level, j, m, k = args
    params = data.draw(params_for(cfg))
    nested = view(view(params, cfg, level, j), cfg.sub(level), m, k)
    direct = view(params, cfg, level + m, cfg.split ** m * j + k)
    for path, _, _ in arrays_with_roles(params):
        assert same_memory(get(nested, path), get(direct, path)), path


@examples(120)
@given(node_and_descendant())
def test_a_sub_config_of_a_sub_config_is_a_sub_config(args):
    """A child of a child is a grandchild, for configs: cfg.sub(l).sub(m) == cfg.sub(l + m), whose width,
    head dim and MLP width are D/s^(l+m), hd/s^(l+m), F/s^(l+m), with L-l-m levels."""
    cfg, level, _, m, _ = args
    s = cfg.split
    deep = cfg.sub(level).sub(m)
    assert deep == cfg.sub(level + m)
    assert deep.hidden * s ** (level + m) == cfg.hidden
    assert deep.head_dim * s ** (level + m) == cfg.head_dim
    assert deep.mlp_hidden * s ** (level + m) == cfg.mlp_hidden
    assert deep.levels == cfg.levels - level - m and deep.heads == cfg.heads and deep.kv_heads == cfg.kv_heads


@examples(80)
@given(node_and_descendant(), st.data())
def test_a_level_of_a_view_is_a_level_of_the_tree(args, data):
    """A child of a child is a grandchild, stacked: level_view(view(P, cfg, l, j), cfg.sub(l), m)[key][k]
    is the same memory as view(P, cfg, l+m, s^m*j + k)[key]."""
    cfg, level, j, m, _ = args
    params = data.draw(params_for(cfg))
    stacked = level_view(view(params, cfg, level, j), cfg.sub(level), m)
    for k in range(cfg.split ** m):
        direct = view(params, cfg, level + m, cfg.split ** m * j + k)
        for path, _, _ in arrays_with_roles(params):
            assert same_memory(get(stacked, path)[k], get(direct, path)), (k, path)
