"""The graded exercises: one check per exercise, registered with its lesson, title and hint.

A check receives the student's function and runs it on random inputs (fixed seeds, so a result can be
reproduced), comparing each answer with the engine's own function (`engine.py`) or with a law the
answer must obey. It returns quietly when every answer is right, and raises `Failed` with a message that
says which input went wrong otherwise. The runner (`__init__.run`) turns any other exception into a
failure too, and prints the hint.
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import engine


class Failed(Exception):
    """A check found a wrong answer; the message names the input and the difference."""


@dataclass(frozen=True)
class Exercise:
    lesson: str        # the lesson module's name: transformer, base, tokenizer, ...
    name: str          # the function the student writes in LESSON.py
    title: str
    hint: str
    check: Callable    # check(student_function) -> None, or raises Failed


EXERCISES = []


def exercise(lesson, name, title, hint):
    """Register the decorated function as the check of exercise LESSON.NAME."""
    def register(check):
        EXERCISES.append(Exercise(lesson, name, title, hint, check))
        return check
    return register


# Comparing answers

def as_array(got, what):
    try:
        return np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        raise Failed(f"{what}: returned {type(got).__name__}, not an array of numbers") from None


def expect_close(got, want, what, rtol=1e-5, atol=1e-6):
    """got must have want's shape and agree to the tolerances."""
    want = np.asarray(want, dtype=np.float64)
    got = as_array(got, what)
    if got.shape != want.shape:
        raise Failed(f"{what}: your answer has shape {got.shape}, the right one has shape {want.shape}")
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        at = f" (the first at index {i})" if i else ""
        raise Failed(f"{what}: {int(bad.sum())} of {bad.size} numbers are wrong{at}: you give {got[i]:.6g} "
                     f"where the right answer is {want[i]:.6g}")


def expect_equal(got, want, what):
    """got == want exactly (ints, tuples, lists...), with both shown on failure."""
    if got != want:
        raise Failed(f"{what}: you give {got!r}, the right answer is {want!r}")


def as_int(got, what):
    if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
        raise Failed(f"{what}: returned {got!r} ({type(got).__name__}), not an integer")
    return int(got)


def as_pairs(got, what):
    """A list of (level, index) pairs as plain int tuples."""
    try:
        return [(int(a), int(b)) for a, b in got]
    except (TypeError, ValueError):
        raise Failed(f"{what}: returned {got!r}, not a list of (level, index) pairs") from None


def random_config(rng, levels=(1, 3), splits=(2, 3), **fixed):
    """A small valid Config drawn from rng (every divisibility constraint met); `fixed` fields win."""
    L = int(rng.integers(levels[0], levels[1] + 1))
    s = int(rng.integers(splits[0], splits[1] + 1))
    leaves = s ** (L - 1)
    K = int(rng.choice([1, 2]))
    fields = dict(vocab_size=int(rng.integers(8, 20)), context=8, layers=int(rng.integers(1, 3)),
                  heads=K * int(rng.integers(1, 3)), kv_heads=K, head_dim=2 * leaves * int(rng.integers(1, 3)),
                  hidden=leaves * int(rng.integers(1, 4)), mlp_mult=int(rng.integers(1, 3)), levels=L, split=s)
    fields.update(fixed)
    return engine.Config(**fields)


def random_params(cfg, rng):
    """init_params with every array (gains and biases too) replaced by random float32 numbers."""
    params = engine.init_params(cfg, int(rng.integers(1 << 30)))
    for a in engine.flatten(params).values():
        a[...] = rng.standard_normal(a.shape).astype(np.float32) * np.float32(0.5)
    return params


def describe(cfg):
    return (f"Config(levels={cfg.levels}, split={cfg.split}, hidden={cfg.hidden}, head_dim={cfg.head_dim}, "
            f"heads={cfg.heads}, kv_heads={cfg.kv_heads}, mlp_mult={cfg.mlp_mult}, layers={cfg.layers})")


# Lesson 0: the plain transformer

@exercise("transformer", "rmsnorm", "RMSNorm with its (1+g) gain",
          "Divide by sqrt(mean(x*x over the LAST axis, keepdims=True) + eps), eps inside the square root, "
          "then multiply by (1 + g), not by g.")
def check_rmsnorm(fn):
    rng = np.random.default_rng(0)
    for shape, eps in (((3, 5), 1e-6), ((2, 4, 8), 1e-6), ((1, 1, 2), 1e-2), ((6, 16), 0.5)):
        x = rng.standard_normal(shape) * rng.uniform(0.1, 10)
        g = rng.standard_normal(shape[-1]) * 0.5
        expect_close(fn(x.copy(), g.copy(), eps), engine.rmsnorm(x, g, eps), f"rmsnorm of a {shape} array, eps={eps}")


@exercise("transformer", "causal_mask", "the causal mask",
          "Row t is the query position and column s the key position: allowed when s <= t, the lower "
          "triangle with its diagonal (np.tril of ones, as bool).")
def check_causal_mask(fn):
    for T in (1, 2, 5, 9):
        got = np.asarray(fn(T))
        want = np.array([[s <= t for s in range(T)] for t in range(T)])
        if got.shape != (T, T) or got.dtype != bool:
            raise Failed(f"causal_mask({T}): expected a ({T}, {T}) bool array, got shape {got.shape} dtype {got.dtype}")
        if not np.array_equal(got, want):
            t, s = (int(v) for v in np.argwhere(got != want)[0])
            raise Failed(f"causal_mask({T}): position {t} {'may' if want[t, s] else 'must not'} read position {s}, "
                         f"but your mask says {bool(got[t, s])}")


@exercise("transformer", "rope", "RoPE's half-split rotation",
          "Pair component m with m + h/2 (not 2m with 2m+1). The angle is position * theta**(-2*m/h) for "
          "m = 0..h/2-1; rotate (a, b) to (a cos - b sin, a sin + b cos).")
def check_rope(fn):
    rng = np.random.default_rng(1)
    for T, h, theta in ((1, 2, 100.0), (5, 4, 100.0), (7, 8, 10000.0), (4, 16, 100.0)):
        x = rng.standard_normal((T, h))
        positions = rng.integers(0, 50, size=T)
        want = np.stack([engine.rope(x[t][None, None, :], *engine.rope_tables(1, h, theta, start=int(positions[t])))[0, 0]
                         for t in range(T)])
        expect_close(fn(x.copy(), positions.copy(), theta), want,
                     f"rope of a ({T}, {h}) array at positions {positions.tolist()}, theta={theta:g}", rtol=1e-5, atol=1e-5)


@exercise("transformer", "attention", "causal multi-query attention with RoPE",
          "Check your rope and causal_mask first. Query head i reads key/value head i // (H // K); scale the "
          "scores by 1/sqrt(h); mask BEFORE the softmax (a masked score is -inf); softmax over the keys "
          "(the last axis); put the heads side by side in order before multiplying by Wo reshaped to (H*h, D).")
def check_attention(fn):
    rng = np.random.default_rng(2)
    for T, D, H, K, h, theta in ((1, 4, 2, 1, 2, 100.0), (5, 6, 4, 1, 4, 100.0), (7, 8, 4, 2, 6, 10000.0)):
        cfg = engine.Config(vocab_size=8, context=max(T, 2), layers=1, heads=H, kv_heads=K, head_dim=h, hidden=D,
                            levels=1, rope_theta=theta)
        p = {"Wq": rng.standard_normal((D, H, h)), "Wk": rng.standard_normal((D, K, h)),
             "Wv": rng.standard_normal((D, K, h)), "Wo": rng.standard_normal((H, h, D)) / math.sqrt(H * h)}
        x = rng.standard_normal((T, D))
        want = engine.attention(x[None], p, cfg)[0]
        got = fn(x.copy(), *(p[k].copy() for k in ("Wq", "Wk", "Wv", "Wo")), theta)
        expect_close(got, want, f"attention with T={T}, D={D}, H={H}, K={K}, h={h}", rtol=1e-4, atol=1e-5)


