"""Byte models (tokenizer="bytes"): the byte round trip, concepts whose byte order matters, one
distribution per slot, group-level causality, and the base laws (views, locality, per-node equals
level-batched) on byte models. Expected values are built by hand here (slices of a byte sequence,
einsum of the formula), not by the functions under test.
"""
import numpy as np
import tinyfractal as tf
import pytest
from autograd import grad
from hypothesis import assume, given
from hypothesis import strategies as st

from strategies import config_dicts, examples, random_params
from tinyfractal.core import fast
from tinyfractal.core import model
from tinyfractal.inference import sample
from tinyfractal.variants import byte_model as C
from tinyfractal.training.checkpoint import load, save
from tinyfractal.config import Config
from tinyfractal.training.data import batch_at
from tinyfractal.api import init_params, param_shapes
from tinyfractal.core.tree import flatten, group_size, index_mask, level_view, map_roles, slot_offset, view
from tinyfractal.training.train import TrainConfig, train


def byte_generate(params, cfg, prompt, level=0, index=0, max_new_bytes=200, **kw):
    """tf.generate with the byte tokenizer (what the byte model's own generate used to be)."""
    return tf.generate(params, cfg, C.ByteTokenizer(), prompt, level, index, max_new_bytes, **kw)


def byte_config(**fields):
    return Config(**{**fields, "vocab_size": 256, "tokenizer": "bytes"})


def byte_configs(max_nodes=21, min_levels=1):
    """Random valid byte configs (tests/strategies.py's configs with the 256 byte values)."""
    return config_dicts(max_nodes, min_levels).map(lambda d: byte_config(**d))


def byte_params(cfg, seed, dtype=np.float32):
    """Random parameters with every entry nonzero-ish, slot gains P and Q included."""
    params = random_params(cfg, seed, dtype)
    rng = np.random.default_rng([seed, 1])
    rows = slot_offset(cfg, cfg.levels - 1)
    params["P"] = rng.normal(0.0, 0.5, (rows, cfg.hidden)).astype(dtype)
    params["Q"] = rng.normal(0.0, 0.5, (rows, cfg.hidden)).astype(dtype)
    return params


@st.composite
def byte_models(draw, max_nodes=21, min_levels=1, dtype=np.float32):
    """(cfg, params, ids, targets): a byte model and a batch of rows of g_0 bytes, as data.batch_at gives."""
    cfg = draw(byte_configs(max_nodes, min_levels))
    params = byte_params(cfg, draw(st.integers(0, 2 ** 32 - 1)), dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    B, g = draw(st.integers(1, 2)), group_size(cfg, 0)
    window = rng.integers(0, 256, size=(B, cfg.context + 1, g))
    return cfg, params, window[:, :-1], window[:, 1:]


def with_node(strategy):
    return strategy.flatmap(lambda m: st.tuples(*map(st.just, m), st.integers(0, m[0].levels - 1).flatmap(
        lambda l: st.tuples(st.just(l), st.integers(0, m[0].split ** l - 1)))))


# The byte tokenizer

@examples(200)
@given(st.text())
def test_byte_round_trip_for_any_unicode_text(text):
    """Round trip: decode(encode(text)) == text for every string, and the ids are its UTF-8 bytes."""
    tok = C.ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_array(text)) == text


@examples(100)
@given(st.binary())
def test_decode_never_fails_and_gives_valid_text(data):
    """Any bytes decode, invalid UTF-8 as U+FFFD, into a string that is valid UTF-8 again."""
    text = C.ByteTokenizer().decode(list(data))
    assert text == data.decode("utf-8", errors="replace")
    text.encode("utf-8")


