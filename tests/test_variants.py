"""Every variant runs through the same tests: base, upstream, downstream and bytes.

Each law below is checked for every variant in the registry (tinyfractal/variants/__init__.py), in the
manner of a backend-parametrized suite: a variant added to the registry is tested with no edit here, and
a public entry point that cannot serve a variant must say so with a ValueError that names it. These are
laws 15 (cached decoding equals full recompute) and 16 (every variant answers for itself) of
docs/design.md, section 7.
"""
import numpy as np
import pytest
from autograd import grad
from hypothesis import given
from hypothesis import strategies as st

import tinyfractal as tf
from strategies import examples
from tinyfractal.core.tree import flatten, nodes, view
from tinyfractal.inference import decoder
from tinyfractal.inference.sample import generate_reference
from tinyfractal.inference.speculative import speculative_ids
from tinyfractal.variants import NAMES, variant_of

FIELDS = {"base": {}, "upstream": {"coupling": "upstream", "coupling_cumulative": True},
          "downstream": {"coupling": "downstream", "coupling_sublayer": True}, "bytes": {"tokenizer": "bytes"}}


def config(name, levels=3):
    """A small three-level tree of the variant (hidden 16, split 2, context 8)."""
    return tf.Config.preset("micro").override(levels=levels, hidden=16, head_dim=8, context=8, **FIELDS[name])


def params64(cfg, seed):
    """float64 params with every gain, scale and slot gain away from its initial value, so nothing is trivially 1."""
    rng = np.random.default_rng(seed)
    p = tf.init_params(cfg, seed)
    out = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float64) for k, v in flatten(p).items()}
    from tinyfractal.core.tree import unflatten
    return unflatten(out)


def batch(cfg, seed, T=None, level=0):
    """Inputs a node of `level` reads: (B,T) tokens, or (B,T,g_level) byte groups."""
    rng = np.random.default_rng(seed)
    T = T or cfg.context
    shape = (2, T) + ((cfg.split ** (cfg.levels - 1 - level),) if cfg.tokenizer == "bytes" else ())
    return rng.integers(0, cfg.vocab_size, shape)


def test_the_registry_names_the_variants_and_each_config_finds_its_own():
    """variant_of(cfg) is the variant the config's fields choose, for every registered name."""
    assert set(NAMES) == set(FIELDS)
    for name in NAMES:
        assert variant_of(config(name)).name == name == config(name).variant


@pytest.mark.parametrize("name", NAMES)
@examples(4)
@given(seed=st.integers(0, 2 ** 16))
def test_fast_path_equals_reference_path_loss_and_every_gradient(name, seed):
    """For every variant, the level-batched tree loss (what training uses) equals the node-by-node
    reference loss, and so does the gradient of every array (float64, to 1e-7)."""
    cfg = config(name)
    p = params64(cfg, seed)
    ids, targets = batch(cfg, seed), batch(cfg, seed + 1)
    assert float(tf.tree_loss(p, cfg, ids, targets)) == pytest.approx(float(tf.tree_loss_reference(p, cfg, ids, targets)),
                                                                      rel=1e-9)
    g = flatten(grad(tf.tree_loss)(p, cfg, ids, targets))
    g_ref = flatten(grad(tf.tree_loss_reference)(p, cfg, ids, targets))
    assert g.keys() == g_ref.keys()
    for k in g:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-7, atol=1e-9, err_msg=f"{name}: {k}")


