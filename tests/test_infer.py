"""The KV cache: cached logits equal the full-recompute reference at every step, for every node.

The reference is `model.forward` on the window (and `sample.generate_reference`); the cache never
computes its own expected values.
"""
import numpy as onp
import pytest
from hypothesis import given, strategies as st

from tinyfractal import Config, Tokenizer, forward, init_params, nodes, view
from tinyfractal.inference import decoder as infer
from tinyfractal.core.fast import forward_level
from tinyfractal.inference.sample import generate, generate_reference

TOL = dict(rtol=1e-4, atol=2e-4)


def lively(cfg, seed=0):
    """Random parameters whose greedy output does not repeat one token forever: the embedding's gain
    1 + g is 0.1, so the layers, not the input token, dominate the residual stream."""
    params = init_params(cfg, seed)
    params["emb_norm"][:] = -0.9
    return params


SMALL = Config.preset("tiny").override(context=12, layers=2)


@pytest.fixture(scope="module")
def small():
    return SMALL, lively(SMALL, 3)


@pytest.mark.parametrize("keep", [None, 5, 1])
def test_cached_logits_equal_full_recompute_at_every_step(small, keep):
    """For every node, each next-token distribution of cached decoding equals model.forward on the
    window it stands for, through several slides of a 12-token context."""
    cfg, params = small
    prompt = list(onp.random.default_rng(1).integers(0, cfg.vocab_size, 7))
    for level, j in nodes(cfg):
        seen = []
        ids = list(prompt)
        infer.decode(infer.node_decoder(params, cfg, level, j), ids, 20, lambda lg: int(onp.argmax(lg)), keep,
                     on_logits=lambda start, logits: seen.append((start, logits.copy())))
        assert len(seen) == 20
        assert seen[-1][0] > 0, "the window must have slid in this test"
        p, sub = view(params, cfg, level, j), cfg.sub(level)
        for n, (start, logits) in enumerate(seen):
            window = ids[start:len(prompt) + n]
            assert 1 <= len(window) <= cfg.context
            onp.testing.assert_allclose(logits, forward(p, sub, onp.asarray([window]))[0, -1], **TOL)


@pytest.mark.parametrize("keep", [None, 5, 1])
def test_window_slides_back_to_keep_tokens_when_full(small, keep):
    """The window for each token grows until it holds `context` tokens; the next token starts a window
    of its last `keep` tokens (default keep = context: always the last `context` tokens)."""
    cfg, params = small
    P, C = 5, cfg.context
    ids, starts = list(range(P)), []
    infer.decode(infer.node_decoder(params, cfg, 0, 0), ids, 30, lambda lg: int(onp.argmax(lg)), keep,
                 on_logits=lambda start, logits: starts.append(start))
    want, s = [], max(0, P - C)
    for n in range(30):
        if P + n - s > C:
            s = P + n - (keep or C)
        want.append(s)
    assert starts == want


def test_greedy_output_identical_with_and_without_cache_for_every_node(small):
    """generate (cached) and generate_reference (full recompute) give the same greedy text for every
    node, past the end of the context."""
    cfg, params = small
    tok = Tokenizer.default()
    for level, j in nodes(cfg):
        for prompt in ("ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."):
            a = generate(params, cfg, tok, prompt, level, j, max_new_tokens=25, temperature=0)
            b = generate_reference(params, cfg, tok, prompt, level, j, max_new_tokens=25, temperature=0)
            assert a == b, (level, j, prompt)


def test_sampled_output_identical_with_and_without_cache(small):
    """With the same seed, cached sampling draws the same tokens as the reference (same rng use)."""
    cfg, params = small
    tok = Tokenizer.default()
    for seed in range(3):
        kw = dict(level=1, index=1, max_new_tokens=20, temperature=1.5, top_k=20, seed=seed)
        assert generate(params, cfg, tok, "KING:", **kw) == generate_reference(params, cfg, tok, "KING:", **kw)


@given(st.integers(1, 12), st.lists(st.integers(1, 4), min_size=1, max_size=5), st.sampled_from(nodes(SMALL)))
def test_prefill_in_chunks_equals_prefill_at_once(first, chunks, node):
    """Feeding a window in any chunks through the cache gives the same logits as one prefill:
    the cache is a faithful memory of the past."""
    cfg, params = SMALL, lively(SMALL, 3)
    ids = onp.random.default_rng(first).integers(0, cfg.vocab_size, (2, cfg.context))
    m = infer.node_decoder(params, cfg, *node)
    whole, _ = infer.prefill(m, ids)
    cache = m.new_cache(2)
    parts, at = [], 0
    for size in [first] + chunks:
        size = min(size, cfg.context - at)
        if size == 0:
            break
        parts.append(infer.extend(m, cache, ids[:, at:at + size]))
        at += size
    onp.testing.assert_allclose(onp.concatenate(parts, axis=2), whole[:, :, :at], **TOL)