@exercise("transformer", "geglu", "the GeGLU MLP",
          "gelu goes on the GATE branch only (x Wgate + bgate), and the product is elementwise. Use the tanh "
          "form of gelu with sqrt(2/pi) and 0.044715, not the erf form.")
def check_geglu(fn):
    rng = np.random.default_rng(3)
    for T, D, F in ((1, 2, 4), (5, 6, 12), (3, 8, 32)):
        p = {"Wgate": rng.standard_normal((D, F)), "bgate": rng.standard_normal(F), "Wup": rng.standard_normal((D, F)),
             "bup": rng.standard_normal(F), "Wdown": rng.standard_normal((F, D)) / math.sqrt(F),
             "bdown": rng.standard_normal(D)}
        x = rng.standard_normal((T, D))
        want = engine.mlp(x[None], p)[0]
        got = fn(x.copy(), *(p[k].copy() for k in ("Wgate", "bgate", "Wup", "bup", "Wdown", "bdown")))
        expect_close(got, want, f"geglu with T={T}, D={D}, F={F}", rtol=1e-5, atol=1e-6)


@exercise("transformer", "tied_logits", "the tied output through the normalised embedding",
          "Two RMSNorms: x with the final_norm gain, and every ROW of E with the out_norm gain; then the dot "
          "product of each position with each row: (T, D) @ (D, V).")
def check_tied_logits(fn):
    rng = np.random.default_rng(4)
    for V, D, T, eps in ((8, 4, 1, 1e-6), (12, 6, 5, 1e-2), (20, 8, 7, 1e-6)):
        E, x = rng.standard_normal((V, D)), rng.standard_normal((T, D)) * 3
        final_norm, out_norm = rng.standard_normal(D) * 0.5, rng.standard_normal(D) * 0.5
        want = engine.tied_logits(x, E, final_norm, out_norm, eps)
        got = fn(x.copy(), E.copy(), final_norm.copy(), out_norm.copy(), eps)
        expect_close(got, want, f"tied_logits with V={V}, D={D}, T={T}, eps={eps:g}", rtol=1e-5, atol=1e-5)


@exercise("transformer", "param_count", "count the parameters of a one-level model",
          "Per layer: two norm gains (D each), Wq D*H*h, Wk and Wv D*K*h each, Wo H*h*D, Wgate and Wup D*F "
          "each with biases of F, Wdown F*D with a bias of D. Outside the layers: E (V*D), three gains of D, and "
          "the default output's two tables logit_gain and node_gain, (1, D) each.")
def check_param_count(fn):
    rng = np.random.default_rng(5)
    for _ in range(6):
        cfg = random_config(rng, levels=(1, 1), vocab_size=int(rng.integers(8, 300)))
        want = engine.count_params(engine.init_params(cfg, 0))
        got = as_int(fn(cfg.vocab_size, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.layers),
                     "param_count")
        expect_equal(got, want, f"param_count for V={cfg.vocab_size}, D={cfg.hidden}, H={cfg.heads}, "
                                f"K={cfg.kv_heads}, h={cfg.head_dim}, F={cfg.mlp_hidden}, layers={cfg.layers}")


@exercise("transformer", "unrelated_logit_std", "predict the logit scale of a fresh model",
          "A raw logit (logit_scale='none', no 1/sqrt(d)) is the dot product of two vectors of length sqrt(d). "
          "How large is the dot product of two vectors pointing in random directions, as a function of d?")
def check_unrelated_logit_std(fn):
    rng = np.random.default_rng(6)
    for d in (16, 36, 64):
        cfg = engine.Config(vocab_size=128, context=32, layers=2, heads=4, kv_heads=1, head_dim=16, hidden=d, levels=1,
                            logit_scale="none")   # the raw dot products, before any 1/sqrt(d) scale
        ids = rng.integers(0, 128, size=(8, 32))
        logits = np.asarray(engine.forward(engine.init_params(cfg, int(rng.integers(1000))), cfg, ids))
        others = np.ones(logits.shape, dtype=bool)
        np.put_along_axis(others, ids[..., None], False, -1)
        measured = float(logits[others].std())
        got = fn(d)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise Failed(f"unrelated_logit_std({d}) returned {got!r}, not a number") from None
        if not abs(got - measured) <= 0.15 * measured:
            raise Failed(f"unrelated_logit_std({d}) = {got:.3g}, but the raw logits of a fresh model of width {d} measure "
                         f"{measured:.3g} (15% allowed)")


# Lesson 1: the base model, a tree of models

@exercise("base", "n_nodes", "how many models a tree holds",
          "Level l holds split**l models; add them up for l = 0 .. levels-1.")
def check_n_nodes(fn):
    for levels in (1, 2, 3, 4):
        for split in (2, 3, 4):
            cfg = engine.Config(levels=levels, split=split, hidden=split ** (levels - 1),
                                head_dim=2 * split ** (levels - 1), heads=1)
            expect_equal(as_int(fn(levels, split), "n_nodes"), len(engine.nodes(cfg)),
                         f"n_nodes({levels}, {split})")


@exercise("base", "children", "the children of a node",
          "Child r of (l, j) is (l + 1, split*j + r), r = 0 .. split-1; a node at the last level has none.")
def check_children(fn):
    rng = np.random.default_rng(10)
    for _ in range(4):
        cfg = random_config(rng)
        for level, index in engine.nodes(cfg):
            got = as_pairs(fn(cfg, level, index), f"children(cfg, {level}, {index})")
            expect_equal(got, engine.children(cfg, level, index), f"children of ({level}, {index}) in {describe(cfg)}")


@exercise("base", "node_slice", "write node_slices for one role",
          "The block length is the full length (D for R, F = cfg.mlp_hidden for M, hd = cfg.head_dim for C) "
          "divided by split**level, not by 2**level; model j's block starts at j times that length.")
def check_node_slice(fn):
    rng = np.random.default_rng(11)
    for _ in range(5):
        cfg = random_config(rng)
        full = {"R": cfg.hidden, "M": cfg.mlp_hidden, "C": cfg.head_dim}
        for level, index in engine.nodes(cfg):
            for role in "RMC":
                got = fn(cfg, level, index, role)
                if not isinstance(got, slice):
                    raise Failed(f"node_slice(cfg, {level}, {index}, {role!r}) returned {got!r}; return a slice(start, stop)")
                want = engine.node_slices(cfg, level, index, (role,))[0].indices(full[role])[:2]
                expect_equal(got.indices(full[role])[:2], want,
                             f"(start, stop) of node ({level}, {index}) along role {role} in {describe(cfg)}")


VIEW_NAMES = ("E", "emb_norm", "final_norm", "out_norm", "attn_norm", "mlp_norm", "Wq", "Wk", "Wv", "Wo",
              "Wgate", "Wup", "bgate", "bup", "Wdown", "bdown")


@exercise("base", "view_array", "cut one model's weights out of the shared arrays (the role table)",
          "Index with basic slices only (a[rows, :, cols]), never with lists or boolean masks: those copy. "
          "Wq, Wk, Wv are (R, heads, C); Wo is (heads, C, R); the vocabulary and head axes are shared whole.")
