"""The lesson workflow cannot be broken by accident: a quick run's model is never taken for a trained one,
Ctrl-C keeps a loadable checkpoint and prints one line, --resume continues bit for bit, the shipped
tokenizer is not overwritten, and the loss-curve figure shows the unigram baseline."""
import argparse
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lesson_runs import REPO, env, quick_run
from tinyfractal import Config, Tokenizer, init_params, load
from tinyfractal.core.tree import flatten
from tinyfractal.training.checkpoint import exists
from tinyfractal.lessons import _common, speculative
from tinyfractal.lessons.__main__ import main as lessons_main
from tinyfractal.training.train import TrainConfig


def args_for(name="test", quick=False, resume=False, **more):
    return argparse.Namespace(name=name, quick=quick, resume=resume, **more)


def test_a_quick_checkpoint_says_so_and_is_refused_as_a_trained_model(tmp_path, capsys):
    """base --quick saves a checkpoint whose meta says quick; loading it for a full run is a one-line
    error (exit 2), and a quick run may use it."""
    ckpt = quick_run("base").folder / "checkpoint"
    _, _, meta = load(ckpt)
    assert meta["quick"] is True and meta["lesson"] == "base" and meta["step"] == 4
    with pytest.raises(ValueError, match="--quick run"):
        _common.load_trained(ckpt, quick=False)
    assert _common.load_trained(ckpt, quick=True)[2]["step"] == 4
    assert speculative.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--quick run" in err[0]


@pytest.mark.parametrize("name", ["speculative", "fractal"])
def test_quick_then_full_does_not_reuse_the_quick_model(name, tmp_path, monkeypatch, capsys):
    """A quick run's model left where a full run looks (lesson_output/base/checkpoint, as --quick wrote
    before it had its own folder) is skipped with a note: the full lesson trains its own."""
    module = importlib.import_module(f"tinyfractal.lessons.{name}")
    monkeypatch.chdir(tmp_path)
    assert lessons_main(["base", "--quick", "--out", "lesson_output/base"]) == 0
    capsys.readouterr()
    args = args_for(name, ckpt=None, steps=2, seed=0, out=Path(f"lesson_output/{name}"))
    params, cfg, source = module.get_model(args, Tokenizer.default())
    out = capsys.readouterr().out
    assert "Not using lesson_output/base/checkpoint: it holds a --quick run's model (4 steps)" in out
    assert source.startswith("trained here")
    _, _, meta = load(f"lesson_output/{name}/checkpoint")
    assert meta["quick"] is False and meta["step"] == 2 and meta["lesson"] == name
    # and with a full run's checkpoint there, it is taken
    params2, _, source = module.get_model(args, Tokenizer.default())
    assert source == f"loaded lesson_output/{name}/checkpoint (trained 2 steps)"
    assert all(np.array_equal(a, b) for a, b in zip(flatten(params).values(), flatten(params2).values()))