def test_bad_inputs_are_clear_value_errors():
    tok = C.ByteTokenizer()
    with pytest.raises(ValueError, match="string"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([65, 256])
    assert Config.preset("tiny").override(tokenizer="bytes").vocab_size == 256   # the variant implies it
    with pytest.raises(ValueError, match="vocab_size must be 256"):
        Config.preset("tiny").override(tokenizer="bytes", vocab_size=128)
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        Config.preset("tiny").override(tokenizer="chars")
    with pytest.raises(ValueError, match="coupling must be 'none'"):
        Config.preset("tiny").override(tokenizer="bytes", vocab_size=256, coupling="upstream")
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256)
    p = init_params(cfg)
    with pytest.raises(ValueError, match=r"\(B, T, 2\)"):
        tf.forward(p, cfg, np.zeros((1, 3, 3), dtype=int))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):       # byte groups given to a token model
        tf.forward(init_params(Config.preset("micro")), Config.preset("micro"), np.zeros((1, 3, 1), dtype=int))


# The shapes of the slot gains, and what each node sees of them

def test_slot_gains_have_one_row_per_slot_of_every_level_above_the_leaves():
    """P and Q hold g_l rows for each level l with g_l > 1; node (l, j) sees its level's rows and those below."""
    cfg = Config.preset("tiny").override(tokenizer="bytes", vocab_size=256)   # levels 3, split 2: g = 4, 2, 1
    p = init_params(cfg)
    assert p["P"].shape == p["Q"].shape == (4 + 2, 96)
    assert not p["P"].any() and not p["Q"].any()
    assert view(p, cfg, 0, 0)["P"].shape == (6, 96)
    v = view(p, cfg, 1, 1)["P"]
    assert v.shape == (2, 48) and np.shares_memory(v, p["P"])
    v[1, 0] = 7.0
    assert p["P"][4 + 1, 48] == 7.0
    assert view(p, cfg, 2, 3)["Q"].shape == (0, 24)
    assert "P" not in init_params(Config.preset("tiny"))


@examples(25)
@given(with_node(byte_models(max_nodes=40)))
def test_a_byte_nodes_view_is_a_byte_model_of_its_sub_config(args):
    """view(l, j) has exactly the arrays and shapes of a fresh byte model of cfg.sub(l), all sharing
    memory with the full arrays, and level_view's entry [j] is the very same memory."""
    cfg, params, _, _, (level, index) = args
    v = flatten(view(params, cfg, level, index))
    want = flatten(param_shapes(cfg.sub(level)))
    assert {k: a.shape for k, a in v.items()} == want
    full = flatten(params)
    stacked = flatten(level_view(params, cfg, level))
    for k, a in v.items():
        if a.size:
            assert np.shares_memory(a, full[k]), k
        s = stacked[k][index]
        assert s.shape == a.shape and s.strides == a.strides, k
        assert s.__array_interface__["data"][0] == a.__array_interface__["data"][0] or a.size == 0, k


# The concept embedding and the output

@examples(30)
@given(byte_configs(min_levels=2), st.integers(0, 2 ** 32 - 1), st.data())
def test_concept_embedding_is_the_formula(cfg, seed, data):
    """concept = rmsnorm(sum_m E[b_m] * (1 + P_0[m]), emb_norm), written with einsum in float64."""
    p = byte_params(cfg, seed, np.float64)
    g = group_size(cfg, 0)
    groups = np.random.default_rng(seed).integers(0, 256, (2, cfg.context, g))
    got = C.concept_embedding(p, cfg, groups)
    s = np.einsum("btmd,md->btd", p["E"][groups], 1.0 + p["P"][:g])
    want = s / np.sqrt((s * s).mean(-1, keepdims=True) + cfg.eps) * (1.0 + p["emb_norm"])
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)