def check_view_array(fn):
    rng = np.random.default_rng(12)
    for _ in range(3):
        cfg = random_config(rng, levels=(2, 3))
        params = random_params(cfg, rng)
        for level, index in engine.nodes(cfg):
            want_all = engine.view(params, cfg, level, index)
            for name in VIEW_NAMES:
                a = params[name] if name in params else params["layers"][0][name]
                want = want_all[name] if name in want_all else want_all["layers"][0][name]
                got = fn(name, a, cfg, level, index)
                what = f"view_array({name!r}, ..., level={level}, index={index}) in {describe(cfg)}"
                if not isinstance(got, np.ndarray):
                    raise Failed(f"{what}: returned {type(got).__name__}, not a NumPy array")
                if got.shape != want.shape:
                    raise Failed(f"{what}: shape {got.shape}, the model's view has shape {want.shape}")
                if not np.shares_memory(got, a):
                    raise Failed(f"{what}: a copy, not a view of the full array")
                if (got.__array_interface__["data"][0], got.strides) != (want.__array_interface__["data"][0], want.strides):
                    raise Failed(f"{what}: a view of the wrong block of the full array")


@exercise("base", "node_params", "count a leaf's (or any node's) parameters",
          "A model at level l is a whole model of width D/s^l, head dim hd/s^l and MLP width F/s^l, with ALL "
          "the heads and the whole vocabulary: count its arrays, do not divide the root's count by s^l. The "
          "default output adds logit_gain and node_gain: rows l and deeper of the node's own columns.")
def check_node_params(fn):
    rng = np.random.default_rng(13)
    for _ in range(5):
        cfg = random_config(rng, levels=(2, 3))
        params = engine.init_params(cfg, 0)
        for level in range(cfg.levels):
            expect_equal(as_int(fn(cfg, level), "node_params"), engine.count_params(engine.view(params, cfg, level, 0)),
                         f"node_params at level {level} of {describe(cfg)}")


@exercise("base", "tree_loss", "the tree loss from the per-node losses",
          "Every NODE counts the same: take the mean over all models of all levels together, not the mean of "
          "the per-level means (the deeper levels hold more models).")
def check_tree_loss(fn):
    rng = np.random.default_rng(14)
    for _ in range(3):
        cfg = random_config(rng, levels=(2, 3))
        params = random_params(cfg, rng)
        ids = rng.integers(0, cfg.vocab_size, size=(2, cfg.context))
        targets = rng.integers(0, cfg.vocab_size, size=(2, cfg.context))
        losses = [np.array(level, dtype=np.float64) for level in engine.node_losses(params, cfg, ids, targets)]
        want = float(engine.tree_loss(params, cfg, ids, targets))
        got = fn([level.copy() for level in losses], cfg)
        expect_close(got, want, f"tree_loss for {describe(cfg)} (per-level losses {[np.round(l, 3).tolist() for l in losses]})",
                     rtol=1e-5, atol=1e-6)


@exercise("base", "deepest_owner", "who owns an entry of Wgate (the ownership map)",
          "Go from the deepest level up: the first model whose R block holds the row AND whose M block holds "
          "the column is the answer. Entries off every diagonal block belong to the root only.")
def check_deepest_owner(fn):
    rng = np.random.default_rng(15)
    for _ in range(3):
        cfg = random_config(rng, levels=(2, 3))
        params = engine.init_params(cfg, 0)
        masks = {node: engine.index_mask(params, cfg, *node)["layers"][0]["Wgate"] for node in engine.nodes(cfg)}
        D, F = cfg.hidden, cfg.mlp_hidden
        for row, col in zip(rng.integers(0, D, 40), rng.integers(0, F, 40)):
            owners = [node for node in engine.nodes(cfg) if masks[node][row, col]]
            want = max(owners)                                  # nodes sort by level first
            got = fn(cfg, int(row), int(col))
            try:
                got = (int(got[0]), int(got[1]))
            except (TypeError, ValueError, IndexError):
                raise Failed(f"deepest_owner(cfg, {row}, {col}) returned {got!r}, not a (level, index) pair") from None
            expect_equal(got, want, f"deepest_owner(cfg, {row}, {col}) in {describe(cfg)}")


# Lesson 2: the tokenizer

def _small_ids(rng, n_symbols=3, max_len=20):
    return [int(v) for v in rng.integers(0, n_symbols, size=int(rng.integers(0, max_len + 1)))]


@exercise("tokenizer", "merge_pair", "merge one pair everywhere",
          "Scan left to right; when (ids[i], ids[i+1]) is the pair, emit new_id and jump two places, else emit "
          "ids[i] and move one. A run 7 7 7 becomes new 7, not new new.")
def check_merge_pair(fn):
    rng = np.random.default_rng(20)
    cases = [([7, 7, 7], (7, 7)), ([7, 7, 7, 7], (7, 7)), ([], (0, 1)), ([1], (1, 1))]
    cases += [(_small_ids(rng), (int(rng.integers(3)), int(rng.integers(3)))) for _ in range(30)]
    for ids, pair in cases:
        got = fn(list(ids), pair, 99)
        try:
            got = [int(v) for v in got]
        except (TypeError, ValueError):
            raise Failed(f"merge_pair({ids}, {pair}, 99) returned {got!r}, not a list of ids") from None
        expect_equal(got, engine.merge_list(list(ids), pair, 99), f"merge_pair({ids}, {pair}, 99)")


@exercise("tokenizer", "pair_counts", "the BPE pair count",
          "Count what a merge would really do: in a run a a a a the pair (a, a) fires twice, not three times "
          "(non-overlapping, left to right). collections.Counter(zip(ids, ids[1:])) counts overlaps.")
def check_pair_counts(fn):
    rng = np.random.default_rng(21)
    cases = [[7, 7, 7], [7, 7, 7, 7], [1, 2, 1, 2], [5]] + [_small_ids(rng, 4, 25) for _ in range(25)]
    for ids in cases:
        got = fn(list(ids))
        try:
            got = {(int(a), int(b)): int(n) for (a, b), n in dict(got).items() if n}
        except (TypeError, ValueError):
            raise Failed(f"pair_counts({ids}) returned {got!r}, not a dict {{(a, b): count}}") from None
        want = {p: len(ids) - len(engine.merge_list(list(ids), p, -1)) for p in set(zip(ids, ids[1:]))}
        expect_equal(dict(sorted(got.items())), dict(sorted(want.items())), f"pair_counts({ids})")


_CORPUS = []


def _corpus():
    if not _CORPUS:
        _CORPUS.append(engine.CORPUS.read_text(encoding="utf-8")[:200_000])
    return _CORPUS[0]


@exercise("tokenizer", "encode", "rank-order BPE encoding",
          "Apply the merges one after the other in RANK order, each over the whole list (use your merge_pair); "
          "do not scan the text once, greedily taking the longest token (the prototype's encoder did that).")
def check_encode(fn):
    rng = np.random.default_rng(22)
    tok = engine.Tokenizer.default()
    text = _corpus()
    samples = ["First Citizen:", "the", "thee", "Thee", "a", "\n\n", "JULIET:\nO Romeo, Romeo!"]
    for _ in range(20):
        start = int(rng.integers(0, len(text) - 80))
        samples.append(text[start:start + int(rng.integers(1, 80))])
    for s in samples:
        got = fn(s, list(tok.chars), [tuple(m) for m in tok.merges])
        try:
            got = [int(v) for v in got]
        except (TypeError, ValueError):
            raise Failed(f"encode({s!r}) returned {got!r}, not a list of ids") from None
        want = tok.encode(s)
        if got != want:
            shown = lambda ids: "|".join(tok.token_strings[i] if 0 <= i < tok.vocab_size else "?" for i in ids)
            raise Failed(f"encode({s!r}): you give {shown(got)!r}, the tokenizer gives {shown(want)!r}")


