"""Laws of growing (tinyfractal/training/grow.py): the chunks tile the corpus, every stage keeps what the
stages before it trained bit for bit, and the command line and the lesson run end to end."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import examples
from tinyfractal import cli
from tinyfractal.training.checkpoint import load
from tinyfractal.config import Config
from tinyfractal.training.grow import chunk_data, grow, parse_steps, stage_steps, step_flops, union
from tinyfractal.training.merge import extract
from tinyfractal.training.train import TrainConfig
from tinyfractal.core.tree import flatten


def corpus(n, vocab, seed=0):
    """Random tokens with a repeated phrase, so a few steps of training lower the loss."""
    rng = np.random.default_rng(seed)
    out = np.tile(rng.integers(0, vocab, size=13), n // 13 + 1)[:n]
    noise = rng.random(n) < 0.3
    out[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    return out.astype(np.int32)


SMALL = Config.preset("micro").override(levels=3, hidden=16, head_dim=8, vocab_size=16, context=8)
QUICK = TrainConfig(steps=3, batch_size=2, eval_interval=2, eval_batches=1, log_interval=2, warmup=0)


@examples(25)
@given(st.integers(40, 3000), st.integers(1, 9))
def test_chunks_tile_the_corpus_each_split_90_10(n, n_chunks):
    """Chunk k's train then val part are contiguous, the chunks follow each other, and together they are
    the corpus; inside each chunk the first 90% trains."""
    tokens = np.arange(n, dtype=np.int32)
    try:
        chunks = chunk_data(tokens, n_chunks, context=2)
    except ValueError as e:
        assert "context+1" in str(e)
        return
    np.testing.assert_array_equal(np.concatenate([np.concatenate(c) for c in chunks]), tokens)
    for train, val in chunks:
        total = len(train) + len(val)
        assert len(train) == int(total * 0.9)
    train, val = union(chunks, 0, n_chunks)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), tokens)


@pytest.mark.parametrize("tc", [QUICK, QUICK.override(clip_mode="tree", loss_weights="width")],
                         ids=["defaults", "tree-options"])
def test_grow_keeps_every_trained_model_bit_for_bit(tc):
    """Every model a stage trained is, after all later stages, still in the final tree bit for bit at its
    node; each merge reports max abs logit diff 0.0 and unchanged children; the records describe the tree.
    With the tree's own training options (tree clipping, loss weights) growth still runs: a merged parent
    trains its own loss, clipped as one model."""
    saved = {}

    def keep(t, record, params, cfg):
        saved[tuple(record["node"])] = {k: v.copy() for k, v in flatten(params).items()}

    params, stages = grow(SMALL, tc, [3, 2, 2], tokens=corpus(4000, 16), log=lambda msg: None,
                          on_stage=keep)
    assert [len(s) for s in stages] == [4, 2, 1]
    assert [r["chunks"] for r in stages[0]] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert [r["chunks"] for r in stages[1]] == [[0, 2], [2, 4]]
    assert stages[2][0]["chunks"] == [0, 4]
    for (level, j), want in saved.items():
        got = flatten(extract(params, SMALL, level, j))
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"({level},{j}) {name}")
    for records in stages[1:]:
        for r in records:
            assert r["logit_max_abs_diff"] == [0.0, 0.0]
            assert r["children_unchanged"] is True
            assert set(r["val_at_merge"]) >= {"0.0", "1.0", "1.1"}
            assert r["new_entries"] > 0
    assert stages[0][0]["step_flops"] == step_flops(SMALL.sub(2), QUICK.batch_size)
    assert stages[2][0]["train_flops"] == 2 * step_flops(SMALL, QUICK.batch_size)


def test_grow_new_blocks_learn():
    """Training the new blocks lowers the new parent's val loss below where it started at the merge."""
    cfg = SMALL.override(levels=2)
    tc = TrainConfig(steps=40, batch_size=4, eval_interval=40, eval_batches=2, log_interval=40, warmup=0, lr=1e-2)
    _, stages = grow(cfg, tc, [60, 40], tokens=corpus(6000, 16), log=lambda msg: None)
    root = stages[1][0]
    assert root["final_val"]["0.0"] < root["val_at_merge"]["0.0"]
    assert root["final_val"]["1.0"] == root["val_at_merge"]["1.0"]


def test_step_flops_of_all_levels_is_the_joint_training_step():
    """step_flops over every level equals coupling.train_step_flops of the uncoupled tree (one count of the
    cost of a step, used by both the grown and the joint budget), and the root alone costs less."""
    from tinyfractal.variants import variant_of
    for cfg in (SMALL, Config.preset("tiny"), Config.preset("sierpinski")):
        assert step_flops(cfg, 5, levels=range(cfg.levels)) == variant_of(cfg).train_step_flops(cfg, 5)
        assert step_flops(cfg, 5) < step_flops(cfg, 5, levels=range(cfg.levels))