def test_ctrl_c_keeps_a_loadable_checkpoint_and_prints_one_line(tmp_path):
    """SIGINT to a lesson that is training: exit code 130, one line on stderr naming the checkpoint kept
    and --resume, and that checkpoint loads: a quick run's, saved at the step where it stopped (or at
    the last evaluation, if the interrupt came during one), with the loss history up to that step."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "tinyfractal.lessons.base", "--quick", "--steps", "400", "--out",
                          str(out)], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not exists(out / "checkpoint") and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)                      # a few steps past the first evaluation
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: kept ") and "--resume" in lines[0], stderr
    assert "Traceback" not in stderr
    params, cfg, meta = load(out / "checkpoint")
    assert meta["quick"] is True and 40 <= meta["step"] < 400 and len(meta["metrics"]["loss"]) == meta["step"]
    assert f"(step {meta['step']} of 400)" in lines[0]


def test_ctrl_c_during_a_save_waits_until_the_save_is_done():
    """SIGINT inside `uninterrupted()` (the block that writes a checkpoint) is held until the block ends,
    then raised as KeyboardInterrupt; the handler in force before is restored."""
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _common.uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("written")
    assert done == ["written"] and signal.getsignal(signal.SIGINT) is before


def micro_run(tmp_path, name):
    cfg = Config.preset("micro")
    tc = TrainConfig(steps=6, batch_size=2, warmup=1, eval_interval=2, eval_batches=1, log_interval=1, seed=3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=4000).astype(np.int32)
    return cfg, tc, tokens[:3000], tokens[3000:], tmp_path / name


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupted after the checkpoint of step 4 and resumed with --resume, training ends with the same
    arrays and the same loss history, bit for bit, as a run that was never interrupted."""
    cfg, tc, train_tokens, val_tokens, whole = micro_run(tmp_path, "whole")
    reference = init_params(cfg, 0)
    _common.train_with_checkpoints(args_for(), whole, reference, cfg, tc, train_tokens, val_tokens, log=lambda m: None)

    cut = tmp_path / "cut"
    real_save = _common.save_run

    def save_then_stop(path, params, cfg, tc, state, metrics, extra=None, **kw):
        real_save(path, params, cfg, tc, state, metrics, extra, **kw)
        if state["t"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(_common, "save_run", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _common.train_with_checkpoints(args_for(), cut, init_params(cfg, 0), cfg, tc, train_tokens, val_tokens,
                                       log=lambda m: None)
    monkeypatch.setattr(_common, "save_run", real_save)
    assert load(cut)[2]["step"] == 4
    resumed = init_params(cfg, 99)                      # overwritten by the checkpoint
    _, metrics = _common.train_with_checkpoints(args_for(resume=True), cut, resumed, cfg, tc, train_tokens,
                                                val_tokens, log=lambda m: None)
    for name, a in flatten(reference).items():
        assert np.array_equal(a, flatten(resumed)[name]), name
    assert metrics == load(whole)[2]["metrics"]


@pytest.mark.parametrize("change", ["quick", "steps", "config"])
def test_resume_refuses_another_kind_of_run(tmp_path, change):
    """--resume from a checkpoint of a quick run into a full one (or of other settings, or another model)
    is a ValueError that says so, never a silent mix."""
    cfg, tc, train_tokens, val_tokens, path = micro_run(tmp_path, "run")
    _common.train_with_checkpoints(args_for(), path, init_params(cfg, 0), cfg, tc, train_tokens, val_tokens,
                                   log=lambda m: None)
    args = args_for(resume=True, quick=change == "quick")
    if change == "steps":
        tc = dataclasses.replace(tc, steps=8)
    if change == "config":
        cfg = cfg.override(layers=cfg.layers + 1)
    with pytest.raises(ValueError, match="cannot resume"):
        _common.resume_state(args, path, init_params(cfg, 0), cfg, tc)


def test_resume_with_nothing_saved_starts_from_step_0(tmp_path, capsys):
    cfg, tc, *_ = micro_run(tmp_path, "none")
    assert _common.resume_state(args_for(resume=True), tmp_path / "none", init_params(cfg, 0), cfg, tc) == (None, None)
    assert "nothing saved" in capsys.readouterr().out


def test_the_tokenizer_command_refuses_to_overwrite_the_shipped_tokenizer(tmp_path, capsys, monkeypatch):
    """`python -m tinyfractal.tokenizer` (default --out: the shipped file) and --out at the package's copy
    are refused with one line and exit 2, before any training; the files are unchanged. Elsewhere it writes."""
    from tinyfractal import paths
    from tinyfractal.text import bpe
    before = {p: p.read_bytes() for p in paths.SHIPPED_TOKENIZERS}
    for argv in ([], ["--out", str(paths.DATA / "tokenizer.json")], ["--merges", "3"]):
        assert bpe.main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "refusing to overwrite" in err[0] and "--force" in err[0]
        assert "training" not in captured.out
    monkeypatch.chdir(REPO)
    assert bpe.main(["--out", "tokenizer/tokenizer.json"]) == 2
    capsys.readouterr()
    assert {p: p.read_bytes() for p in paths.SHIPPED_TOKENIZERS} == before
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat, the end\n" * 20, encoding="utf-8")
    target = tmp_path / "tok.json"
    assert bpe.main(["--input", str(small), "--merges", "3", "--out", str(target)]) == 0
    assert Tokenizer.load(target).vocab_size == len(set(small.read_text())) + 3
    assert bpe.main(["--input", str(small), "--merges", "3", "--out", str(target), "--force"]) == 0


def test_loss_curves_draw_the_unigram_baseline(tmp_path, monkeypatch):
    """loss_curves draws a horizontal line at the unigram entropy in both panels (given, or read from
    the metrics' "unigram_entropy"), and none without it."""
    from tinyfractal.tools import plots
    cfg = Config.preset("micro")
    keys = [f"{l}.{j}" for l, j in __import__("tinyfractal").nodes(cfg)]
    metrics = {"step": [1, 2], "loss": [5.0, 4.0], "eval_step": [2], "train": {k: [4.0] for k in keys},
               "val": {k: [4.1] for k in keys}}
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)

    plots.loss_curves(metrics, cfg, tmp_path / "a.png", unigram=3.25)
    plots.loss_curves({**metrics, "unigram_entropy": 2.5}, cfg, tmp_path / "b.png")
    plots.loss_curves(metrics, cfg, tmp_path / "c.png")
    baseline = [[line for ax in fig.axes for line in ax.get_lines() if "unigram" in str(line.get_label())]
                for fig in figures]
    assert [len(b) for b in baseline] == [2, 2, 0]
    assert {float(y) for line in baseline[0] for y in line.get_ydata()} == {3.25}
    assert {float(y) for line in baseline[1] for y in line.get_ydata()} == {2.5}


def test_the_tax_lesson_keeps_its_runs_on_ctrl_c_and_continues_them(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the tax lesson's study (after the checkpoint at step 10 of its second run): exit 130, one
    line naming the finished run and the checkpoint kept; run again with --resume, the interrupted run
    continues from step 10 and the finished one is not trained again, and the lesson ends with the same
    numbers, bit for bit, as a run that was never interrupted."""
    import json
    from tinyfractal.lessons import tax
    from tinyfractal.tools import study
    argv = ["--quick", "--steps", "20"]
    assert tax.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    real_train, runs = study.train, []

    def train_then_stop(*args, on_eval=None, **kwargs):
        runs.append(0)

        def on_eval_then_stop(step, metrics, state):
            on_eval(step, metrics, state)
            if len(runs) == 2 and step == 10:
                raise KeyboardInterrupt
        return real_train(*args, on_eval=on_eval_then_stop, **kwargs)
    monkeypatch.setattr(study, "train", train_then_stop)
    cut = tmp_path / "cut"
    assert tax.main(argv + ["--out", str(cut)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: kept ") and "--resume" in err[0], err
    assert ".json (step 20 of 20)" in err[0] and ".partial (step 10 of 20)" in err[0], err[0]

    monkeypatch.setattr(study, "train", real_train)
    runs.clear()
    assert tax.main(argv + ["--out", str(cut), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("cached: ") == 1 and "resuming from" in out and "at step 10" in out
    for name in ("prototype", "defaults"):
        whole, resumed = (json.loads((tmp_path / folder / f"tax_{name}.json").read_text()) for folder in ("whole", "cut"))
        assert [(r["val"], r["train"], r["alone"]) for r in whole["nodes"]] == \
            [(r["val"], r["train"], r["alone"]) for r in resumed["nodes"]]
        assert whole["alone"]["0"][0]["loss"] == resumed["alone"]["0"][0]["loss"]     # the interrupted run