@exercise("tokenizer", "first_merge", "the first merge of BPE training",
          "Three rules: both sides letters or both not (str.isalpha); count non-overlapping occurrences (your "
          "pair_counts); on a tie take the smallest (id_a, id_b), with ids from the SORTED characters.")
def check_first_merge(fn):
    rng = np.random.default_rng(23)
    alphabet = list("aabbcde  ,.\n")
    texts = ["aaaa bb", "ab ab, ab.", "e e e e", "hello, hello.", "xyxy yx, ,,", "ba ab ba ab"]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(4, 40)))) for _ in range(30)]
    for text in texts:
        try:
            tok = engine.train_bpe(text, 1)
        except ValueError:          # nothing may merge in this text
            continue
        a, b = tok.merges[0]
        want = (tok.token_strings[a], tok.token_strings[b])
        got = fn(text)
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        expect_equal(got, want, f"first_merge({text!r})")


# Lesson 3: speculative decoding

@exercise("speculative", "accept_greedy", "greedy verification of a draft",
          "Compare draft[i] with verifier_tokens[i] from i = 0 and stop at the FIRST disagreement; the next "
          "token is verifier_tokens[accepted] (the verifier's own choice at the first refused place, or the "
          "bonus token after a full draft).")
def check_accept_greedy(fn):
    rng = np.random.default_rng(30)
    for _ in range(40):
        k = int(rng.integers(1, 6))
        draft, verifier = rng.integers(0, 3, size=k), rng.integers(0, 3, size=k + 1)
        _, a, nxt = engine.accept_greedy(verifier[None], draft[None])
        got = fn(draft.copy(), verifier.copy())
        try:
            got = (int(got[0]), int(got[1]))
        except (TypeError, ValueError, IndexError):
            raise Failed(f"accept_greedy returned {got!r}, not (accepted, next_token)") from None
        expect_equal(got, (a, nxt), f"accept_greedy(draft={draft.tolist()}, verifier_tokens={verifier.tolist()})")


@exercise("speculative", "acceptance_rate", "compute an acceptance rate",
          "Sum over tokens t of q(t) * min(1, p(t)/q(t)): the chance to draw t times the chance to keep it. "
          "It simplifies to a sum of minimums.")
def check_acceptance_rate(fn):
    rng = np.random.default_rng(31)
    for trial in range(3):
        V = 5
        p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
        kept, n = 0, 2000
        for _ in range(n):                                  # the engine's own accept/reject rule, k = 1
            t = int(rng.choice(V, p=q))
            a, _ = engine.accept_sampled(np.stack([p, p]), q[None], np.array([t]), rng)
            kept += a
        measured = kept / n
        try:
            got = float(fn(p.copy(), q.copy()))
        except (TypeError, ValueError):
            raise Failed("acceptance_rate must return a number") from None
        if not abs(got - measured) <= 0.04:
            raise Failed(f"acceptance_rate(p={np.round(p, 3).tolist()}, q={np.round(q, 3).tolist()}) = {got:.4f}, "
                         f"but the engine's accept/reject rule kept {measured:.4f} of {n} drafted tokens")


@exercise("speculative", "residual", "the distribution a rejected token is redrawn from",
          "max(0, p - q) elementwise, divided by its sum. That is p where p exceeds q, shifted down by q, and "
          "0 where the drafter over-proposes.")
def check_residual(fn):
    rng = np.random.default_rng(32)
    cases = [(rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))) for _ in range(10)]
    sparse = rng.dirichlet(np.ones(6))
    sparse[:2] = 0
    cases += [(sparse / sparse.sum(), rng.dirichlet(np.ones(6))), (cases[0][0], cases[0][0])]
    for p, q in cases:
        r = as_array(fn(p.copy(), q.copy()), "residual")
        what = f"residual(p={np.round(p, 3).tolist()}, q={np.round(q, 3).tolist()})"
        if r.shape != p.shape or (r < -1e-12).any() or not abs(r.sum() - 1) < 1e-9:
            raise Failed(f"{what} = {np.round(r, 4).tolist()}: not a distribution over the {p.size} tokens")
        kept = np.minimum(p, q)                             # drawn from q AND kept
        produced = kept + (1 - kept.sum()) * r              # ... or refused, then redrawn from r
        if not np.allclose(produced, p, rtol=0, atol=1e-9):
            raise Failed(f"{what} = {np.round(r, 4).tolist()}: accept-or-redraw then gives "
                         f"{np.round(produced, 4).tolist()}, not p")


@exercise("speculative", "expected_tokens", "tokens per verifier pass",
          "P(exactly a drafted tokens kept) = alpha^a (1 - alpha) for a < k, alpha^k for a = k, and every pass "
          "adds one token of the verifier's own. The mean is a geometric sum: 1 + alpha + ... + alpha^k.")
def check_expected_tokens(fn):
    rng = np.random.default_rng(33)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        for k in (1, 3, 5):
            keep = rng.random((20000, k)) < alpha
            simulated = float(np.cumprod(keep, axis=1).sum(axis=1).mean() + 1)
            try:
                got = float(fn(alpha, k))
            except (TypeError, ValueError):
                raise Failed("expected_tokens must return a number") from None
            if not abs(got - simulated) <= 0.02 * simulated:
                raise Failed(f"expected_tokens({alpha}, {k}) = {got:.4f}, but 20,000 simulated passes give "
                             f"{simulated:.4f} tokens each")


@exercise("speculative", "drafters", "the sub-models that can draft for a node",
          "A node at level v with index i holds, at a deeper level l, the split**(l - v) consecutive models "
          "starting at index i * split**(l - v).")
def check_drafters(fn):
    rng = np.random.default_rng(34)
    for _ in range(5):
        cfg = random_config(rng, levels=(2, 4), splits=(2, 3))
        for verifier in engine.nodes(cfg):
            for level in range(verifier[0] + 1, cfg.levels):
                got = as_pairs(fn(cfg, verifier, level), "drafters")
                expect_equal(got, engine.resolve_drafters(cfg, verifier, level),
                             f"drafters of {verifier} at level {level} in {describe(cfg)}")


# Lesson 4: merging

@exercise("merging", "parent_config", "the config one level up",
          "The parent is split times as wide AND has split times the head dim (every model keeps all the "
          "heads), with one more level; everything else, split included, stays.")
def check_parent_config(fn):
    rng = np.random.default_rng(40)
    for _ in range(8):
        child = random_config(rng, levels=(1, 3))
        got = fn(child, child.split)
        want = engine.parent_config(child, child.split)
        if got != want:
            diff = [f"{k}={getattr(got, k, None)!r} (right: {getattr(want, k)!r})" for k in want.to_dict()
                    if getattr(got, k, None) != getattr(want, k)]
            raise Failed(f"parent_config({describe(child)}, {child.split}): wrong {', '.join(diff) or repr(got)}")


@exercise("merging", "merge2", "write merge for split 2",
          "Start from zeros of the parent's shapes (parent_config), then write each child through the parent's "
          "VIEW of node (1, r): tf.view returns views, so view[...] = child writes into the parent's arrays.")