def test_stage_steps_and_parse_steps():
    """Steps are one count for all stages or one per stage, leaves first; anything else is a ValueError."""
    assert stage_steps(5, 3) == [5, 5, 5]
    assert parse_steps("4,3,2", 3) == [4, 3, 2]
    assert parse_steps("7", 2) == [7, 7]
    for bad in ([1, 2], [1, 0, 1], "x"):
        with pytest.raises(ValueError, match="steps per stage"):
            stage_steps(bad, 3)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_steps("1,a", 2)


def test_grow_refuses_what_it_cannot_grow():
    """Coupled and byte configs, and a corpus too short to cut into chunks, are ValueErrors."""
    with pytest.raises(ValueError, match="not supported for the upstream variant"):
        grow(SMALL.override(coupling="upstream"), QUICK, 1, tokens=corpus(4000, 16))
    with pytest.raises(ValueError, match="not supported for the bytes variant"):
        grow(SMALL.override(tokenizer="bytes", vocab_size=256), QUICK, 1, tokens=corpus(4000, 16))
    with pytest.raises(ValueError, match="context\\+1"):
        grow(SMALL, QUICK, 1, tokens=corpus(60, 16))
    with pytest.raises(ValueError, match="off_diagonal"):
        grow(SMALL, QUICK, 1, tokens=corpus(4000, 16), off_diagonal="ones")


