"""The graded exercises can fail and can pass: every check fails on its stub (with a hint), fails on a
plausible wrong answer, and passes on the reference solution; and the command line behaves.

The wrong answers below are written here by hand, one or two per exercise, each a mistake a student
could make (a gain of g instead of 1 + g, RoPE's interleaved pairs, 2**level instead of split**level,
overlapping pair counts, the prototype's greedy encoder, ...). A check that let one of them through
would be checking too little.
"""
import inspect
import math
import subprocess
import sys
import types
from collections import Counter

import numpy as np
import pytest

import tinyfractal as tf
from tinyfractal import exercises
from tinyfractal.exercises import EXERCISES, SOLUTIONS, STUBS, check_folder, load, run
from tinyfractal.exercises.__main__ import main
from tinyfractal.lessons import ORDER
from tinyfractal.paths import ROOT
from tinyfractal.training.data import batch_at

IDS = [f"{e.lesson}.{e.name}" for e in EXERCISES]
SOL = {lesson: load(SOLUTIONS / f"{lesson}.py", lesson)[0] for lesson in exercises.lessons()}
STUB = {lesson: load(STUBS / f"{lesson}.py", lesson)[0] for lesson in exercises.lessons()}


# Plausible wrong answers, by exercise

def _rmsnorm_gain_g(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _rmsnorm_eps_outside(x, g, eps):
    return x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps) * (1 + g)