@pytest.mark.parametrize("name", NAMES)
def test_forward_of_a_view_is_the_variants_own_node_or_a_clear_error(name):
    """forward(view(params, cfg, l, j), cfg.sub(l), ids) equals the variant's per-node forward of (l, j)
    in the whole tree, or raises a ValueError that names the variant (a downstream node needs ancestors)."""
    cfg = config(name)
    p = params64(cfg, 7)
    for level, j in nodes(cfg):
        ids = batch(cfg, level, level=level)
        want = tf.forward_node(p, cfg, level, j, ids)
        if name == "downstream" and level > 0:
            with pytest.raises(ValueError, match="downstream variant"):
                tf.forward(view(p, cfg, level, j), cfg.sub(level), ids)
            continue
        np.testing.assert_allclose(tf.forward(view(p, cfg, level, j), cfg.sub(level), ids), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(tf.forward_level(p, cfg, level, ids)[j], want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_full_recompute(name):
    """For every variant and node, KV-cached decoding (prompt once, then one position per step, sliding
    when the window is full) sees the same next-position logits as recomputing the window, and samples
    the same text."""
    cfg = config(name).override(context=6)
    p = tf.init_params(cfg, 3)
    tok = variant_of(cfg).tokenizer(cfg)
    for level, j in nodes(cfg):
        seen_cached, seen_full = [], []
        ids = variant_of(cfg).prompt_ids(cfg, tok, "To be", level)
        dec = decoder.node_decoder(p, cfg, level, j)
        pick = lambda lg: variant_of(cfg).choose(lg, lambda row: int(np.argmax(row)))
        decoder.decode(dec, list(ids), 9, pick, on_logits=lambda s, lg: seen_cached.append(lg))
        generate_reference(p, cfg, tok, "To be", level, j, 9 * (cfg.split ** (cfg.levels - 1 - level)
                                                                 if name == "bytes" else 1),
                           temperature=0, on_logits=lambda s, lg: seen_full.append(lg))
        assert len(seen_cached) == len(seen_full) == 9
        for a, b in zip(seen_cached, seen_full):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert tf.generate(p, cfg, tok, "To be", level, j, 11, temperature=0.9, seed=5) == \
            generate_reference(p, cfg, tok, "To be", level, j, 11, temperature=0.9, seed=5)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_speculative_output_is_the_verifiers_greedy_output(name):
    """Greedy speculative decoding with every descendant level as drafters returns exactly the verifier's
    own greedy continuation; a variant that cannot speculate says so, naming itself."""
    cfg = config(name)
    p = tf.init_params(cfg, 11)
    tok = variant_of(cfg).tokenizer(cfg)
    if not variant_of(cfg).supports("speculative"):
        with pytest.raises(ValueError, match=f"{name} variant"):
            tf.speculative_generate(p, cfg, tok, "To be", (0, 0), 1, 3, 12)
        return
    prompt = list(tok.encode("To be, or"))
    for verifier, drafters in (((0, 0), 1), ((0, 0), 2), ((1, 1), 2), ((0, 0), [(1, 0), (2, 3)])):
        want = decoder.greedy_ids(p, cfg, prompt, 20, *verifier)
        got, stats = speculative_ids(p, cfg, prompt, 20, verifier, drafters, k=3)
        assert got == want, (name, verifier, drafters)
        assert stats.rounds > 0


@pytest.mark.parametrize("name", NAMES)
def test_ensemble_of_a_level_equals_its_reference(name):
    """The batched ensemble of a level equals pooling the per-node reference logits, for every variant."""
    from tinyfractal.inference.ensemble import ensemble_logits_reference
    cfg = config(name)
    p = params64(cfg, 2)
    for level in range(1, cfg.levels):
        ids = batch(cfg, 4, level=level)
        np.testing.assert_allclose(tf.ensemble_logits(p, cfg, ids, level), ensemble_logits_reference(p, cfg, ids, level),
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_what_a_variant_cannot_do_is_a_value_error_naming_it(name):
    """merge, grow and trace either work or raise a ValueError that names the variant."""
    cfg = config(name, levels=2)
    v = variant_of(cfg)
    child = cfg.sub(1)
    kids = [tf.init_params(child, s) for s in range(cfg.split)]
    calls = {"merge": lambda: tf.merge(kids, child, cfg.split),
             "trace": lambda: tf.trace_node(tf.init_params(cfg, 0), cfg, 1, 0, batch(cfg, 0, level=1), log=lambda *a: None),
             "grow": lambda: tf.grow(cfg, None, 1, tokens=np.zeros(10, np.int32))}
    for feature, call in calls.items():
        if v.supports(feature):
            continue
        with pytest.raises(ValueError, match=f"{name} variant"):
            call()


@pytest.mark.parametrize("name", NAMES)
def test_bad_ids_are_value_errors_for_every_entry_point(name):
    """Token ids outside [0, V), floats, a wrong rank, T = 0 and T > context are ValueErrors, never an
    IndexError or a silently wrapped negative id."""
    cfg = config(name)
    p = tf.init_params(cfg, 0)
    good = batch(cfg, 0)
    bad = [good - good - 1, good + cfg.vocab_size, good.astype(float), good[0], good[:, :0],
           np.concatenate([good, good], axis=1)]
    for ids in bad:
        for call in (lambda: tf.forward(p, cfg, ids), lambda: tf.tree_loss(p, cfg, ids, ids),
                     lambda: tf.forward_level(p, cfg, 1, ids)):
            with pytest.raises(ValueError):
                call()