@examples(30)
@given(byte_configs(min_levels=2), st.integers(0, 2 ** 32 - 1), st.data())
def test_swapping_two_bytes_inside_a_group_changes_the_concept_once_P_is_not_zero(cfg, seed, data):
    """Order matters: with P = 0 a group's concept is the same for any order of its bytes (a sum);
    once P != 0, swapping two different bytes of a group changes it."""
    p = byte_params(cfg, seed, np.float64)
    g = group_size(cfg, 0)
    group = np.array(data.draw(st.lists(st.integers(0, 255), min_size=g, max_size=g)))
    m, n = data.draw(st.lists(st.integers(0, g - 1), min_size=2, max_size=2, unique=True))
    assume(group[m] != group[n])
    swapped = group.copy()
    swapped[[m, n]] = group[[n, m]]
    with_p = [C.concept_embedding(p, cfg, x[None, None]) for x in (group, swapped)]
    assert np.max(np.abs(with_p[0] - with_p[1])) > 1e-6
    p["P"][:] = 0.0
    without_p = [C.concept_embedding(p, cfg, x[None, None]) for x in (group, swapped)]
    assert np.allclose(without_p[0], without_p[1], rtol=1e-12, atol=1e-12)


@examples(20)
@given(byte_configs(min_levels=2), st.integers(0, 2 ** 32 - 1))
def test_each_slot_reads_the_state_through_its_own_gain(cfg, seed):
    """Slot m's logits are (rmsnorm(x, final_norm) * (1 + Q_0[m]) * g_out) . rmsnorm_rows(E, out_norm)^T, where
    g_out is the node's output gain: 1/sqrt(d), times (1 + mean of its logit_gain row) if learned, times
    (1 + its node_gain row) with node gains."""
    p = byte_params(cfg, seed, np.float64)
    g = group_size(cfg, 0)
    x = np.random.default_rng(seed).normal(size=(2, 3, cfg.hidden))
    got = C.slot_logits(x, p, cfg, g)

    def norm(a, gain):
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.eps) * (1.0 + gain)
    g_out = np.full(cfg.hidden, 1.0 if cfg.logit_scale == "none" else 1 / np.sqrt(cfg.hidden))
    if cfg.logit_scale == "learned":
        g_out = g_out * (1 + np.mean(p["logit_gain"][0]))
    if cfg.node_gains:
        g_out = g_out * (1 + p["node_gain"][0])
    want = np.einsum("btd,d,md,vd->btmv", norm(x, p["final_norm"]), g_out, 1.0 + p["Q"][:g],
                     norm(p["E"], p["out_norm"]))
    assert got.shape == (2, 3, g, 256)
    assert np.allclose(got, want, rtol=1e-10, atol=1e-10)


# g = 1 is the base model

@examples(25)
@given(byte_models(max_nodes=40))
def test_a_byte_leaf_is_the_base_model_on_byte_ids(args):
    """g = 1: every leaf of a byte model (and a one-level byte model) gives exactly the logits of the
    base model (model.forward, fast.forward_level) on the byte ids, with the same arrays."""
    cfg, params, ids, targets = args
    leaf = cfg.levels - 1
    inputs, _ = C.level_batch(ids, targets, cfg, leaf)                           # (B,T,1)
    by_level = C.forward_level(params, cfg, leaf, inputs)[:, :, :, 0]
    assert np.array_equal(by_level, fast.forward_level(params, cfg, leaf, inputs[:, :, 0]))
    for j in range(cfg.n_models(leaf)):
        p = view(params, cfg, leaf, j)
        assert np.array_equal(C.forward(p, cfg.sub(leaf), inputs)[:, :, 0],
                              model.forward(p, cfg.sub(leaf), inputs[:, :, 0]))


# Windows: which bytes each level reads

@examples(20)
@given(byte_configs(), st.integers(1, 3), st.integers(0, 1000))
def test_each_level_reads_the_last_context_groups_and_predicts_the_next_group(cfg, B, step):
    """From one batch of rows of g_0 bytes, level l reads the last (T+1) g_l bytes of each window:
    inputs are T groups of g_l consecutive corpus bytes, targets the same bytes shifted by g_l, and
    every level's targets end at the same byte."""
    corpus = np.arange(20_000)            # every "byte" its own position, so a window shows where it starts
    rows = C.group_rows(corpus, cfg)
    ids, targets = batch_at(rows, B, cfg.context, 7, step)
    T, g0 = cfg.context, group_size(cfg, 0)
    end = ids[:, 0, 0] + (T + 1) * g0
    for level in range(cfg.levels):
        g = group_size(cfg, level)
        inputs, wanted = C.level_batch(ids, targets, cfg, level)
        assert inputs.shape == wanted.shape == (B, T, g)
        for b in range(B):
            assert np.array_equal(inputs[b].ravel(), corpus[end[b] - (T + 1) * g:end[b] - g])
            assert np.array_equal(wanted[b].ravel(), corpus[end[b] - T * g:end[b]])
        assert C.context_bytes(cfg, level) == T * g


