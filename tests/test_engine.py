"""The engine's contract (issue 2): configs, views, gradients, training, checkpoints, sampling, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
from autograd import grad
from hypothesis import given, strategies as st

import tinyfractal as tf
from tinyfractal.core import fast
from tinyfractal.core import model
from tinyfractal.training.checkpoint import _digest, load_optimizer
from tinyfractal.inference.sample import filtered_probs, sample_token
from tinyfractal.training.train import TrainConfig, adamw_init, train
from tinyfractal.core.tree import flatten, index_mask, map_roles


def micro(**kw):
    return tf.Config.preset("micro").override(**kw)


def random_tokens(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


@pytest.mark.parametrize("name", ["original", "tiny", "sierpinski", "micro"])
def test_presets_are_valid_and_sub_configs_shrink_by_split(name):
    """Every preset validates; cfg.sub(l) has width D/s^l, head dim hd/s^l and L-l levels."""
    cfg = tf.Config.preset(name)
    for level in range(cfg.levels):
        sub = cfg.sub(level)
        assert sub.hidden * cfg.split ** level == cfg.hidden
        assert sub.head_dim * cfg.split ** level == cfg.head_dim
        assert sub.levels == cfg.levels - level
        assert sub.heads == cfg.heads and sub.kv_heads == cfg.kv_heads


def test_original_preset_is_the_seed():
    """The 'original' preset has the seed's hyperparameters from docs/design.md §10."""
    c = tf.Config.preset("original")
    assert (c.vocab_size, c.context, c.layers, c.heads, c.kv_heads, c.hidden, c.head_dim, c.mlp_mult,
            c.eps, c.rope_theta, c.levels, c.split) == (128, 256, 4, 4, 1, 128, 32, 4, 1e-6, 100.0, 3, 2)


@pytest.mark.parametrize("changes, words", [
    (dict(hidden=90), "divisible"),
    (dict(head_dim=10, levels=3), "divisible"),
    (dict(head_dim=4, levels=3), "even"),
    (dict(head_dim=6, levels=2), "even"),
    (dict(heads=3, kv_heads=2), "multiple of kv_heads"),
    (dict(layers=0), "positive"),
    (dict(vocab_size=-1), "positive"),
    (dict(split=1), "split"),
    (dict(eps=0.0), "eps"),
    (dict(dropout=1.0), "dropout"),
    (dict(levels="two"), "integer"),
])
def test_every_invalid_config_raises_value_error_naming_it(changes, words):
    """An invalid config is a ValueError whose message names the broken constraint."""
    with pytest.raises(ValueError, match=words):
        tf.Config.preset("tiny").override(**changes)


def test_unknown_preset_and_field_are_value_errors():
    """Unknown preset names and unknown fields are refused with the allowed values listed."""
    with pytest.raises(ValueError, match="tiny"):
        tf.Config.preset("huge")
    with pytest.raises(ValueError, match="known fields"):
        tf.Config.preset("tiny").override(width=3)


def test_nodes_and_out_of_range_view():
    """nodes lists (level, index) level by level; a bad level or index names the valid range."""
    cfg = tf.Config.preset("sierpinski")
    assert tf.nodes(cfg) == [(0, 0)] + [(1, j) for j in range(3)] + [(2, j) for j in range(9)]
    params = tf.init_params(cfg, 0)
    with pytest.raises(ValueError, match="0..2"):
        tf.view(params, cfg, 3, 0)
    with pytest.raises(ValueError, match="0..8"):
        tf.view(params, cfg, 2, 9)


def test_params_are_float32_with_explicit_head_axes():
    """init_params gives float32 arrays laid out as docs/design.md says: Wq (D,H,hd), Wk (D,K,hd), Wo (H,hd,D)."""
    cfg = tf.Config.preset("tiny")
    p = tf.init_params(cfg, 0)
    assert all(a.dtype == np.float32 for a in flatten(p).values())
    layer = p["layers"][0]
    assert layer["Wq"].shape == (cfg.hidden, cfg.heads, cfg.head_dim)
    assert layer["Wk"].shape == (cfg.hidden, cfg.kv_heads, cfg.head_dim)
    assert layer["Wo"].shape == (cfg.heads, cfg.head_dim, cfg.hidden)