def check_merge2(fn):
    rng = np.random.default_rng(41)
    for _ in range(3):
        child_cfg = random_config(rng, levels=(1, 2), splits=(2, 2))
        kids = [random_params(child_cfg, rng) for _ in range(2)]
        want, cfg = engine.merge(kids, child_cfg, 2)
        got = fn(*[{k: [dict(l) for l in v] if k == "layers" else v.copy() for k, v in kid.items()} for kid in kids],
                 child_cfg)
        try:
            got = engine.flatten(got)
        except (AttributeError, KeyError, TypeError):
            raise Failed(f"merge2 returned {type(got).__name__}, not a params dict like init_params gives") from None
        for name, w in engine.flatten(want).items():
            what = f"merge2 for children of {describe(child_cfg)}: array {name}"
            if name not in got:
                raise Failed(f"{what} is missing")
            g = np.asarray(got[name])
            if g.shape != w.shape or g.dtype != w.dtype:
                raise Failed(f"{what} has shape {g.shape} {g.dtype}, the merged model needs {w.shape} {w.dtype}")
            if not np.array_equal(g, w):
                i = tuple(int(v) for v in np.argwhere(g != w)[0])
                raise Failed(f"{what} at {i} is {g[i]:.4g}, the merge gives {w[i]:.4g}")


@exercise("merging", "new_entries", "how many entries are new after a merge",
          "The children's index sets inside the parent never overlap, and each child owns exactly as many "
          "entries as a model of config child_cfg has.")
def check_new_entries(fn):
    rng = np.random.default_rng(42)
    for _ in range(6):
        child = random_config(rng, levels=(1, 3))
        cfg = engine.parent_config(child, child.split)
        params = engine.init_params(cfg, 0)
        want = int(sum(m.sum() for m in engine.trainable_mask(params, cfg, 1).values()))
        expect_equal(as_int(fn(child, child.split), "new_entries"), want,
                     f"new_entries for {child.split} children of {describe(child)}")


@exercise("merging", "extract", "a standalone copy of one node",
          "tf.view gives the right blocks but as views; copy every array with np.array(a, copy=True, order='C') "
          "(np.ascontiguousarray returns the same memory when the view is already contiguous).")
def check_extract(fn):
    rng = np.random.default_rng(43)
    for _ in range(3):
        cfg = random_config(rng, levels=(2, 3))
        params = random_params(cfg, rng)
        level = int(rng.integers(0, cfg.levels))
        index = int(rng.integers(0, cfg.n_models(level)))
        got = fn(params, cfg, level, index)
        try:
            got = engine.flatten(got)
        except (AttributeError, KeyError, TypeError):
            raise Failed(f"extract returned {type(got).__name__}, not a params dict") from None
        flat_params = list(engine.flatten(params).values())
        for name, w in engine.flatten(engine.extract(params, cfg, level, index)).items():
            what = f"extract(params, cfg, {level}, {index}) for {describe(cfg)}: array {name}"
            g = got.get(name)
            if not isinstance(g, np.ndarray):
                raise Failed(f"{what} is missing or not a NumPy array")
            expect_close(g, w, what, rtol=0, atol=0)
            if any(np.shares_memory(g, a) for a in flat_params):
                raise Failed(f"{what} shares memory with params: a view, not a copy")
            if not g.flags["C_CONTIGUOUS"]:
                raise Failed(f"{what} is not contiguous")


# Lesson 5: coupling

@exercise("coupling", "upstream_received", "what an upstream parent receives",
          "Reshape to (N, split, B, T, d), move the split axis next to d (transpose to N, B, T, split, d), "
          "then reshape to (N, B, T, split*d). A reshape alone interleaves the wrong numbers.")
def check_upstream_received(fn):
    rng = np.random.default_rng(50)
    for s, N, B, T, d in ((2, 1, 1, 3, 2), (2, 2, 2, 4, 3), (3, 3, 1, 2, 2), (4, 1, 2, 1, 1)):
        x = rng.standard_normal((s * N, B, T, d))
        expect_close(fn(x.copy(), s), engine.concat_children(x, s),
                     f"upstream_received of states {x.shape} with split {s}", rtol=0, atol=0)


@exercise("coupling", "downstream_received", "what a downstream child receives",
          "Child k's parent is k // split, and it sits at position r = k % split among its siblings, so it "
          "gets the parent's coordinates [r*d, (r+1)*d).")
def check_downstream_received(fn):
    rng = np.random.default_rng(51)
    for s, N, B, T, d in ((2, 1, 1, 3, 2), (2, 2, 2, 4, 3), (3, 3, 1, 2, 2), (4, 1, 2, 1, 1)):
        x = rng.standard_normal((N, B, T, s * d))
        expect_close(fn(x.copy(), s), engine.split_to_children(x, s),
                     f"downstream_received of states {x.shape} with split {s}", rtol=0, atol=0)


@exercise("coupling", "needed_nodes", "which nodes run to get one node's logits",
          "Upstream: a parent reads its children, who read theirs, so the whole subtree runs. Downstream: a "
          "child reads its parent, who reads its own, so the chain of ancestors runs. None: the node alone.")
def check_needed_nodes(fn):
    rng = np.random.default_rng(52)
    for coupling in ("none", "upstream", "downstream"):
        for _ in range(3):
            cfg = random_config(rng, levels=(1, 3), coupling=coupling)
            for level, index in engine.nodes(cfg):
                got = as_pairs(fn(cfg, level, index), "needed_nodes")
                expect_equal(sorted(got), engine.needed_nodes(cfg, level, index),
                             f"needed_nodes of ({level}, {index}) under coupling={coupling!r} in {describe(cfg)}")


# Lesson 6: bytes and concepts

def _byte_config(rng, levels=(1, 4)):
    return random_config(rng, levels=levels, vocab_size=256, tokenizer="bytes", context=int(rng.integers(4, 65)))


@exercise("bytes", "group_size", "bytes per position at each level",
          "The leaves (level L-1) read single bytes; each level up reads groups split times longer.")
def check_group_size(fn):
    rng = np.random.default_rng(60)
    for _ in range(6):
        cfg = _byte_config(rng)
        for level in range(cfg.levels):
            expect_equal(as_int(fn(cfg, level), "group_size"), engine.group_size(cfg, level),
                         f"group_size at level {level} of {describe(cfg)}")


@exercise("bytes", "slot_offset", "where a level's slot gains start",
          "Add up the group sizes of the levels ABOVE this one (levels 0 .. level-1).")
def check_slot_offset(fn):
    rng = np.random.default_rng(61)
    for _ in range(6):
        cfg = _byte_config(rng)
        for level in range(cfg.levels):
            expect_equal(as_int(fn(cfg, level), "slot_offset"), engine.slot_offset(cfg, level),
                         f"slot_offset at level {level} of {describe(cfg)}")


@exercise("bytes", "context_bytes", "how much text each level sees",
          "Every level has cfg.context positions, and one position of a level-l model reads g_l bytes.")
def check_context_bytes(fn):
    rng = np.random.default_rng(62)
    for _ in range(6):
        cfg = _byte_config(rng)
        for level in range(cfg.levels):
            expect_equal(as_int(fn(cfg, level), "context_bytes"), engine.context_bytes(cfg, level),
                         f"context_bytes at level {level} of {describe(cfg)} (context {cfg.context})")


@exercise("bytes", "concept_embedding", "compute a byte group's concept embedding",
          "Look up one row of E per byte, multiply row m by (1 + P[m]) (a different gain per slot), add the "
          "rows up, then one RMSNorm of the sum with the emb_norm gain.")
def check_concept_embedding(fn):
    rng = np.random.default_rng(63)
    for _ in range(3):
        cfg = _byte_config(rng, levels=(2, 3)).override(eps=float(rng.choice([1e-6, 1e-2])))
        params = random_params(cfg, rng)
        g = engine.group_size(cfg, 0)
        groups = rng.integers(0, 256, size=(2, 3, g))
        want = np.asarray(engine.concept_embedding(params, cfg, groups))     # (B,T,D)
        P = params["P"][:g]                                                   # level 0's slot gains
        for b in range(2):
            for t in range(3):
                got = fn(params["E"].copy(), P.copy(), params["emb_norm"].copy(), groups[b, t].copy(), cfg.eps)
                expect_close(got, want[b, t], f"concept_embedding of the group {groups[b, t].tolist()} "
                                              f"(g={g}, eps={cfg.eps:g})", rtol=1e-4, atol=1e-5)


