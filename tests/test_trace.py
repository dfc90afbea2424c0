"""Laws of the shape trace (tinyfractal/tools/trace.py) and of the trace hook in model.forward."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyfractal.tools import trace as trace_module
from tinyfractal.cli import main
from tinyfractal.config import Config
from tinyfractal.api import init_params
from tinyfractal.core.model import forward
from tinyfractal.tools.trace import Tracer, locate, trace_node
from tinyfractal.core.tree import flatten, nodes, view

TINY = Config.preset("tiny")
TINY_PARAMS = init_params(TINY, seed=3)
IDS = np.array([[5, 17, 64, 3, 99, 0, 41]])


def spec_index(name, shape, cfg, level, j):
    """Model (level, j)'s slice of a shared array, written out by hand from the role table of docs/design.md."""
    d, f, h = cfg.hidden // cfg.split ** level, cfg.mlp_hidden // cfg.split ** level, cfg.head_dim // cfg.split ** level
    R, M, C = slice(j * d, (j + 1) * d), slice(j * f, (j + 1) * f), slice(j * h, (j + 1) * h)
    whole = [slice(0, n) for n in shape]
    key = name.split(".")[-1]
    if key == "E":
        return (whole[0], R)
    if key in ("Wq", "Wk", "Wv"):
        return (R, whole[1], C)
    if key == "Wo":
        return (whole[0], C, R)
    if key in ("logit_gain", "node_gain"):    # per-node tables: rows level.., the node's columns
        return (slice(level, shape[0]), R)
    return {"Wgate": (R, M), "Wup": (R, M), "Wdown": (M, R), "bgate": (M,), "bup": (M,)}.get(key, (R,))


@pytest.mark.parametrize("node", nodes(TINY))
def test_trace_of_every_tiny_node_reads_exactly_its_spec_slices(node):
    """Every node of tiny traces, and each op reads the slice the role table (docs/design.md) gives that node, and
    together the ops read every shared array."""
    level, j = node
    lines = []
    steps = trace_node(TINY_PARAMS, TINY, level, j, IDS, log=lines.append)
    read = set()
    for step in steps:
        for name, index, shape, _ in step.uses:
            assert index == spec_index(name, shape, TINY, level, j), (step.op, name)
            read.add(name)
    assert read == set(flatten(TINY_PARAMS))
    assert len(steps) == 4 + 8 * TINY.layers     # embed, 8 per layer, final norm, output gain, logits
    assert lines[-1] == (f"logits (1,{IDS.shape[1]},{TINY.vocab_size}); every slice above matches the role table "
                         f"(docs/design.md)")


def test_trace_prints_shapes_of_the_node():
    """The printed shapes are the node's own: width d_l, head dim h_l, mlp width f_l."""
    lines = []
    trace_node(TINY_PARAMS, TINY, 2, 3, IDS, log=lines.append)
    text = "\n".join(lines)
    T = IDS.shape[1]
    assert f"(1,{T},24)" in text                                  # d_2 = 96 / 4
    assert f"(1,{T},4,4) (1,{T},1,4) (1,{T},1,4)" in text         # q, k, v with h_2 = 16 / 4
    assert f"(1,4,{T},{T})" in text                               # attention probabilities
    assert "reads Wq[72:96, :, 12:16] of (96,4,16)" in text
    assert "reads Wo[:, 12:16, 72:96] of (4,16,96)" in text
    assert "reads Wdown[288:384, 72:96] of (384,96)" in text


def test_trace_flags_a_wrong_view(monkeypatch):
    """If view cut the wrong block, the trace shows the wrong slice and marks it."""
    right_view = trace_module.view
    monkeypatch.setattr(trace_module, "view", lambda p, c, level, j: right_view(p, c, level, (j + 1) % 4))
    lines = []
    steps = trace_node(TINY_PARAMS, TINY, 2, 1, IDS, log=lines.append)
    assert any(step.mismatches() for step in steps)
    assert any("reads Wq[48:72, :, 8:12] of (96,4,16)   !! the role table says [24:48, :, 4:8]" in line
               for line in lines)
    assert "slices differ from the role table" in lines[-1]