def test_grow_command_writes_checkpoint_and_stage_metrics(tmp_path, capsys):
    """`python -m tinyfractal grow` on micro writes a loadable checkpoint of the preset's config and one
    metrics file per stage; bad arguments are one line on stderr and exit code 2."""
    out = tmp_path / "grown"
    code = cli.main(["grow", "--preset", "micro", "--out", str(out), "--steps-per-stage", "2,1",
                     "--batch_size=2", "--eval_batches=1", "--eval_interval=1", "--off-diagonal", "random"])
    assert code == 0
    params, cfg, meta = load(out)
    assert cfg == Config.preset("micro")
    assert meta["grow"]["steps_per_stage"] == [2, 1] and meta["grow"]["off_diagonal"] == "random"
    for t, n in ((0, 2), (1, 1)):
        stage = json.loads((out / f"stage{t}.json").read_text())
        assert stage["stage"] == t and len(stage["models"]) == n
        assert all(m["metrics"]["val"]["0.0"] for m in stage["models"])
    assert "children unchanged" in capsys.readouterr().out
    for argv, words in ((["--steps-per-stage", "1,2,3"], "2 of them"), (["--off-diagonal", "ones"], "zero, random"),
                        (["--steps-per-stage", "1", "--coupling=upstream"], "upstream variant")):
        code = cli.main(["grow", "--preset", "micro", "--out", str(tmp_path / "bad")] + argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and "\n" not in err, err


def test_merging_lesson_quick(tmp_path, capsys):
    """The lesson runs with --quick, tells its story and saves its figures."""
    from tinyfractal.lessons import merging
    assert merging.main(["--quick", "--out", str(tmp_path)]) in (0, None)
    text = capsys.readouterr().out
    assert "max abs diff" in text and "0.0" in text
    assert sorted(p.name for p in tmp_path.glob("*.png"))


def test_merging_lesson_logits_at_gain_is_the_output_with_that_gain():
    """Section 3(d)'s prediction sums each child's logits at the parent's gain: logits_at_gain(params, cfg, ids, g)
    is forward() of the same model with g as its output gain. Checked per coordinate (random tables, float64):
    at the model's own gain, and at another gain g written into the model's own tables
    (logit_gain row 0 = 0, node_gain row 0 = g * sqrt(d) - 1, so that output_gain is g)."""
    from tinyfractal.core.model import forward, output_gain
    from tinyfractal.lessons.merging import logits_at_gain
    import tinyfractal as tf
    cfg = Config.preset("micro").override(levels=1, hidden=8, head_dim=4, vocab_size=16, context=8,
                                          logit_scale="learned", node_gains=True)
    rng = np.random.default_rng(3)

    def as64(tree):
        if isinstance(tree, dict):
            return {k: as64(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [as64(v) for v in tree]
        return np.asarray(tree, dtype=np.float64)
    params = as64(tf.init_params(cfg, 0))
    params["logit_gain"] = rng.normal(0, 0.3, params["logit_gain"].shape)
    params["node_gain"] = rng.normal(0, 0.3, params["node_gain"].shape)
    ids = rng.integers(0, cfg.vocab_size, size=(2, cfg.context))
    np.testing.assert_allclose(logits_at_gain(params, cfg, ids, output_gain(params, cfg)), forward(params, cfg, ids),
                               rtol=1e-12, atol=1e-12)
    g = rng.uniform(0.1, 0.9, cfg.hidden)
    other = dict(params, logit_gain=np.zeros_like(params["logit_gain"]),
                 node_gain=(g * np.sqrt(cfg.hidden) - 1.0)[None, :])
    np.testing.assert_allclose(output_gain(other, cfg), g, rtol=1e-12)
    np.testing.assert_allclose(logits_at_gain(params, cfg, ids, g), forward(other, cfg, ids), rtol=1e-10, atol=1e-10)
    assert not np.allclose(logits_at_gain(params, cfg, ids, g), forward(params, cfg, ids))


RESUMABLE = TrainConfig(steps=6, batch_size=2, eval_interval=2, eval_batches=1, log_interval=1, warmup=1)
TIMES = ("seconds", "cpu_seconds")


def without_times(stages):
    """The stage records without their wall and CPU seconds (which no two runs share)."""
    return [[{k: v for k, v in r.items() if k not in TIMES} for r in records] for records in stages]


def stop_at(predicate):
    """A log function that raises KeyboardInterrupt (as Ctrl-C would) at the first message matching."""
    def log(msg):
        if predicate(msg):
            raise KeyboardInterrupt
    return log


@pytest.mark.parametrize("where", [
    "[stage 1/3 node (2,2)] step     5/6",     # a leaf, mid-training: its step-4 checkpoint is the last
    "[stage 2/3 node (1,1)] step     3/6",     # a merged parent, mid-training, after one evaluation
    "== stage 3/3",                            # between stages: every model so far finished and saved
])
def test_a_growth_interrupted_then_resumed_equals_one_never_stopped(tmp_path, where):
    """Law of resuming a growth: stopped by Ctrl-C (KeyboardInterrupt) at a leaf, at a merged parent or
    between stages, then run again with resume=True, growing ends with the same arrays bit for bit, and
    the same stage records (merge checks, val losses, metrics, FLOPs, children unchanged) but for their
    seconds, as a growth that was never stopped; the interrupted model continued from its checkpoint."""
    tokens = corpus(4000, 16)
    whole, whole_stages = grow(SMALL, RESUMABLE, [6, 6, 6], tokens=tokens, out=tmp_path / "whole", log=lambda m: None)

    with pytest.raises(KeyboardInterrupt):
        grow(SMALL, RESUMABLE, [6, 6, 6], tokens=tokens, out=tmp_path / "cut", log=stop_at(lambda m: m.startswith(where)))
    assert not (tmp_path / "cut" / "checkpoint.json").exists() and not (tmp_path / "cut" / "stage2.json").exists()
    messages = []
    resumed, resumed_stages = grow(SMALL, RESUMABLE, [6, 6, 6], tokens=tokens, out=tmp_path / "cut",
                                   log=messages.append, resume=True)
    assert any("--resume: trained in the run before" in m for m in messages)
    if "step" in where:          # the interrupted model went on from its last evaluation, not from step 0
        node = where.split("]")[0] + "]"
        assert any(m.startswith(node) and "--resume: continuing at step" in m for m in messages), messages
        assert not any(m.startswith(node + " step     1/6") for m in messages)
    for name, a in flatten(whole).items():
        np.testing.assert_array_equal(flatten(resumed)[name], a, err_msg=name)
    assert without_times(resumed_stages) == without_times(whole_stages)
    for t in range(3):
        saved = json.loads((tmp_path / "cut" / f"stage{t}.json").read_text())["models"]
        assert without_times([saved]) == without_times([json.loads((tmp_path / "whole" / f"stage{t}.json")
                                                                   .read_text())["models"]])
    params, _, _ = load(tmp_path / "cut")
    assert all(np.array_equal(a, flatten(whole)[k]) for k, a in flatten(params).items())


def test_resuming_another_growth_is_refused(tmp_path):
    """resume=True over checkpoints of another growth (other steps, options or corpus) is a ValueError
    that says so, never a silent mix; without `out` there is nothing to resume from."""
    tokens = corpus(4000, 16)
    with pytest.raises(KeyboardInterrupt):
        grow(SMALL, RESUMABLE, [6, 6, 6], tokens=tokens, out=tmp_path, log=stop_at(lambda m: m.startswith("== stage 2")))
    for change in ({"steps": [6, 6, 5]}, {"off_diagonal": "random"}, {"tokens": corpus(4000, 16, seed=1)}):
        kwargs = {"steps": [6, 6, 6], "tokens": tokens, **change}
        with pytest.raises(ValueError, match="cannot resume growing"):
            grow(SMALL, RESUMABLE, kwargs.pop("steps"), out=tmp_path, log=lambda m: None, resume=True, **kwargs)
    with pytest.raises(ValueError, match="needs the folder"):
        grow(SMALL, RESUMABLE, [6, 6, 6], tokens=tokens, resume=True)