def _rope_interleaved(x, positions, theta):
    T, h = x.shape
    m = np.arange(h // 2)
    angle = np.asarray(positions, dtype=float)[:, None] * theta ** (-2.0 * m / h)[None, :]
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return out


def _attention(x, Wq, Wk, Wv, Wo, theta, masked=True, tile=False):
    """Attention with a mistake: no causal mask, or key/value heads tiled (0,1,0,1) instead of repeated."""
    T, D = x.shape
    H, K, h = Wq.shape[1], Wk.shape[1], Wq.shape[2]
    rope, pos = SOL["transformer"].rope, np.arange(T)
    q = np.stack([rope(x @ Wq[:, i], pos, theta) for i in range(H)], axis=1)     # (T,H,h)
    k = np.stack([rope(x @ Wk[:, j], pos, theta) for j in range(K)], axis=1)     # (T,K,h)
    v = np.einsum("td,dkc->tkc", x, Wv)
    if tile:
        k, v = np.tile(k, (1, H // K, 1)), np.tile(v, (1, H // K, 1))
    else:
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("thc,shc->hts", q, k) / math.sqrt(h)
    if masked:
        s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shc->thc", w, v).reshape(T, H * h) @ Wo.reshape(H * h, D)


def _gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def _geglu_gates_up(x, Wgate, bgate, Wup, bup, Wdown, bdown):
    return ((x @ Wgate + bgate) * _gelu_tanh(x @ Wup + bup)) @ Wdown + bdown


def _geglu_erf(x, Wgate, bgate, Wup, bup, Wdown, bdown):
    z = x @ Wgate + bgate
    gelu = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return (gelu * (x @ Wup + bup)) @ Wdown + bdown


def _param_count_no_biases(V, D, H, K, h, F, layers):
    return V * D + 3 * D + layers * (2 * D + D * H * h + 2 * D * K * h + H * h * D + 3 * D * F)


def _node_slice_power_of_two(cfg, level, index, role):
    """The prototype's mistake: 2**level where it should be split**level."""
    size = {"R": cfg.hidden, "M": cfg.mlp_hidden, "C": cfg.head_dim}[role] // 2 ** level
    return slice(index * size, (index + 1) * size)


def _view_array_copy(name, a, cfg, level, index):
    return np.array(SOL["base"].view_array(name, a, cfg, level, index))


def _view_array_heads(name, a, cfg, level, index):
    """Slices the head axis of Wq/Wk/Wv/Wo instead of the head dim."""
    base = SOL["base"]
    if name in ("Wq", "Wk", "Wv"):
        return a[base.node_slice(cfg, level, index, "R"), :, :][:, :, :a.shape[2] // cfg.split ** level]
    return base.view_array(name, a, cfg, level, index)


def _deepest_owner_top_down(cfg, row, col):
    for level in range(cfg.levels):
        for index in range(cfg.split ** level):
            R, M = SOL["base"].node_slice(cfg, level, index, "R"), SOL["base"].node_slice(cfg, level, index, "M")
            if R.start <= row < R.stop and M.start <= col < M.stop:
                return (level, index)


def _merge_pair_right_to_left(ids, pair, new_id):
    out, i = [], len(ids) - 1
    while i >= 0:
        if i >= 1 and (ids[i - 1], ids[i]) == tuple(pair):
            out.append(new_id)
            i -= 2
        else:
            out.append(ids[i])
            i -= 1
    return out[::-1]


def _encode_greedy(text, chars, merges):
    """The prototype's encoder: scan once, always taking the longest token that matches."""
    strings = list(chars)
    for a, b in merges:
        strings.append(strings[a] + strings[b])
    ids, i = [], 0
    while i < len(text):
        best = max((t for t in range(len(strings)) if text.startswith(strings[t], i)), key=lambda t: len(strings[t]))
        ids.append(best)
        i += len(strings[best])
    return ids


def _first_merge_no_letter_rule(text):
    chars = sorted(set(text))
    counts = SOL["tokenizer"].pair_counts([chars.index(c) for c in text])
    a, b = min(counts, key=lambda p: (-counts[p], p))
    return chars[a], chars[b]


def _first_merge_ties_to_largest(text):
    chars = sorted(set(text))
    counts = {p: n for p, n in SOL["tokenizer"].pair_counts([chars.index(c) for c in text]).items()
              if chars[p[0]].isalpha() == chars[p[1]].isalpha()}
    a, b = max(counts, key=lambda p: (counts[p], p))
    return chars[a], chars[b]


def _merge2_swapped(child0, child1, child_cfg):
    return SOL["merging"].merge2(child1, child0, child_cfg)


def _needed_nodes_swapped(cfg, level, index):
    swap = {"upstream": "downstream", "downstream": "upstream", "none": "none"}[cfg.coupling]
    return SOL["coupling"].needed_nodes(cfg.override(coupling=swap), level, index)


def _concept_without_slot_gain(E, P, emb_norm, group, eps):
    y = E[np.asarray(group)].sum(axis=0)
    return y / np.sqrt(np.mean(y * y) + eps) * (1 + emb_norm)


def _token_bits_naive(logits, target):
    """The softmax written out directly: exp overflows for logits in the hundreds."""
    e = np.exp(np.asarray(logits, dtype=np.float64))
    return float(-np.log2(e[target] / e.sum()))


def _integral_raw(x):
    """Forgets to standardise: the cumulative sum of x itself."""
    return np.concatenate([[0.0], np.cumsum(x)])


def _rescaled_range_no_block_mean(x, n):
    blocks = np.asarray(x)[:len(x) // n * n].reshape(-1, n)
    Y = np.cumsum(blocks, axis=1)
    return float(np.mean((Y.max(axis=1) - Y.min(axis=1)) / blocks.std(axis=1)))


def _rescaled_range_std_of_y(x, n):
    blocks = np.asarray(x)[:len(x) // n * n].reshape(-1, n)
    Y = np.cumsum(blocks - blocks.mean(axis=1, keepdims=True), axis=1)
    return float(np.mean((Y.max(axis=1) - Y.min(axis=1)) / Y.std(axis=1)))


def _hurst_mixed_bases(x, windows):
    ratios = [SOL["fractal"].rescaled_range(x, n) for n in windows]
    return float(np.polyfit(np.log(windows), np.log10(ratios), 1)[0])


def _hurst_semilog(x, windows):
    ratios = [SOL["fractal"].rescaled_range(x, n) for n in windows]
    return float(np.polyfit(np.asarray(windows, dtype=float), np.log(ratios), 1)[0])


def _self_similarity_raw_units(x, eps, taus):
    """eps measured on the walk of x as given, not standardised."""
    X = np.concatenate([[0.0], np.cumsum(x)])
    p = [np.mean(np.abs(X[t:] - X[:-t]) <= eps) for t in taus]
    return float(-np.polyfit(np.log(taus), np.log(p), 1)[0])


def _device_block_column_major(batch_size, n_models, data, model, device):
    """Places device k at data row k % data: the mesh read down its columns."""
    return SOL["cluster"].device_block(batch_size, n_models, data, model, (device % data) * model + device // data)


def _device_block_always_split(batch_size, n_models, data, model, device):
    (rows, _), per = SOL["cluster"].device_block(batch_size, n_models, data, model, device), max(1, n_models // model)
    c = device % model
    return rows, (c * per, min(n_models, (c + 1) * per))


def _local_batch_seed_per_process(tokens, batch_size, context, seed, step, process, processes):
    return batch_at(tokens, batch_size // processes, context, seed + process, step)


def _local_batch_same_rows(tokens, batch_size, context, seed, step, process, processes):
    return batch_at(tokens, batch_size // processes, context, seed, step)


def _chars_per_token(targets, decode):
    return sum(len(decode(row)) for row in targets) / np.size(targets)


def _first_loss_bound_learned_refused(V, d, scale):
    """Treats 'learned' as an unknown scale (it starts as 'sqrt', so it has the same bound)."""
    if scale == "learned":
        raise ValueError("unknown logit_scale 'learned'")
    return SOL["tax"].first_loss_bound(V, d, scale)


def _loss_weights_per_level(cfg, scheme):
    """Normalised over the levels (sum of w_l = 1), forgetting that level l holds n_models(l) nodes."""
    raw = [1.0 if scheme == "nodes" else float(cfg.width(l)) if scheme == "width" else
           SOL["tax"].loss_weights(cfg, scheme)[l] for l in range(cfg.levels)]
    return [w / sum(raw) for w in raw]


WRONG = {
    "transformer.rmsnorm": [_rmsnorm_gain_g, _rmsnorm_eps_outside],
    "transformer.causal_mask": [lambda T: np.triu(np.ones((T, T), dtype=bool)),
                                lambda T: np.tril(np.ones((T, T), dtype=bool), k=-1)],
    "transformer.rope": [_rope_interleaved],
    "transformer.attention": [lambda *a: _attention(*a, masked=False), lambda *a: _attention(*a, tile=True)],
    "transformer.geglu": [_geglu_gates_up, _geglu_erf],
    "transformer.tied_logits": [lambda x, E, fn, on, eps: SOL["transformer"].rmsnorm(x, fn, eps) @ E.T],
    "transformer.param_count": [_param_count_no_biases],
    "transformer.unrelated_logit_std": [lambda d: float(d), lambda d: 1.0],
    "base.n_nodes": [lambda levels, split: split ** levels],
    "base.children": [lambda cfg, l, j: [] if l == cfg.levels - 1 else [(l + 1, j + r * cfg.split ** l)
                                                                        for r in range(cfg.split)]],
    "base.node_slice": [_node_slice_power_of_two],
    "base.view_array": [_view_array_copy, _view_array_heads],
    "base.node_params": [lambda cfg, level: tf.count_params(tf.init_params(cfg)) // cfg.split ** level],
    "base.tree_loss": [lambda losses, cfg: float(np.mean([np.mean(l) for l in losses]))],
    "base.deepest_owner": [_deepest_owner_top_down],
    "tokenizer.merge_pair": [_merge_pair_right_to_left],
    "tokenizer.pair_counts": [lambda ids: dict(Counter(zip(ids, ids[1:])))],
    "tokenizer.encode": [_encode_greedy],
    "tokenizer.first_merge": [_first_merge_no_letter_rule, _first_merge_ties_to_largest],
    "speculative.accept_greedy": [lambda d, v: (int(np.sum(d == v[:-1])), int(v[int(np.sum(d == v[:-1]))]))],
    "speculative.acceptance_rate": [lambda p, q: float(np.sum(p * q))],
    "speculative.residual": [lambda p, q: np.maximum(q - p, 0) / max(np.maximum(q - p, 0).sum(), 1e-12)],
    "speculative.expected_tokens": [lambda alpha, k: 1 + alpha * k],
    "speculative.drafters": [lambda cfg, v, level: [(level, v[1] * cfg.split + r) for r in range(cfg.split ** (level - v[0]))]],
    "merging.parent_config": [lambda c, s: c.override(hidden=s * c.hidden, head_dim=s * c.head_dim)],
    "merging.merge2": [_merge2_swapped],
    "merging.new_entries": [lambda c, s: tf.count_params(tf.init_params(SOL["merging"].parent_config(c, s)))
                            - tf.count_params(tf.init_params(c))],
    "merging.extract": [lambda params, cfg, l, j: tf.view(params, cfg, l, j)],
    "coupling.upstream_received": [lambda x, s: x.reshape(x.shape[0] // s, *x.shape[1:3], s * x.shape[3])],
    "coupling.downstream_received": [lambda x, s: x.reshape(x.shape[0] * s, *x.shape[1:3], x.shape[3] // s)],
    "coupling.needed_nodes": [_needed_nodes_swapped],
    "bytes.group_size": [lambda cfg, level: cfg.split ** level],
    "bytes.slot_offset": [lambda cfg, level: sum(SOL["bytes"].group_size(cfg, k) for k in range(level + 1))],
    "bytes.context_bytes": [lambda cfg, level: cfg.context],
    "bytes.concept_embedding": [_concept_without_slot_gain],
    "fractal.token_bits": [lambda logits, t: SOL["fractal"].token_bits(logits, t) * math.log(2), _token_bits_naive],
    "fractal.integral_process": [_integral_raw, lambda x: SOL["fractal"].integral_process(x)[1:]],
    "fractal.rescaled_range": [_rescaled_range_no_block_mean, _rescaled_range_std_of_y],
    "fractal.hurst": [_hurst_mixed_bases, _hurst_semilog],
    "fractal.self_similarity": [lambda x, eps, taus: -SOL["fractal"].self_similarity(x, eps, taus),
                                _self_similarity_raw_units],
    "cluster.rows_per_device": [lambda b, d, m: b // d, lambda b, d, m: max(1, b // (d // m))],
    "cluster.device_block": [_device_block_column_major, _device_block_always_split],
    "cluster.local_batch": [_local_batch_seed_per_process, _local_batch_same_rows],
    "cluster.allreduce_mean": [lambda grads, rows: {k: sum(g[k] for g in grads) for k in grads[0]},
                               lambda grads, rows: {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}],
    "tax.tax_per_level": [lambda tree, alone: [-t for t in SOL["tax"].tax_per_level(tree, alone)],
                          lambda tree, alone: [tree[(l, 0)] - alone[l] for l in range(len(alone))]],
    "tax.bits_per_char": [lambda nats, targets, decode: nats / _chars_per_token(targets, decode),
                          lambda nats, targets, decode: nats / math.log(2) * _chars_per_token(targets, decode)],
    "tax.first_loss_bound": [lambda V, d, scale: math.log(V) + (d if scale == "none" else math.sqrt(d)),
                             _first_loss_bound_learned_refused,
                             lambda V, d, scale: math.log(V) + 2 * math.sqrt(d)],
    "tax.loss_weights": [_loss_weights_per_level,
                         lambda cfg, scheme: SOL["tax"].loss_weights(cfg, "nodes")],
    "tax.tree_clip_threshold": [lambda clip, cfg, weights: clip * math.sqrt(sum(w * w for w in weights)),
                                lambda clip, cfg, weights: clip / math.sqrt(cfg.n_nodes)],
}


def _only(name, fn):
    return types.SimpleNamespace(**{name: fn})


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_every_check_fails_on_its_stub_with_a_hint(ex):
    """A fresh stub raises NotImplementedError: the check fails, says so, and has a hint to print."""
    result = run(ex, STUB[ex.lesson], STUBS / f"{ex.lesson}.py")
    assert not result.passed
    assert "NotImplementedError" in result.reason
    assert len(ex.hint) > 30


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_every_check_passes_on_the_reference_solution(ex):
    """The reference solution of every exercise passes its check."""
    result = run(ex, SOL[ex.lesson], SOLUTIONS / f"{ex.lesson}.py")
    assert result.passed, result.reason


@pytest.mark.parametrize("ex", EXERCISES, ids=IDS)
def test_every_check_fails_on_a_plausible_wrong_answer(ex):
    """Each hand-written wrong answer fails its check with a reason the check wrote (not a crash)."""
    wrongs = WRONG.get(f"{ex.lesson}.{ex.name}")
    assert wrongs, f"add a plausible wrong answer for {ex.lesson}.{ex.name} to WRONG"
    for fn in wrongs:
        result = run(ex, _only(ex.name, fn), SOLUTIONS / f"{ex.lesson}.py")
        assert not result.passed, f"a wrong {ex.name} passed"
        assert not result.reason.startswith("it raised"), result.reason


def test_every_lesson_has_its_exercises_and_stubs_match_solutions():
    """Every lesson of the course has >= 3 exercises (>= 5 for lessons 0 and 1); each stub file and its
    solution define exactly the exercises' functions, with the same signatures and docstrings."""
    counts = Counter(e.lesson for e in EXERCISES)
    assert set(counts) == set(ORDER)
    assert all(n >= 3 for n in counts.values()) and counts["transformer"] >= 5 and counts["base"] >= 5
    for lesson in counts:
        names = {e.name for e in EXERCISES if e.lesson == lesson}
        for module in (STUB[lesson], SOL[lesson]):
            own = {n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__}
            assert own == names, (lesson, own ^ names)
        for name in names:
            stub, sol = getattr(STUB[lesson], name), getattr(SOL[lesson], name)
            assert inspect.signature(stub) == inspect.signature(sol)
            assert stub.__doc__ == sol.__doc__ and stub.__doc__


def test_check_on_fresh_stubs_fails_every_exercise_with_hints(tmp_path, monkeypatch, capsys):
    """`start` then `check` in a fresh folder: exit 1, and every exercise is listed as FAIL with a hint."""
    monkeypatch.chdir(tmp_path)
    assert main(["start"]) == 0
    copied = sorted(p.name for p in (tmp_path / "my_exercises").iterdir())
    assert copied == sorted(f"{lesson}.py" for lesson in SOL)
    for name in copied:
        assert (tmp_path / "my_exercises" / name).read_bytes() == (STUBS / name).read_bytes()
    capsys.readouterr()
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    for e in EXERCISES:
        assert f"FAIL  {e.name:<22} {e.title}" in out
    assert out.count("hint: ") == len(EXERCISES) and "PASS" not in out
    assert f"0 of {len(EXERCISES)} exercises pass" in out


def test_check_on_the_solutions_passes_every_exercise(capsys):
    """`check --solutions` exits 0 with every exercise PASS; so does one lesson, and one exercise."""
    assert main(["check", "--solutions"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == len(EXERCISES) and "FAIL" not in out
    assert main(["check", "base", "--solutions"]) == 0
    assert capsys.readouterr().out.count("PASS") == sum(e.lesson == "base" for e in EXERCISES)
    assert main(["check", "transformer.rope", "--solutions"]) == 0
    assert capsys.readouterr().out.count("PASS") == 1


def test_a_students_partial_work_is_graded_exercise_by_exercise(tmp_path, capsys):
    """A solved exercise passes next to unsolved ones; a crash names the student's line; a file that
    does not import fails all its lesson's exercises with the reason, and leaves other lessons alone."""
    folder = tmp_path / "work"
    assert main(["start", "--dir", str(folder)]) == 0
    text = (STUBS / "transformer.py").read_text()
    solved = (SOLUTIONS / "transformer.py").read_text()
    body = solved[solved.index("def causal_mask"):solved.index("def rope")]
    text = text[:text.index("def causal_mask")] + body + text[text.index("def rope"):]
    crash = text.index("def geglu")
    crash_body = text.index("raise NotImplementedError", crash)
    text = text[:crash_body] + "return x @ Wgate @ Wup" + text[crash_body + len("raise NotImplementedError"):]
    (folder / "transformer.py").write_text(text)
    (folder / "bytes.py").write_text("def group_size(cfg, level)\n    return 1\n")
    results = {f"{r.exercise.lesson}.{r.exercise.name}": r for r in check_folder(folder)}
    assert results["transformer.causal_mask"].passed
    assert not results["transformer.rmsnorm"].passed
    line = text[:text.index("return x @ Wgate @ Wup")].count("\n") + 1
    assert f"line {line} of transformer.py" in results["transformer.geglu"].reason
    for name in ("group_size", "slot_offset", "context_bytes", "concept_embedding"):
        assert "SyntaxError on line 1" in results[f"bytes.{name}"].reason
    assert "NotImplementedError" in results["coupling.needed_nodes"].reason
    capsys.readouterr()
    assert main(["check", "transformer.causal_mask", "--dir", str(folder)]) == 0


@pytest.mark.parametrize("argv, words", [
    ([], "required"),
    (["frob"], "invalid choice"),
    (["check", "bse", "--solutions"], "did you mean 'base'"),
    (["check", "transformer.rmsnrm", "--solutions"], "did you mean transformer.rmsnorm"),
    (["check", "--dir", "no_such_folder"], "no folder no_such_folder"),
    (["check", "--solutions", "--dir", "."], "not both"),
    (["start", "--bogus"], "unrecognized arguments"),
])
def test_usage_errors_exit_2_with_one_line(argv, words, tmp_path, monkeypatch, capsys):
    """Every usage mistake: exit code 2, nothing on stdout, one line on stderr that names the mistake."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and words in captured.err


def test_start_refuses_to_overwrite_work_without_force(tmp_path, capsys):
    """`start` into a folder holding a student's files copies nothing (exit 2, one line); --force replaces."""
    folder = tmp_path / "mine"
    assert main(["start", "--dir", str(folder)]) == 0
    (folder / "base.py").write_text("# my work\n")
    capsys.readouterr()
    assert main(["start", "--dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "base.py" in err and "--force" in err
    assert (folder / "base.py").read_text() == "# my work\n"
    assert main(["start", "--dir", str(folder), "--force"]) == 0
    assert (folder / "base.py").read_bytes() == (STUBS / "base.py").read_bytes()
    (tmp_path / "a_file").write_text("x")
    assert main(["start", "--dir", str(tmp_path / "a_file")]) == 2


def test_solutions_removed_by_the_teacher_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """With the solutions folder deleted, `check --solutions` says so in one line, exit 2."""
    import tinyfractal.exercises.__main__ as cli
    monkeypatch.setattr(cli, "SOLUTIONS", tmp_path / "gone")
    assert main(["check", "--solutions"]) == 2
    assert "removed" in capsys.readouterr().err


def test_the_command_line_process_prints_one_line_and_no_traceback(tmp_path):
    """As a real process: a usage error is one line on stderr and exit 2; `list` names every exercise."""
    env_cmd = [sys.executable, "-m", "tinyfractal.exercises"]
    bad = subprocess.run(env_cmd + ["check", "nolesson"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    listed = subprocess.run(env_cmd + ["list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    assert all(f"{e.lesson}.{e.name}" in listed.stdout for e in EXERCISES)
