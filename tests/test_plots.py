"""Laws of the ownership maps and smoke tests of every figure (tinyfractal/tools/plots.py)."""
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given

from strategies import arrays_with_roles, configs, get, spec_mask
from tinyfractal.tools import plots
from tinyfractal.cli import main
from tinyfractal.config import Config
from tinyfractal.api import init_params
from tinyfractal.text.bpe import Tokenizer
from tinyfractal.core.tree import index_mask, nodes, view

MICRO = Config.preset("micro")
TINY = Config.preset("tiny")


def deepest_owner_violations(cfg, owner):
    """Cells where `owner` is not the deepest node whose index set (index_mask, and the blocks of docs/design.md)
    holds the cell: [(array path, node or None, what is wrong)]."""
    tree = nodes(cfg)
    masks = {node: index_mask(owner, cfg, *node) for node in tree}
    spec = {node: spec_mask(owner, cfg, *node) for node in tree}
    bad = []
    for path, ids, _ in arrays_with_roles(owner):
        if (ids < 0).any():
            bad.append((path, None, "a cell has no owner, but the root owns every cell"))
        for number, node in enumerate(tree):
            coloured = ids == number
            if (coloured & ~get(masks[node], path)).any() or (coloured & ~spec[node][path]).any():
                bad.append((path, node, "coloured outside its index set"))
            deeper = get(masks[node], path) & (ids >= 0)
            owner_level = np.array([lvl for lvl, _ in tree])[np.maximum(ids, 0)]
            if (deeper & (owner_level < node[0])).any():
                bad.append((path, node, "owns a cell coloured for a shallower node"))
    return bad


@given(configs(max_nodes=40))
def test_ownership_map_colours_each_cell_by_its_deepest_owner(cfg):
    """Every cell coloured for node n lies in n's index set, and no node deeper than the colour owns it."""
    assert deepest_owner_violations(cfg, plots.owners(cfg)) == []


@given(configs(max_nodes=40))
def test_level_owners_are_the_union_of_that_level_index_sets(cfg):
    """level_owners(cfg, l) colours exactly the cells some model of level l owns, each by that model."""
    for level in range(cfg.levels):
        owner = plots.level_owners(cfg, level)
        numbers = [k for k, node in enumerate(nodes(cfg)) if node[0] == level]
        for path, ids, _ in arrays_with_roles(owner):
            expected = np.full(ids.shape, -1)
            for k in numbers:
                expected[spec_mask(owner, cfg, *nodes(cfg)[k])[path]] = k
            np.testing.assert_array_equal(ids, expected)


def test_a_wrong_view_shows_up_in_the_ownership_map(monkeypatch):
    """The maps are made by `view`: if view gave node j the block of node j+1, the check above fails."""
    right = plots.view
    monkeypatch.setattr(plots, "view", lambda p, c, level, j: right(p, c, level, (j + 1) % c.n_models(level)))
    bad = deepest_owner_violations(TINY, plots.owners(TINY))
    assert any(node == (1, 0) and path == ("layers", 0, "Wq") for path, node, _ in bad)


def test_ownership_maps_split_heads_into_interleaved_columns():
    """Flattened Wq (D, H*hd) of tiny: inside every head, columns 4j..4j+3 belong to leaf (2,j) on its rows."""
    owner = plots.owners(TINY)["layers"][0]["Wq"].reshape(96, 4 * 16)
    leaves = {j: nodes(TINY).index((2, j)) for j in range(4)}
    for head in range(4):
        for j in range(4):
            block = owner[24 * j:24 * (j + 1), head * 16 + 4 * j: head * 16 + 4 * (j + 1)]
            assert (block == leaves[j]).all()