def test_views_share_memory_and_writes_reach_the_root():
    """Every array of every node's view shares memory with the full array, and writing through it shows."""
    cfg = tf.Config.preset("tiny")
    p = tf.init_params(cfg, 0)
    for level, j in tf.nodes(cfg):
        v = tf.view(p, cfg, level, j)
        map_roles(lambda a, roles, full: _check_shared(a, full), v, p)
    leaf = tf.view(p, cfg, 2, 3)
    leaf["layers"][1]["Wo"][0, 0, 0] = 123.0
    assert p["layers"][1]["Wo"][0, 3 * cfg.head_width(2), 3 * cfg.width(2)] == 123.0


def _check_shared(a, full):
    assert np.shares_memory(a, full)


def test_sibling_views_are_disjoint():
    """No entry is owned by two models of the same level."""
    cfg = tf.Config.preset("sierpinski")
    p = tf.init_params(cfg, 0)
    for level in range(cfg.levels):
        masks = [flatten(index_mask(p, cfg, level, j)) for j in range(cfg.n_models(level))]
        for name in masks[0]:
            assert (sum(m[name].astype(int) for m in masks) <= 1).all()


def test_submodel_through_view_equals_standalone_copy_float64():
    """A node run through views equals a standalone model built from copies, bit for bit in float64."""
    cfg = tf.Config.preset("tiny")
    p = map_roles(lambda a, r: a.astype(np.float64), tf.init_params(cfg, 1))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    for level, j in tf.nodes(cfg):
        v = tf.view(p, cfg, level, j)
        copy = map_roles(lambda a, r: np.array(a, copy=True), v)
        assert np.array_equal(tf.forward(v, cfg.sub(level), ids), tf.forward(copy, cfg.sub(level), ids))


def test_tree_loss_gradient_reaches_every_node_and_is_float32():
    """The gradient of the tree loss is non-zero inside every node's slice of every array, and float32."""
    cfg = tf.Config.preset("tiny")
    p = tf.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids, tg = rng.integers(0, 128, (2, 12)), rng.integers(0, 128, (2, 12))
    g = grad(tf.tree_loss)(p, cfg, ids, tg)
    assert all(a.dtype == np.float32 for a in flatten(g).values())
    for level, j in tf.nodes(cfg):
        for name, a in flatten(tf.view(g, cfg, level, j)).items():
            assert np.any(a != 0), f"node ({level},{j}) gets no gradient in {name}"


def test_fast_tree_loss_equals_reference():
    """The level-batched tree loss equals the node-by-node reference loss."""
    cfg = tf.Config.preset("tiny")
    p = tf.init_params(cfg, 0)
    rng = np.random.default_rng(1)
    ids, tg = rng.integers(0, 128, (2, 10)), rng.integers(0, 128, (2, 10))
    assert np.isclose(float(tf.tree_loss(p, cfg, ids, tg)), float(tf.tree_loss_reference(p, cfg, ids, tg)),
                      rtol=1e-5)


def test_level_weights_select_levels():
    """With weight only on level 1, the tree loss is the mean of level 1's node losses."""
    cfg = tf.Config.preset("tiny")
    p = tf.init_params(cfg, 0)
    rng = np.random.default_rng(2)
    ids, tg = rng.integers(0, 128, (2, 8)), rng.integers(0, 128, (2, 8))
    losses = fast.node_losses(p, cfg, ids, tg)
    assert np.isclose(float(tf.tree_loss(p, cfg, ids, tg, level_weights=[0, 1, 0])), float(np.mean(losses[1])))
    with pytest.raises(ValueError, match="level_weights"):
        tf.tree_loss(p, cfg, ids, tg, level_weights=[1, 1])


def run_training(until, state=None, params=None, metrics=None):
    cfg = micro()
    tc = TrainConfig(steps=8, batch_size=4, eval_interval=2, eval_batches=1, log_interval=1000, warmup=2, seed=3)
    toks = random_tokens(4000, cfg.vocab_size)
    params = params if params is not None else tf.init_params(cfg, 3)
    state, metrics = train(params, cfg, tc, toks[:3600], toks[3600:], state=state, metrics=metrics,
                           log=lambda s: None, until=until)
    return params, state, metrics