# Lesson 7: is Shakespeare fractal?

def _series(rng, n, hurst=None, scale=1.0, shift=0.0):
    """A test series: fractional Gaussian noise of the given H (white noise if None), scaled and shifted."""
    x = rng.standard_normal(n) if hurst is None else engine.fgn(n, hurst, rng)
    return x * scale + shift


def as_float(got, what):
    try:
        return float(got)
    except (TypeError, ValueError):
        raise Failed(f"{what}: returned {got!r}, not a number") from None


@exercise("fractal", "token_bits", "a token's surprisal in bits",
          "Take the log-softmax with the largest logit subtracted first (log-sum-exp), so exp never sees a "
          "number in the hundreds; then divide nats by ln 2 to get bits, and keep the minus sign.")
def check_token_bits(fn):
    rng = np.random.default_rng(70)
    for V, scale in ((2, 1.0), (5, 3.0), (128, 10.0), (64, 300.0), (16, 900.0)):
        logits = rng.standard_normal(V) * scale
        for target in (0, int(rng.integers(V)), int(np.argmax(logits))):
            got = as_float(fn(logits.copy(), target), "token_bits")
            expect_close(got, engine.token_bits(logits, target),
                         f"token_bits of {V} logits of scale {scale:g}, target {target}", rtol=1e-9, atol=1e-9)


@exercise("fractal", "integral_process", "the random walk of a series",
          "Standardise first ((x - x.mean()) / x.std()), then np.cumsum, and put a 0 in front: the answer "
          "has one point more than x.")
def check_integral_process(fn):
    rng = np.random.default_rng(71)
    for n, scale, shift in ((128, 1.0, 0.0), (200, 0.3, 2.5), (513, 7.0, -40.0)):
        x = _series(rng, n, scale=scale, shift=shift)
        expect_close(fn(x.copy()), engine.integral_process(x),
                     f"integral_process of {n} points (mean {shift:g}, std {scale:g})", rtol=1e-9, atol=1e-9)


@exercise("fractal", "rescaled_range", "the rescaled range R/S of a series at one window size",
          "Subtract each BLOCK's own mean before the cumulative sum (Y ends at 0), take max - min of Y, and "
          "divide by the standard deviation of the block itself, not of Y.")
def check_rescaled_range(fn):
    rng = np.random.default_rng(72)
    for n_points, hurst, scale, shift in ((600, None, 1.0, 0.0), (1000, 0.7, 2.0, 5.0), (777, 0.3, 0.1, -1.0)):
        x = _series(rng, n_points, hurst, scale, shift)
        fit = engine.hurst_rs(x)                # its values are the mean R/S at its window sizes
        for n, want in zip(fit.scales.astype(int), fit.values):
            got = as_float(fn(x.copy(), int(n)), "rescaled_range")
            expect_close(got, want, f"rescaled_range of {n_points} points, blocks of {n}", rtol=1e-9, atol=1e-9)


@exercise("fractal", "hurst", "the Hurst exponent by rescaled range",
          "np.polyfit(np.log(windows), np.log(ratios), 1)[0]: both axes in logarithms (any base, but the SAME "
          "base on both), one point per window size, and the slope is H itself.")
def check_hurst(fn):
    rng = np.random.default_rng(73)
    for n_points, hurst, scale, shift in ((1024, None, 1.0, 0.0), (2048, 0.7, 3.0, 1.0), (2048, 0.3, 0.5, 0.0)):
        x = _series(rng, n_points, hurst, scale, shift)
        fit = engine.hurst_rs(x)
        windows = [int(n) for n in fit.scales]
        got = as_float(fn(x.copy(), windows), "hurst")
        label = "white noise" if hurst is None else f"fGn with H = {hurst}"
        expect_close(got, fit.exponent, f"hurst of {n_points} points of {label}, windows {windows[0]}..{windows[-1]}",
                     rtol=1e-7, atol=1e-9)


@exercise("fractal", "self_similarity", "the self-similarity exponent S (and D = 2 - S)",
          "eps is in units of the STANDARDISED walk: build X with your integral_process, count the "
          "fraction of t with |X[t+tau] - X[t]| <= eps for each tau, fit log p against log tau, and return "
          "MINUS the slope (p falls as tau grows, S is positive).")
def check_self_similarity(fn):
    rng = np.random.default_rng(74)
    for n_points, hurst, scale, shift, eps in ((4096, 0.6, 0.05, 3.0, 0.2), (4096, 0.4, 20.0, 0.0, 0.1),
                                              (2048, None, 1.0, 0.0, 0.2)):
        x = _series(rng, n_points, hurst, scale, shift)
        fit = engine.self_similarity(x, eps)
        taus = [int(t) for t in fit.scales]
        got = as_float(fn(x.copy(), eps, taus), "self_similarity")
        label = "white noise" if hurst is None else f"fGn with H = {hurst}"
        expect_close(got, fit.exponent, f"self_similarity of {n_points} points of {label} (std {scale:g}), eps {eps}, "
                                        f"taus {taus[0]}..{taus[-1]}", rtol=1e-7, atol=1e-9)


# Lesson 8: from the classroom to the cluster

@exercise("cluster", "rows_per_device", "the batch rows each device reads",
          "Only the DATA axis splits the batch: data = devices // model_axis, and each device reads "
          "batch_size // data rows. Raise ValueError if either division leaves a remainder.")
def check_rows_per_device(fn):
    for batch_size, devices, model_axis in ((8, 4, 1), (8, 4, 2), (6, 3, 3), (12, 6, 2), (16, 8, 4), (5, 1, 1)):
        data = devices // model_axis
        want = batch_size // data            # every row read once along 'data', all rows on one data row
        got = as_int(fn(batch_size, devices, model_axis), "rows_per_device")
        expect_equal(got, want, f"rows_per_device(batch_size={batch_size}, devices={devices}, model_axis={model_axis})")
        if got * data != batch_size:
            raise Failed(f"rows_per_device({batch_size}, {devices}, {model_axis}) = {got}: {data} data rows of {got} "
                         f"do not make the batch of {batch_size}")
    for batch_size, devices, model_axis, why in ((6, 4, 1, "4 devices do not divide a batch of 6"),
                                                 (8, 4, 3, "a model axis of 3 does not divide 4 devices"),
                                                 (10, 8, 2, "a data axis of 4 does not divide a batch of 10")):
        try:
            got = fn(batch_size, devices, model_axis)
        except ValueError:
            continue
        raise Failed(f"rows_per_device({batch_size}, {devices}, {model_axis}) returned {got!r}; it must raise "
                     f"ValueError: {why}")


def _mesh_block(batch_size, n_models, data, model, device):
    """The block of a level's (N, B, ...) logits a device holds, from the mesh grid itself."""
    grid = np.arange(data * model).reshape(data, model)
    r, c = (int(v) for v in np.argwhere(grid == device)[0])
    rows = np.split(np.arange(batch_size), data)[r]
    models = np.split(np.arange(n_models), model)[c] if model > 1 and n_models % model == 0 else np.arange(n_models)
    return (int(rows[0]), int(rows[-1]) + 1), (int(models[0]), int(models[-1]) + 1)