def test_tracing_leaves_the_logits_unchanged_and_restores_the_model():
    """forward inside `tracing` returns bit for bit the logits of forward outside it, and afterwards every
    step function of the model is the original again (tracing wraps from outside, and unwraps)."""
    from tinyfractal.core import model
    originals = {name: getattr(model, name) for name in trace_module.STEPS}
    for level, j in [(0, 0), (1, 1), (2, 2)]:
        p, c = view(TINY_PARAMS, TINY, level, j), TINY.sub(level)
        with trace_module.tracing(Tracer(TINY_PARAMS, TINY, level, j)) as tracer:
            traced = forward(p, c, IDS)
        assert len(tracer.steps) == 4 + 8 * TINY.layers
        np.testing.assert_array_equal(traced, forward(p, c, IDS))
    assert {name: getattr(model, name) for name in trace_module.STEPS} == originals


def test_tracer_refuses_arrays_that_are_not_shared_slices():
    """A copy of a weight is not part of the shared arrays: the tracer says so instead of guessing."""
    p = view(TINY_PARAMS, TINY, 1, 0)
    p["layers"][0]["Wq"] = p["layers"][0]["Wq"].copy()
    with pytest.raises(ValueError, match="not a slice of the shared arrays"):
        with trace_module.tracing(Tracer(TINY_PARAMS, TINY, 1, 0)):
            forward(p, TINY.sub(1), IDS)


@st.composite
def array_and_slice(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    index = []
    for n in shape:
        start = draw(st.integers(0, n - 1))
        index.append(slice(start, draw(st.integers(start + 1, n))))
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape), tuple(index)


@given(array_and_slice())
def test_locate_inverts_basic_slicing(case):
    """locate(a[s], a) == s for every basic slice s with step 1 (read back from addresses alone)."""
    a, index = case
    assert locate(a[index], a) == index


def test_locate_rejects_what_is_not_a_unit_step_slice():
    """A copy, a strided slice and a transposed view are not found as slices."""
    a = np.zeros((6, 8), dtype=np.float32)
    assert locate(a[1:3].copy(), a) is None
    assert locate(a[:, ::2], a) is None
    assert locate(a.T[:, :], a) is None
    assert locate(np.zeros((6, 8), dtype=np.float32), a) is None


def test_trace_command_runs_and_refuses_bad_nodes(capsys):
    """`python -m tinyfractal trace` exits 0 for a node of tiny and 2, with one line, for a bad one."""
    assert main(["trace", "--preset", "tiny", "--level", "2", "--index", "3"]) == 0
    out = capsys.readouterr().out
    assert "model (2,3) of 7" in out and "every slice above matches the role table" in out
    assert main(["trace", "--preset", "tiny", "--level", "2", "--index", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid indices are 0..3" in err
    assert main(["trace", "--preset", "tiny", "--split=3"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["trace", "--preset", "tiny", "--coupling=upstream"]) == 2
    assert "not supported for the upstream variant" in capsys.readouterr().err


def test_the_output_gain_step_reads_the_tables_only_when_a_config_has_them():
    """With the per-node tables (the defaults) the trace shows one output-gain step reading the node's rows
    [level:] of both; with logit_scale='sqrt' and no node gains there is nothing to read and no such step,
    and the ops still read every shared array."""
    plain = TINY.override(logit_scale="sqrt", node_gains=False)
    params = init_params(plain, 3)
    steps = trace_node(params, plain, 1, 1, IDS, log=lambda line: None)
    assert len(steps) == 3 + 8 * plain.layers and not any("g_out =" in s.op for s in steps)
    assert {name for s in steps for name, *_ in s.uses} == set(flatten(params))
    steps = trace_node(TINY_PARAMS, TINY, 1, 1, IDS, log=lambda line: None)
    gain = [s for s in steps if s.op.startswith("g_out =")]
    assert len(gain) == 1 and [name for name, *_ in gain[0].uses] == ["logit_gain", "node_gain"]
    assert all(index == (slice(1, 3), slice(48, 96)) for _, index, *_ in gain[0].uses)