def test_training_is_deterministic_bit_for_bit():
    """The same seed gives the same loss curve and parameters, bit for bit."""
    p1, _, m1 = run_training(8)
    p2, _, m2 = run_training(8)
    assert m1["loss"] == m2["loss"]
    assert all(np.array_equal(a, b) for a, b in zip(flatten(p1).values(), flatten(p2).values()))


def test_training_lowers_every_nodes_loss():
    """A few dozen steps on a repetitive text lower the loss of every node."""
    cfg = micro()
    toks = np.tile(np.arange(12, dtype=np.int32), 400)
    p = tf.init_params(cfg, 0)
    ids, tg = toks[None, :16], toks[None, 1:17]
    before = [np.asarray(l) for l in fast.node_losses(p, cfg, ids, tg)]
    tc = TrainConfig(steps=40, batch_size=4, eval_interval=1000, log_interval=1000, warmup=0, lr=1e-2)
    train(p, cfg, tc, toks, toks, log=lambda s: None)
    after = [np.asarray(l) for l in fast.node_losses(p, cfg, ids, tg)]
    for b, a in zip(before, after):
        assert (a < b).all()


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Training 4 steps, saving, loading and training 4 more equals training 8 steps straight."""
    p_full, _, m_full = run_training(8)
    p_half, state, m_half = run_training(4)
    cfg = micro()
    tf.save(tmp_path / "ck", p_half, cfg, {"metrics": m_half}, opt_state=state)
    p_loaded, cfg_loaded, meta = tf.load(tmp_path / "ck")
    assert cfg_loaded == cfg
    state_loaded = load_optimizer(tmp_path / "ck")
    p_res, _, m_res = run_training(8, state=state_loaded, params=p_loaded, metrics=meta["metrics"])
    assert m_res["loss"] == m_full["loss"] and m_res["val"] == m_full["val"]
    assert all(np.array_equal(a, b) for a, b in zip(flatten(p_res).values(), flatten(p_full).values()))


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    """save then load returns the same config, meta and arrays, bit for bit."""
    cfg = tf.Config.preset("sierpinski")
    p = tf.init_params(cfg, 5)
    tf.save(tmp_path / "c", p, cfg, {"step": 7, "note": "hi"})
    q, cfg2, meta = tf.load(tmp_path / "c")
    assert cfg2 == cfg and meta == {"step": 7, "note": "hi"}
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(flatten(p).values(), flatten(q).values()))


def test_corrupt_truncated_or_mismatched_checkpoint_is_refused(tmp_path):
    """A truncated npz, an edited meta.json or a config that does not fit the arrays is a ValueError."""
    cfg = micro()
    step = tf.save(tmp_path / "c", tf.init_params(cfg, 0), cfg, {})    # the step folder holding the files
    npz = step / "params.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checksum"):
        tf.load(tmp_path / "c")
    npz.write_bytes(data)
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["hidden"] = 32
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited"):
        tf.load(tmp_path / "c")
    meta["meta_sha256"] = _digest(meta)
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        tf.load(tmp_path / "c")
    (step / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        tf.load(tmp_path / "c")
    with pytest.raises(ValueError, match="not a folder"):
        tf.load(tmp_path / "missing")


logit_vectors = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=30).map(np.array)


@given(logit_vectors, st.integers(0, 10_000))
def test_top_k_one_is_argmax(logits, seed):
    """With top_k=1 the sampler always returns the argmax, at any temperature."""
    rng = np.random.default_rng(seed)
    assert sample_token(logits, rng, temperature=1.7, top_k=1) == int(np.argmax(logits))


@given(logit_vectors, st.integers(1, 30), st.floats(0.05, 1.0), st.integers(0, 10_000))
def test_tokens_outside_top_k_and_top_p_never_appear(logits, k, p, seed):
    """No draw falls outside the k most likely tokens or outside the smallest top-p set."""
    rng = np.random.default_rng(seed)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")
    allowed_k = set(order[:k].tolist()) | {i for i in range(len(logits)) if logits[i] >= np.sort(logits)[-min(k, len(logits))]}
    cum = np.cumsum(probs[order])
    allowed_p = set(order[: int(np.searchsorted(cum, p) + 1)].tolist())
    for _ in range(20):
        assert sample_token(logits, rng, 1.0, top_k=k) in allowed_k
        assert sample_token(logits, rng, 1.0, top_p=p) in allowed_p


def test_temperature_really_changes_the_distribution():
    """Lower temperature sharpens the sampling distribution; temperature 0 is greedy."""
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    hot, cold = filtered_probs(logits, 2.0), filtered_probs(logits, 0.5)
    assert cold[0] > filtered_probs(logits, 1.0)[0] > hot[0]
    assert filtered_probs(logits, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_generate_checks_node_and_settings_and_survives_long_prompts():
    """generate refuses a bad node or setting with the valid range, and slides over long prompts."""
    cfg = micro()
    p = tf.init_params(cfg, 0)
    tok = tf.Tokenizer.default()
    with pytest.raises(ValueError, match="0..1"):
        tf.generate(p, cfg, tok, "hi", level=1, index=2)
    with pytest.raises(ValueError, match="temperature"):
        tf.generate(p, cfg, tok, "hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        tf.generate(p, cfg, tok, "hi", top_p=0)
    prompt = "To be, or not to be, that is the question. " * 5
    text = tf.generate(p, cfg, tok, prompt, level=1, index=1, max_new_tokens=cfg.context + 4, seed=1)
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert tf.generate(p, cfg, tok, "ab", temperature=0, max_new_tokens=8) == \
        tf.generate(p, cfg, tok, "ab", temperature=0, max_new_tokens=8, seed=99)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyfractal", *args], capture_output=True, text=True, timeout=300)


def test_cli_train_eval_sample_round_trip(tmp_path):
    """train writes a checkpoint and metrics.json; eval --json reports every node; sample prints text."""
    out = tmp_path / "run"
    r = cli("train", "--preset", "micro", "--steps", "3", "--out", str(out), "--eval_batches=1", "--eval_interval=3")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val"]) == {"0.0", "1.0", "1.1"}
    r = cli("eval", "--ckpt", str(out), "--json", "--batches", "1")
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"0.0", "1.0", "1.1"}
    r = cli("sample", "--ckpt", str(out), "--level", "1", "--index", "1", "--prompt", "ROMEO:", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:")


@pytest.mark.parametrize("args, words", [
    (("train", "--preset", "huge", "--out", "x"), "unknown preset"),
    (("train", "--out", "x", "--hidden=90"), "divisible"),
    (("train", "--out", "x", "--nonsense=1"), "unknown setting"),
    (("eval", "--ckpt", "/no/such/dir"), "not a folder"),
    (("sample", "--ckpt", "/no/such/dir"), "not a folder"),
    (("frobnicate",), "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, words):
    """Bad command-line input prints one line on stderr and exits with code 2, no traceback."""
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("changes", [dict(), dict(coupling="upstream"), dict(coupling="downstream"),
                                     dict(tokenizer="bytes")])
def test_public_tree_loss_follows_the_variant(changes):
    """tinyfractal.tree_loss is the mean of the config's own variant's node losses, and a coupled or byte
    config never silently gets the base model's loss."""
    cfg = micro(**changes)
    p = tf.init_params(cfg, 0)
    shape = (2, cfg.context) + ((cfg.split ** (cfg.levels - 1),) if cfg.tokenizer == "bytes" else ())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, shape)   # byte batches hold rows of g_0 bytes
    losses = tf.variant_of(cfg).node_losses(p, cfg, ids, ids)
    expected = sum(float(np.sum(l)) for l in losses) / cfg.n_nodes
    assert float(tf.tree_loss(p, cfg, ids, ids)) == pytest.approx(expected, rel=1e-6)
    if changes.get("coupling"):
        base_cfg = cfg.override(coupling="none")
        base_p = {k: v for k, v in p.items() if k != "coupling_scale"}
        assert abs(float(tf.tree_loss(p, cfg, ids, ids)) - float(tf.tree_loss(base_p, base_cfg, ids, ids))) > 1e-4


def test_dropout_acts_in_training_only():
    """With dropout > 0, a training pass (rng given) differs from evaluation; evaluation is deterministic."""
    cfg = micro(dropout=0.5)
    p = tf.init_params(cfg, 0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context))
    plain = float(tf.tree_loss(p, cfg, ids, ids))
    assert plain == float(tf.tree_loss(p, cfg, ids, ids))
    assert float(tf.tree_loss(p, cfg, ids, ids, rng=np.random.default_rng(1))) != plain
    assert not np.array_equal(tf.forward(p, cfg, ids, rng=np.random.default_rng(1)), tf.forward(p, cfg, ids))