@exercise("cluster", "device_block", "which rows and which models of a level one device holds",
          "Device k sits at data row k // model and model column k % model. Its rows: the r-th of `data` equal "
          "parts of the batch. Its models: the c-th of `model` equal parts of the N models, or all N when "
          "`model` does not divide N (level 0 has one model: every device keeps it).")
def check_device_block(fn):
    meshes = ((4, 4, 2, 2), (4, 1, 2, 2), (4, 2, 2, 2), (8, 4, 4, 1), (6, 9, 2, 3), (4, 2, 1, 4), (12, 8, 3, 2))
    for batch_size, n_models, data, model in meshes:
        for device in range(data * model):
            got = fn(batch_size, n_models, data, model, device)
            try:
                got = ((int(got[0][0]), int(got[0][1])), (int(got[1][0]), int(got[1][1])))
            except (TypeError, ValueError, IndexError):
                raise Failed(f"device_block returned {got!r}, not ((row start, row stop), (model start, model stop))") from None
            expect_equal(got, _mesh_block(batch_size, n_models, data, model, device),
                         f"device_block of device {device} on a mesh data {data} x model {model}, batch {batch_size}, "
                         f"{n_models} models")


@exercise("cluster", "local_batch", "each process's rows of the same global batch",
          "Every process calls batch_at with the SAME batch_size, seed and step (so they all build one global "
          "batch), then keeps rows [p * B/P, (p+1) * B/P). A seed per process, or a smaller batch_at, gives "
          "batches that overlap or differ from a one-process run.")