def colours_in_png(path):
    """The distinct RGB colours (0..255) of a PNG, as an (n, 3) int array."""
    rgb = np.round(plt.imread(path)[..., :3].reshape(-1, 3) * 255).astype(np.int64)
    codes = np.unique(rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2])
    return np.stack([codes // 65536, codes // 256 % 256, codes % 256], axis=1)


def has_colour(found, rgb, tol=3):
    return (np.abs(found - np.round(np.array(rgb) * 255)).max(axis=1) <= tol).any()


def test_ownership_figures_are_written_and_show_every_owner(tmp_path):
    """One PNG per weight kind; each shows the colour of every node that owns part of that weight."""
    paths = plots.ownership_maps(TINY, tmp_path)
    assert [p.name for p in paths] == [f"ownership_{k}.png" for k in plots.KINDS]
    colours = plots.node_colours(TINY)
    owner = plots.owners(TINY)
    for kind, path in zip(plots.KINDS, paths):
        found = colours_in_png(path)
        first = plots.KINDS[kind][0]
        ids = owner["layers"][0][first.split(".")[-1]] if first.startswith("layers.") else owner[first]
        for number in np.unique(ids):
            assert has_colour(found, colours[number]), (kind, nodes(TINY)[number])
    assert len(set(map(tuple, np.round(np.array(colours), 3)))) == TINY.n_nodes   # every node its own colour


def test_node_colours_are_distinct_for_split_3():
    """sierpinski's 13 nodes get 13 different colours."""
    colours = plots.node_colours(Config.preset("sierpinski"))
    assert len(set(map(tuple, np.round(np.array(colours), 3)))) == 13


def test_unknown_weight_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown weight kind 'Wx'"):
        plots.ownership_figure(MICRO, "Wx", tmp_path / "x.png")


def test_tree_figure_is_written(tmp_path):
    path = plots.tree_figure(Config.preset("sierpinski"), tmp_path / "tree.png")
    assert path.exists() and plt.imread(path).shape[1] > 800


def fake_metrics(cfg, evals=4):
    rng = np.random.default_rng(0)
    keys = [f"{level}.{j}" for level, j in nodes(cfg)]
    return {"config": cfg.to_dict(), "step": list(range(1, 21)), "loss": list(4 - 0.1 * rng.random(20)),
            "eval_step": [5, 10, 15, 20][:evals],
            "train": {k: list(3 - 0.1 * np.arange(evals)) for k in keys},
            "val": {k: list(3.2 - 0.1 * np.arange(evals)) for k in keys}}


def test_loss_curves_from_a_metrics_json(tmp_path):
    """loss_curves reads train.save_run's metrics.json (config taken from it when cfg is None)."""
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(fake_metrics(MICRO)))
    assert plots.loss_curves(path, None, tmp_path / "loss.png").exists()
    with pytest.raises(ValueError, match="metrics lack 'eval_step'"):
        plots.loss_curves({"step": [], "loss": []}, MICRO, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no losses for node 1.1"):
        m = fake_metrics(MICRO)
        del m["val"]["1.1"]
        plots.loss_curves(m, MICRO, tmp_path / "bad.png")


def test_attention_probs_are_causal_distributions():
    """Each caught attention row is a probability distribution over the current and earlier tokens."""
    params = init_params(TINY, 1)
    ids = np.array([[3, 9, 27, 81, 115]])
    for level, j in [(0, 0), (2, 3)]:
        probs = plots.attention_probs(params, TINY, ids, level, j)
        assert len(probs) == TINY.layers and probs[0].shape == (1, TINY.heads, 5, 5)
        for p in probs:
            np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
            assert np.all(np.triu(p[0], k=1) == 0)


def test_attention_of_a_model_depends_only_on_its_own_slices():
    """Changing another leaf's block of Wq leaves leaf (2,1)'s attention unchanged; its own block changes it."""
    params = init_params(TINY, 1)
    ids = np.array([[3, 9, 27, 81, 115]])
    before = plots.attention_probs(params, TINY, ids, 2, 1)[0]
    view(params, TINY, 2, 2)["layers"][0]["Wq"][...] *= 3.0
    np.testing.assert_array_equal(plots.attention_probs(params, TINY, ids, 2, 1)[0], before)
    view(params, TINY, 2, 1)["layers"][0]["Wq"][...] *= 3.0
    assert not np.allclose(plots.attention_probs(params, TINY, ids, 2, 1)[0], before)


def test_attention_maps_and_merge_counts_are_written(tmp_path):
    tok = Tokenizer.default()
    assert plots.attention_maps(init_params(MICRO, 0), MICRO, tok, "ROMEO:", 1, tmp_path / "a.png").exists()
    with pytest.raises(ValueError, match="must be 1..16"):
        plots.attention_maps(init_params(MICRO, 0), MICRO, tok, "x" * 40, 1, tmp_path / "b.png")
    merges = [(0, ("t", "h"), 300), (1, (",", " "), 200), (2, ("o", "u"), 150)]
    assert plots.merge_counts(merges, tmp_path / "m.png").exists()


def test_figures_command(tmp_path, capsys):
    """`python -m tinyfractal figures` writes the ownership maps, the tree and the attention maps."""
    assert main(["figures", "--preset", "micro", "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"tree.png", "attention_level1.png", "ownership_Wq.png", "ownership_vectors.png"} <= names
    assert main(["figures", "--preset", "micro", "--out", str(tmp_path), "--split=5"]) == 2
    assert "divisible" in capsys.readouterr().err