# Causality at the group level

@examples(30)
@given(with_node(byte_models(max_nodes=21)), st.data())
def test_causality_a_groups_logits_do_not_depend_on_later_groups(args, data):
    """Changing the bytes of groups after t leaves the logits at groups 0..t unchanged; changing a byte
    of group t itself changes them (a group's own bytes are its input)."""
    cfg, params, ids, targets, (level, index) = args
    inputs, _ = C.level_batch(ids, targets, cfg, level)
    B, T, g = inputs.shape
    t = data.draw(st.integers(0, T - 1))
    later = inputs.copy()
    later[:, t + 1:] = (later[:, t + 1:] + 1 + data.draw(st.integers(0, 254))) % 256
    p, sub = view(params, cfg, level, index), cfg.sub(level)
    before, after = C.forward(p, sub, inputs), C.forward(p, sub, later)
    assert np.allclose(before[:, :t + 1], after[:, :t + 1], rtol=0, atol=1e-6)
    batched = C.forward_level(params, cfg, level, later)[index]
    assert np.allclose(batched[:, :t + 1], C.forward_level(params, cfg, level, inputs)[index][:, :t + 1],
                       rtol=0, atol=1e-6)
    if cfg.width(level) > 1:              # a width-1 rmsnorm keeps only the sign: a new byte may not show
        own = inputs.copy()
        own[:, t, data.draw(st.integers(0, g - 1))] += 1
        own %= 256
        assert not np.allclose(C.forward(p, sub, own)[:, t], before[:, t], rtol=0, atol=1e-6)


# Locality and the level-batched path

def node_loss(params, cfg, level, index, ids, targets):
    inputs, wanted = C.level_batch(ids, targets, cfg, level)
    return C.cross_entropy(C.forward(view(params, cfg, level, index), cfg.sub(level), inputs), wanted)


@examples(20)
@given(with_node(byte_models(max_nodes=21, dtype=np.float64)))
def test_locality_a_byte_nodes_gradient_is_zero_outside_its_index_set(args):
    """Locality: the gradient of one byte node's loss (reference and level-batched paths) is exactly zero
    outside index_mask(l, j), and reaches its own level's slot gains when g_l > 1."""
    cfg, params, ids, targets, (level, index) = args
    mask = flatten(index_mask(params, cfg, level, index))
    reference = flatten(grad(node_loss)(params, cfg, level, index, ids, targets))
    batched = flatten(grad(lambda p: C.node_losses(p, cfg, ids, targets)[level][index])(params))
    for g in (reference, batched):
        for name, m in mask.items():
            assert not np.any(g[name][~m]), name
    g_l, start = group_size(cfg, level), slot_offset(cfg, level)
    if g_l > 1:
        for name in ("P", "Q"):
            rows = reference[name][start:start + g_l]
            assert np.any(rows != 0), name
            assert not np.any(reference[name][start + g_l:]), name   # the levels below are not this node's