def check_local_batch(fn):
    tokens = np.random.default_rng(75).integers(0, 50, size=600).astype(np.int32)
    for batch_size, processes, context, seed, step in ((8, 1, 8, 0, 0), (8, 2, 8, 3, 5), (8, 4, 6, 1, 17), (6, 3, 10, 2, 1)):
        ids, targets = engine.batch_at(tokens, batch_size, context, seed, step)     # what one process would read
        got_ids, got_targets = [], []
        for process in range(processes):
            got = fn(tokens.copy(), batch_size, context, seed, step, process, processes)
            try:
                a, b = (np.asarray(v) for v in got)
            except (TypeError, ValueError):
                raise Failed(f"local_batch returned {type(got).__name__}, not (ids, targets)") from None
            got_ids.append(a)
            got_targets.append(b)
        what = f"local_batch with batch {batch_size} over {processes} process(es), seed {seed}, step {step}"
        if {a.shape for a in got_ids + got_targets} != {(batch_size // processes, context)}:
            raise Failed(f"{what}: shapes {[a.shape for a in got_ids]}; each process holds "
                         f"({batch_size // processes}, {context})")
        for name, mine, want in (("ids", got_ids, ids), ("targets", got_targets, targets)):
            together = np.concatenate(mine)
            if not np.array_equal(together, want):
                row = int(np.argwhere((together != want).any(axis=1))[0, 0])
                raise Failed(f"{what}: the processes' {name} put together differ from the one-process batch "
                             f"at row {row} (process {row // (batch_size // processes)})")


@exercise("cluster", "allreduce_mean", "the gradient of the whole batch from the devices' gradients",
          "Each device's gradient is of the MEAN loss over its own rows; the whole batch's mean weighs each "
          "device by its share of the rows: sum over k of rows[k] * grads[k][name], divided by sum(rows). "
          "Not the plain sum, and not the plain mean when devices read different numbers of rows.")
def check_allreduce_mean(fn):
    from autograd import grad
    rng = np.random.default_rng(76)
    cfg = engine.Config.preset("micro")
    params = _float64(engine.init_params(cfg, 3))
    loss_grad = grad(engine.tree_loss)
    for rows in ([2, 2], [1, 1, 1, 1], [3, 1, 2], [5, 1]):
        B = sum(rows)
        ids = rng.integers(0, cfg.vocab_size, size=(B, cfg.context))
        targets = rng.integers(0, cfg.vocab_size, size=(B, cfg.context))
        edges = np.cumsum([0] + rows)
        per_device = [engine.flatten(loss_grad(params, cfg, ids[a:b], targets[a:b])) for a, b in zip(edges, edges[1:])]
        want = engine.flatten(loss_grad(params, cfg, ids, targets))                # one device, the whole batch
        got = fn([{k: v.copy() for k, v in g.items()} for g in per_device], list(rows))
        if not isinstance(got, dict) or set(got) != set(want):
            raise Failed(f"allreduce_mean returned {type(got).__name__}"
                         + (f" with names {sorted(got)[:3]}..." if isinstance(got, dict) else "")
                         + f"; return a dict with the same names as each device's gradients")
        for name in sorted(want):
            expect_close(got[name], want[name], f"allreduce_mean over devices reading {rows} rows: array {name}",
                         rtol=1e-7, atol=1e-10)


def _float64(params):
    """A params dict in float64 (nested layers kept), so sums over devices compare to 1e-7."""
    out = {k: v.astype(np.float64) for k, v in params.items() if k != "layers"}
    out["layers"] = [{k: v.astype(np.float64) for k, v in layer.items()} for layer in params["layers"]]
    return out


# Lesson 9: the nesting tax

def _random_tree_losses(rng, cfg):
    """Made-up val losses: one per node of the tree, and one per level's standalone twin."""
    tree = {(level, j): float(rng.uniform(2.0, 5.0)) for level, j in engine.nodes(cfg)}
    alone = [float(rng.uniform(2.0, 5.0)) for _ in range(cfg.levels)]
    return tree, alone


def _study_tax(cfg, tree, alone):
    """The tax per level as `python -m tinyfractal.study tax` computes it (tools/study.py's summarize),
    from one seed's records holding these losses."""
    key = engine.node_key
    run = {"val": {key(n): v for n, v in tree.items()}, "train": {key(n): v for n, v in tree.items()},
           "first": {key(n): 0.0 for n in tree}, "seconds": 0.0}
    twins = {level: [{"val": {"0.0": a}, "first": {"0.0": 0.0}, "seconds": 0.0}] for level, a in enumerate(alone)}
    data = {"chars_per_token": 1.0, "unigram": 5.0}
    study = engine.summarize(cfg, engine.TrainConfig(), [0], 1, data, [run], twins, 0.0)
    return [lv["tax"] for lv in study["levels"]]


def as_floats(got, n, what):
    try:
        values = [float(v) for v in got]
    except (TypeError, ValueError):
        raise Failed(f"{what}: returned {got!r}, not a list of numbers") from None
    if len(values) != n:
        raise Failed(f"{what}: returned {len(values)} numbers, the tree has {n} levels")
    return values


@exercise("tax", "tax_per_level", "the nesting tax of each level",
          "For each level l: the mean of tree_val[(l, j)] over the level's nodes j, minus alone_val[l]. The tree "
          "minus the twin (a positive tax is a node worse than its twin), and every node of the level, not only "
          "(l, 0).")
def check_tax_per_level(fn):
    rng = np.random.default_rng(90)
    for levels, split in ((1, 2), (2, 2), (3, 2), (2, 3), (3, 3), (4, 2)):
        cfg = random_config(rng, levels=(levels, levels), splits=(split, split))
        tree, alone = _random_tree_losses(rng, cfg)
        want = [float(np.mean([tree[(level, j)] for j in range(cfg.n_models(level))])) - alone[level]
                for level in range(levels)]
        if not np.allclose(want, _study_tax(cfg, tree, alone), rtol=0, atol=1e-12):
            raise RuntimeError("the check disagrees with tools/study.py's summarize")      # the check's own bug
        got = as_floats(fn(dict(tree), list(alone)), levels, "tax_per_level")
        expect_close(got, want, f"tax_per_level of a tree with {levels} level(s), split {split}", rtol=1e-9, atol=1e-9)


@exercise("tax", "bits_per_char", "bits per character from nats per token",
          "Two conversions: nats -> bits is a division by ln 2 (math.log(2)), and per token -> per character is a "
          "division by the characters per token: the characters of ALL the decoded rows over targets.size.")
def check_bits_per_char(fn):
    rng = np.random.default_rng(91)
    tokenizer = engine.Tokenizer.default()
    lengths = engine.token_lengths(tokenizer)                # (V,): characters of each token, decoded alone
    toy = np.array([1, 2, 3, 1, 4, 2, 1, 3])                 # a made-up code: token i is 'x' * toy[i]
    decoders = (("the BPE tokenizer", tokenizer.decode, lengths),
                ("a made-up code", lambda row: "".join("x" * int(toy[i]) for i in row), toy))
    for what, decode, chars in decoders:
        for shape, nats in (((1, 8), 4.85), ((4, 16), 2.5), ((12, 64), 1.9), ((3, 5), 0.7)):
            targets = rng.integers(0, len(chars), size=shape)
            want = nats / math.log(2) / (chars[targets].sum() / targets.size)
            got = as_float(fn(nats, targets.copy(), decode), "bits_per_char")
            expect_close(got, want, f"bits_per_char({nats} nats/token) on {shape[0]}x{shape[1]} targets of {what}",
                         rtol=1e-9, atol=1e-12)


def _worst_first_loss(cfg, rng, batch=4):
    """The largest loss a fresh one-level model gives at any position of a random batch, each position
    scored against its LEAST likely token: max over positions of logsumexp(logits) - min(logits)."""
    ids = rng.integers(0, cfg.vocab_size, size=(batch, cfg.context))
    logits = np.asarray(engine.forward(engine.init_params(cfg, int(rng.integers(1 << 30))), cfg, ids), np.float64)
    top = logits.max(axis=-1)                                                 # (B,T)
    logsumexp = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    return float((logsumexp - logits.min(axis=-1)).max())


@exercise("tax", "first_loss_bound", "the largest first-step loss of a fresh node",
          "|rmsnorm(x) . rmsnorm(e)| <= sqrt(d) * sqrt(d) = d (Cauchy-Schwarz); times the output gain (1, or "
          "1/sqrt(d) for 'sqrt' and for 'learned', whose extra gain starts at 0). The loss is at most "
          "ln V + (largest logit - smallest logit) = ln V + 2 * (the largest |logit|).")
def check_first_loss_bound(fn):
    rng = np.random.default_rng(92)
    for V, d in ((128, 16), (128, 96), (65, 32), (256, 8), (16, 64)):
        for scale in ("none", "sqrt", "learned"):
            cfg = engine.Config(vocab_size=V, context=8, layers=1, heads=2, kv_heads=1, head_dim=8, hidden=d,
                                levels=1, logit_scale=scale)
            gain = np.ravel(engine.output_gain(engine.init_params(cfg, 0), cfg))[0]    # a float, or (1,) if learned
            largest = d * float(gain)                                                 # |logit| <= d * gain
            want = math.log(V) + 2 * largest
            what = f"first_loss_bound(vocab_size={V}, d={d}, logit_scale={scale!r})"
            try:
                got = as_float(fn(V, d, scale), what)
            except ValueError as e:
                raise Failed(f"{what} raised ValueError ({e}); {scale!r} is a valid logit scale") from None
            measured = _worst_first_loss(cfg, rng)
            if got < measured - 1e-6:
                raise Failed(f"{what} = {got:.4g}, but a fresh model of that shape already gives {measured:.4g} "
                             f"nats at some position: a bound must be at least that")
            expect_close(got, want, what, rtol=1e-6, atol=1e-6)        # the engine's gain is float32
    try:
        got = fn(128, 16, "cube")
    except ValueError:
        return
    raise Failed(f"first_loss_bound(128, 16, 'cube') returned {got!r}; raise ValueError for a logit_scale other than "
                 f"'none', 'sqrt' or 'learned'")


@exercise("tax", "loss_weights", "the weight of each node's loss: nodes, width, params",
          "Weigh one node of level l by 1, by its width cfg.width(l), or by its parameter count; then divide by "
          "the sum over ALL nodes, sum over l of cfg.n_models(l) * raw[l] (not the sum over levels): the tree "
          "loss is sum over nodes of w * loss.")
def check_loss_weights(fn):
    rng = np.random.default_rng(93)
    for _ in range(6):
        cfg = random_config(rng)
        params = engine.init_params(cfg, 0)
        for scheme in ("nodes", "width", "params"):
            raw = {"nodes": [1.0] * cfg.levels, "width": [float(cfg.width(l)) for l in range(cfg.levels)],
                   "params": [float(engine.count_params(engine.view(params, cfg, l, 0))) for l in range(cfg.levels)]}[scheme]
            total = sum(cfg.n_models(l) * raw[l] for l in range(cfg.levels))
            want = [w / total for w in raw]
            if not np.allclose(want, engine.level_weights_at(engine.TrainConfig(loss_weights=scheme), cfg, 0),
                               rtol=1e-12, atol=0):
                raise RuntimeError("the check disagrees with training/train.py's level_weights_at")   # its own bug
            what = f"loss_weights({describe(cfg)}, {scheme!r})"
            got = as_floats(fn(cfg, scheme), cfg.levels, what)
            expect_close(got, want, what, rtol=1e-9, atol=1e-12)
    try:
        got = fn(engine.Config.preset("micro"), "depth")
    except ValueError:
        return
    raise Failed(f"loss_weights(micro, 'depth') returned {got!r}; raise ValueError for a scheme other than 'nodes', "
                 f"'width' or 'params'")


@exercise("tax", "tree_clip_threshold", "the clipping threshold of clip_mode='tree'",
          "Orthogonal vectors add like Pythagoras: |sum of w_i g_i|^2 = sum of w_i^2 |g_i|^2. Every node of level l "
          "has weight weights[l], and there are cfg.n_models(l) of them: grad_clip * sqrt(sum over l of "
          "n_models(l) * weights[l]**2).")
def check_tree_clip_threshold(fn):
    rng = np.random.default_rng(94)
    for _ in range(8):
        cfg = random_config(rng)
        grad_clip = float(rng.choice([1.0, 0.5, 2.0]))
        scheme = str(rng.choice(["nodes", "width", "params", "random"]))
        weights = [float(w) for w in rng.uniform(0.1, 2.0, cfg.levels)] if scheme == "random" else \
            engine.level_weights_at(engine.TrainConfig(loss_weights=scheme), cfg, 0)
        # the weighted sum of one orthogonal gradient per node, each of norm grad_clip
        n = cfg.n_nodes
        g = np.linalg.qr(rng.standard_normal((n + 3, n)))[0].T * grad_clip                 # (n, n+3) rows orthonormal
        w = np.concatenate([[weights[l]] * cfg.n_models(l) for l in range(cfg.levels)])
        want = float(np.linalg.norm(w @ g))
        if not np.isclose(want, engine.clip_threshold(engine.TrainConfig(grad_clip=grad_clip, clip_mode="tree"), cfg,
                                                      weights), rtol=1e-9):
            raise RuntimeError("the check disagrees with training/train.py's clip_threshold")    # its own bug
        what = f"tree_clip_threshold({grad_clip}, {describe(cfg)}, weights {[round(x, 4) for x in weights]})"
        expect_close(as_float(fn(grad_clip, cfg, list(weights)), what), want, what, rtol=1e-9, atol=1e-12)