def test_level_batched_cache_equals_forward_level(small):
    """All models of a level in one cached set give forward_level's logits, prefill and then step by step."""
    cfg, params = small
    ids = onp.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context))
    for level in range(cfg.levels):
        m = infer.Decoder(params, cfg, level, range(cfg.n_models(level)))
        logits, cache = infer.prefill(m, ids[:, :6])
        steps = [logits] + [infer.extend(m, cache, ids[:, t:t + 1]) for t in range(6, cfg.context)]
        onp.testing.assert_allclose(onp.concatenate(steps, axis=2), forward_level(params, cfg, level, ids), **TOL)


def test_each_model_may_read_its_own_tokens(small):
    """ids of shape (N,B,T) feed model n its own tokens: the same as running each model alone."""
    cfg, params = small
    ids = onp.random.default_rng(2).integers(0, cfg.vocab_size, (4, 1, 5))
    together, _ = infer.prefill(infer.Decoder(params, cfg, 2, [0, 1, 2, 3]), ids)
    for n in range(4):
        alone, _ = infer.prefill(infer.node_decoder(params, cfg, 2, n), ids[n])
        onp.testing.assert_allclose(together[n], alone[0], **TOL)


def test_rollback_then_extend_recomputes_the_same(small):
    """Rolling a cache back and feeding other tokens equals a fresh prefill of the new sequence;
    expand/adopt keeps exactly the chosen branch."""
    cfg, params = small
    m = infer.node_decoder(params, cfg, 0, 0)
    _, cache = infer.prefill(m, [[5, 6, 7, 8, 9]])
    cache.rollback(3)
    got = infer.extend(m, cache, [[20, 21]])
    want, _ = infer.prefill(m, [[5, 6, 7, 20, 21]])
    onp.testing.assert_allclose(got[0, 0], want[0, 0, 3:], **TOL)
    branch = cache.expand(3)
    infer.extend(m, branch, [[1, 2], [30, 31], [3, 4]])
    cache.adopt(branch, 1, 6)
    got = infer.extend(m, cache, [[32]])
    want, _ = infer.prefill(m, [[5, 6, 7, 20, 21, 30, 32]])
    onp.testing.assert_allclose(got[0, 0, 0], want[0, 0, -1], **TOL)


def test_flops_counted_match_the_formula(small):
    """The counted matmul FLOPs of one cached token equal 2 x (projections + attention + output)
    multiply-adds worked out by hand."""
    cfg, params = small
    for level in range(cfg.levels):
        sub = cfg.sub(level)
        d, f, H, K, h, V = sub.hidden, sub.mlp_hidden, sub.heads, sub.kv_heads, sub.head_dim, sub.vocab_size
        m = infer.node_decoder(params, cfg, level, 0)
        _, cache = infer.prefill(m, [[1, 2, 3, 4]])
        before = m.flops
        infer.extend(m, cache, [[5]])
        slots = 5
        per_layer = d * (H + 2 * K) * h + H * h * d + 2 * H * h * slots + d * 2 * f + f * d
        assert m.flops - before == 2 * (sub.layers * per_layer + d * V)


def test_original_preset_cache_agrees_with_reference():
    """The `original` preset (context 256): cached greedy decoding equals full recompute at its size."""
    cfg = Config.preset("original")
    params = lively(cfg, 0)
    ids = list(onp.random.default_rng(0).integers(0, cfg.vocab_size, 40))
    got = infer.greedy_ids(params, cfg, ids, 6)
    want, window = [], list(ids)
    for _ in range(6):
        window.append(int(onp.argmax(forward(params, cfg, onp.asarray([window[-cfg.context:]]))[0, -1])))
        want.append(window[-1])
    assert got == want


def test_bad_inputs_are_clear_errors(small):
    """keep outside [1, context], too many tokens for the context, a batch mismatch and unsupported
    model kinds are ValueErrors that say what is allowed."""
    cfg, params = small
    tok = Tokenizer.default()
    for keep in (0, cfg.context + 1, 2.5, True):
        with pytest.raises(ValueError, match="keep"):
            generate(params, cfg, tok, "A", keep=keep)
    m = infer.node_decoder(params, cfg, 0, 0)
    with pytest.raises(ValueError, match="context"):
        infer.prefill(m, [list(range(cfg.context + 1))])
    _, cache = infer.prefill(m, [[1, 2]])
    with pytest.raises(ValueError, match="rows"):
        infer.extend(m, cache, [[1], [2]])
    with pytest.raises(ValueError, match="roll"):
        cache.rollback(5)
    with pytest.raises(ValueError, match="out of range"):
        infer.node_decoder(params, cfg, 1, 2)
    with pytest.raises(ValueError, match="distinct"):
        infer.Decoder(params, cfg, 1, [0, 0])