@examples(20)
@given(byte_models(max_nodes=21, dtype=np.float64))
def test_level_batched_byte_logits_losses_and_gradients_equal_the_per_node_reference(args):
    """Per-node equals level-batched: logits of every node, the tree loss, and its gradient (float64,
    to 1e-7: far below float32 rounding, so a wrong slice or gain would show)."""
    cfg, params, ids, targets = args
    for level in range(cfg.levels):
        inputs, _ = C.level_batch(ids, targets, cfg, level)
        batched = C.forward_level(params, cfg, level, inputs)
        for j in range(cfg.n_models(level)):
            assert np.allclose(batched[j], C.forward(view(params, cfg, level, j), cfg.sub(level), inputs),
                               rtol=1e-7, atol=1e-7)
    fast_loss, ref_loss = tf.tree_loss(params, cfg, ids, targets), tf.tree_loss_reference(params, cfg, ids, targets)
    assert np.isclose(fast_loss, ref_loss, rtol=1e-7)
    g_fast = flatten(grad(tf.tree_loss)(params, cfg, ids, targets))
    g_ref = flatten(grad(tf.tree_loss_reference)(params, cfg, ids, targets))
    scale = max(1.0, max(float(np.max(np.abs(g), initial=0.0)) for g in g_ref.values()))
    for name in g_ref:
        assert np.allclose(g_fast[name], g_ref[name], rtol=1e-6, atol=1e-7 * scale), name


@examples(15)
@given(byte_models(max_nodes=21))
def test_a_nodes_loss_is_the_mean_of_its_slot_losses(args):
    """A node's loss is the mean over the g_l slots of its per-slot losses, and slot m's loss is the
    cross-entropy of slot m's logits against byte m of the next group (computed here with plain NumPy)."""
    cfg, params, ids, targets = args
    per_node, per_slot = C.node_losses(params, cfg, ids, targets), C.slot_losses(params, cfg, ids, targets)
    for level in range(cfg.levels):
        assert per_slot[level].shape == (cfg.n_models(level), group_size(cfg, level))
        assert np.allclose(per_slot[level].mean(axis=1), per_node[level], rtol=1e-5, atol=1e-5)
        inputs, wanted = C.level_batch(ids, targets, cfg, level)
        logits = np.asarray(C.forward_level(params, cfg, level, inputs), dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, np.broadcast_to(wanted[None, ..., None], logits.shape[:-1] + (1,)), -1)[..., 0]
        assert np.allclose((logz - picked).mean(axis=(1, 2)), per_slot[level], rtol=1e-4, atol=1e-4)


def test_byte_gradients_are_float32_and_reach_every_node():
    """Training stays in float32, and every node gets a gradient in every array it owns."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256, levels=3, hidden=16, head_dim=8)
    params = byte_params(cfg, 0)
    rng = np.random.default_rng(0)
    window = rng.integers(0, 256, (2, cfg.context + 1, 4))
    g = grad(tf.tree_loss)(params, cfg, window[:, :-1], window[:, 1:])
    assert all(a.dtype == np.float32 for a in flatten(g).values())
    for level in range(cfg.levels):
        for j in range(cfg.n_models(level)):
            for name, a in flatten(view(g, cfg, level, j)).items():
                assert a.size == 0 or np.any(a != 0), (level, j, name)


# Generation

def test_generation_pads_a_prompt_on_the_left_with_newlines():
    """A prompt that is not whole groups is padded on the left with PAD_BYTE ("\\n"): the same text
    comes out as for the prompt with those newlines typed in front."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256, levels=3, hidden=16, head_dim=8)
    p = byte_params(cfg, 0)
    assert C.PAD_BYTE == ord("\n")
    short = byte_generate(p, cfg, "abcde", 0, 0, 12, temperature=0.9, seed=3)
    padded = byte_generate(p, cfg, "\n\n\nabcde", 0, 0, 12, temperature=0.9, seed=3)
    assert short.startswith("abcde") and padded.startswith("\n\n\nabcde")
    assert short[len("abcde"):] == padded[len("\n\n\nabcde"):]


def test_greedy_generation_takes_each_slots_argmax():
    """Slot by slot: at temperature 0 the first new group is the argmax of each slot's logits."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256, levels=3, hidden=16, head_dim=8)
    p = byte_params(cfg, 1)
    for level, g in ((0, 4), (1, 2), (2, 1)):
        text = byte_generate(p, cfg, "wxyz", level, 0, g, temperature=0)
        logits = C.forward(view(p, cfg, level, 0), cfg.sub(level), np.frombuffer(b"wxyz", np.uint8).reshape(1, -1, g))
        want = bytes(int(i) for i in logits[0, -1].argmax(-1)).decode("utf-8", errors="replace")
        assert text == "wxyz" + want


@examples(15)
@given(byte_models(max_nodes=21), st.text(max_size=6), st.integers(0, 9), st.data())
def test_generation_always_returns_valid_text_of_the_asked_length(args, prompt, n, data):
    """Any node, any prompt: the result starts with the prompt, is valid UTF-8 (invalid bytes become
    U+FFFD), and holds n new bytes (counting each U+FFFD as at least one byte)."""
    cfg, params, _, _ = args
    level = data.draw(st.integers(0, cfg.levels - 1))
    text = byte_generate(params, cfg, prompt, level, 0, n, temperature=1.0, top_k=200, top_p=0.95, seed=1)
    assert text.startswith(prompt)
    new = text[len(prompt):]
    new.encode("utf-8")
    assert len(new.replace("\ufffd", "").encode("utf-8")) + new.count("\ufffd") <= n <= len(new.encode("utf-8"))


def test_sample_generate_dispatches_byte_models():
    """sample.generate on a byte config gives the byte generation."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256)
    p = byte_params(cfg, 0)
    assert (sample.generate(p, cfg, None, "To be", 1, 1, 9, temperature=0.7, seed=2)
            == byte_generate(p, cfg, "To be", 1, 1, 9, temperature=0.7, seed=2))


# Training, checkpoints, costs

def test_training_lowers_the_byte_loss_and_a_checkpoint_round_trips(tmp_path):
    """train.train on rows of bytes uses the byte loss (it falls); save/load keeps P, Q and the tokenizer."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256, context=8)
    text = ("the cat and the dog and the bird. " * 40).encode()
    rows = C.group_rows(np.frombuffer(text, np.uint8), cfg)
    params = init_params(cfg, 0)
    tc = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup=0, eval_interval=30, eval_batches=2, log_interval=30)
    _, metrics = train(params, cfg, tc, rows, rows, log=lambda s: None)
    assert np.mean(metrics["loss"][-5:]) < np.mean(metrics["loss"][:5]) - 1.0
    assert np.any(params["P"] != 0) and np.any(params["Q"] != 0)
    save(tmp_path / "ckpt", params, cfg, {"step": 30})
    loaded, cfg2, _ = load(tmp_path / "ckpt")
    assert cfg2 == cfg and cfg2.tokenizer == "bytes"
    assert all(np.array_equal(a, b) for a, b in zip(flatten(params).values(), flatten(loaded).values()))


def test_flops_per_byte_of_a_hand_counted_model():
    """micro as bytes, levels 2 (g = 2, 1), T = 16: matmul FLOPs per byte written out by hand."""
    cfg = Config.preset("micro").override(tokenizer="bytes", vocab_size=256)
    # level 0: d=16, h=8, f=32, H=2, K=1, V=256, g=2, one layer: qkv, scores and values (T x T), Wo, MLP, 2 slots
    layer = 2 * 16 * 16 * 4 * 8 + 2 * 2 * 2 * 8 * 16 * 16 + 2 * 16 * 2 * 8 * 16 + 2 * 16 * 16 * 3 * 32
    assert C.flops_per_byte(cfg, 0) == (layer + 16 * 2 * 2 * 16 * 256) / (16 * 2)
    layer1 = 2 * 16 * 8 * 4 * 4 + 2 * 2 * 2 * 4 * 16 * 16 + 2 * 16 * 2 * 4 * 8 + 2 * 16 * 8 * 3 * 16
    assert C.flops_per_byte(cfg, 1) == (layer1 + 16 * 2 * 8 * 256) / 16


def test_the_lesson_runs_quickly(tmp_path):
    """Smoke test: the bytes lesson runs end to end with --quick and writes its figures."""
    from tinyfractal.lessons import bytes as lesson
    lesson.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "bytes_per_node.png").exists()
    assert (tmp_path / "metrics.json").exists()
