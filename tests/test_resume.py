"""Resume that means resume (issue 13): a run interrupted anywhere and resumed with the same command ends
bit for bit equal to the run that never stopped; changed settings are refused or explicit and recorded;
a finished run resumed does nothing; a run folder is never overwritten by accident."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyfractal as tf
from tinyfractal import cli
from tinyfractal.training import checkpoint
from tinyfractal.training.train import TrainConfig, fit, lr_at

ROOT = Path(__file__).resolve().parents[1]

# 40 steps with warmup and cosine decay, dropout on (a second random stream), a checkpoint every 10 steps
RUN = ["train", "--preset", "micro", "--steps", "40", "--warmup=5", "--lr=1e-2", "--min_lr=1e-3",
       "--eval_interval=10", "--eval_batches=1", "--batch_size=2", "--dropout=0.1", "--log_interval=10"]

# Runs the command line with one hook that stops the process at a chosen moment:
#   after-save N   kill -9 right after the checkpoint of step N is on disk
#   in-save N      kill -9 inside the save of step N: its step folder is written, checkpoint.json not yet
#   mid-step N     kill -9 inside step N's AdamW update
#   ctrl-c N       SIGINT (Ctrl-C) while step N computes its loss
DRIVER = r"""
import os, signal, sys
import tinyfractal.training.checkpoint as C
import tinyfractal.training.train as T
from tinyfractal import cli
mode, at = sys.argv[1], int(sys.argv[2])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "after-save":
    real_save = T.save_run
    def save_run(out, params, cfg, tc, state, *a, **k):
        real_save(out, params, cfg, tc, state, *a, **k)
        if state["t"] == at:
            kill()
    T.save_run = save_run
elif mode == "in-save":
    real_pointer = C._write_pointer
    def write_pointer(folder, latest, kept):
        if latest == f"step-{at:06d}":
            kill()
        real_pointer(folder, latest, kept)
    C._write_pointer = write_pointer
elif mode == "mid-step":
    real_step = T.adamw_step
    def adamw_step(params, grads, state, *a, **k):
        if state["t"] == at - 1:
            params["E"] -= 1.0          # half an update: must never reach the disk
            kill()
        real_step(params, grads, state, *a, **k)
    T.adamw_step = adamw_step
elif mode == "ctrl-c":
    real_batch = T.batch_at
    def batch_at(tokens, batch_size, context, seed, step):
        if step == at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(tokens, batch_size, context, seed, step)
    T.batch_at = batch_at
sys.exit(cli.main(sys.argv[3:]))
"""


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyfractal", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=ROOT)


def run_stopped(mode, at, *args):
    return subprocess.run([sys.executable, "-c", DRIVER, mode, str(at), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env(), cwd=ROOT)


def files(folder):
    """{relative path: bytes} of every file in a run folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's folder."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run(*RUN, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("mode, at", [("after-save", 20), ("in-save", 30), ("mid-step", 27), ("ctrl-c", 27)])
def test_an_interrupted_run_resumed_with_the_same_command_equals_the_straight_run(straight, tmp_path, mode, at):
    """A 40-step run with warmup and cosine decay (and dropout), stopped by kill -9 after its step-20
    checkpoint, inside the save of step 30, halfway through step 27's update, or by Ctrl-C in step 27, then
    resumed with the same command and --resume, leaves a run folder equal byte for byte to the run that was
    never stopped: every kept checkpoint (params, AdamW moments, step, settings, metrics history) and
    metrics.json."""
    out = tmp_path / "run"
    r = run_stopped(mode, at, *RUN, "--out", out)
    if mode == "ctrl-c":
        assert r.returncode == 2 and f"holds the checkpoint of step {at - 1}" in r.stderr, r.stderr
    else:
        assert r.returncode == -9, (r.returncode, r.stderr)
    saved = tf.load(out)[2]["step"]
    assert saved == {"after-save": 20, "in-save": 20, "mid-step": 20, "ctrl-c": at - 1}[mode]
    r = run(*RUN, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at step {saved} of 40" in r.stdout
    assert files(out) == files(straight)
    params, _, meta = tf.load(out)
    assert meta["step"] == 40 and meta["metrics"]["eval_step"] == [10, 20, 30, 40]
    assert meta["metrics"]["step"] == list(range(1, 41))


def test_a_resumed_run_follows_the_saved_schedule(tmp_path):
    """The learning rate of a resumed step comes from the saved settings: warmup and cosine decay as the
    straight run has them (lr_at), not rebuilt from whatever --steps the resuming command gives."""
    tc = TrainConfig(steps=40, warmup=5, lr=1e-2, min_lr=1e-3)
    assert lr_at(tc, 0) == pytest.approx(2e-3) and lr_at(tc, 4) == pytest.approx(1e-2)
    assert lr_at(tc, 39) > 1e-3 and lr_at(tc, 40) == pytest.approx(1e-3)
    out = tmp_path / "run"
    assert run(*RUN[:3], "--steps", "20", "--eval_interval=10", "--out", out).returncode == 0
    r = run("train", "--out", out, "--resume", "--steps", "40")
    assert r.returncode == 2 and "steps 20 -> 40" in r.stderr


@pytest.fixture()
def finished(tmp_path):
    """A finished 6-step micro run."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "micro", "--steps", "6", "--eval_interval=3", "--eval_batches=1",
                     "--batch_size=2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("argv, words", [
    (["--lr=0.01"], "lr 0.003 -> 0.01"), (["--seed=1"], "seed 0 -> 1"), (["--batch_size=4"], "batch_size 2 -> 4"),
    (["--steps", "3"], "steps 6 -> 3"), (["--warmup=0"], "warmup 50 -> 0"), (["--level-weights=1,0"], "level_weights"),
    (["--hidden=32"], "another model: hidden 16 -> 32"), (["--preset", "tiny"], "another model"),
    (["--overwrite"], "--overwrite")])
def test_resume_refuses_changed_settings_naming_them(finished, capsys, argv, words):
    """--resume with a setting that differs from the saved one is refused, one line naming the difference,
    exit 2, and nothing in the folder changes (the saved settings are never overwritten)."""
    before = files(finished)
    assert cli.main(["train", "--out", str(finished), "--resume", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert files(finished) == before


def test_resuming_a_finished_run_says_so_and_writes_nothing(finished, capsys):
    """Resuming a finished run prints one line saying so, exits 0 (so a restart loop can end) and writes
    nothing; giving the same settings explicitly is the same; --steps below the saved is refused."""
    before = files(finished)
    for extra in ([], ["--steps", "6", "--preset", "micro", "--batch_size=2"]):
        capsys.readouterr()
        assert cli.main(["train", "--out", str(finished), "--resume", *extra]) == 0
        out = capsys.readouterr().out
        assert out == f"{finished} is a finished run of 6 steps; nothing to do (give --extend-to N to train it further)\n"
        assert files(finished) == before


def test_extend_to_trains_a_finished_run_further_and_records_the_change(finished, capsys):
    """--resume --extend-to N continues a finished run to N steps with the schedule of an N-step run, and
    records the change, its step and the learning rate before and after in metrics['changes']; it can
    only extend, and needs --resume."""
    assert cli.main(["train", "--out", str(finished), "--resume", "--extend-to", "4"]) == 2
    assert cli.main(["train", "--out", str(finished), "--extend-to", "9"]) == 2
    assert "add --resume" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(finished), "--resume", "--extend-to", "9"]) == 0
    _, _, meta = tf.load(finished)
    old, new = TrainConfig(steps=6, batch_size=2, eval_interval=3, eval_batches=1), \
        TrainConfig(steps=9, batch_size=2, eval_interval=3, eval_batches=1)
    assert meta["step"] == 9 and meta["train"] == new.to_dict()
    assert meta["metrics"]["step"] == list(range(1, 10)) and meta["metrics"]["eval_step"] == [3, 6, 9]
    assert meta["metrics"]["changes"] == [{"step": 6, "changed": {"steps": [6, 9]}, "schedule": {
        "steps": 9, "warmup": 50, "lr": 3e-3, "min_lr": 3e-4, "lr_next_step_before": lr_at(old, 6),
        "lr_next_step": lr_at(new, 6)}}]
    assert cli.main(["train", "--out", str(finished), "--resume", "--extend-to", "9"]) == 0   # the same command
    assert "finished run of 9 steps" in capsys.readouterr().out                             # again: nothing to do


def test_allow_changes_records_a_lower_learning_rate(finished):
    """--resume --allow-changes accepts changed training settings (the way on after a divergence) and
    records them; the model config can never change on resume."""
    assert cli.main(["train", "--out", str(finished), "--resume", "--allow-changes", "--lr=1e-3", "--min_lr=1e-4",
                     "--steps", "8"]) == 0
    changes = tf.load(finished)[2]["metrics"]["changes"]
    assert changes[0]["changed"] == {"lr": [3e-3, 1e-3], "min_lr": [3e-4, 1e-4], "steps": [6, 8]}
    assert cli.main(["train", "--out", str(finished), "--resume", "--allow-changes", "--hidden=32"]) == 2


def test_a_folder_holding_a_run_is_never_overwritten_by_accident(finished, capsys):
    """train --out DIR refuses a folder that holds a run unless --resume or --overwrite; --overwrite starts a
    new run there, whose first checkpoint replaces the old ones; --resume on an empty folder is refused."""
    before = files(finished)
    assert cli.main(["train", "--preset", "micro", "--steps", "4", "--out", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run at step 6 of 6" in err and "--resume" in err and "--overwrite" in err
    assert files(finished) == before
    assert cli.main(["train", "--preset", "micro", "--steps", "4", "--eval_interval=2", "--eval_batches=1",
                     "--batch_size=2", "--seed=5", "--out", str(finished), "--overwrite"]) == 0
    assert checkpoint.step_folders(finished) == ["step-000002", "step-000004"]
    _, _, meta = tf.load(finished)
    assert meta["step"] == 4 and meta["train"]["seed"] == 5 and meta["metrics"]["step"] == [1, 2, 3, 4]
    assert json.loads((finished / "metrics.json").read_text())["step"] == [1, 2, 3, 4]
    empty = finished.parent / "empty"
    assert cli.main(["train", "--out", str(empty), "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_fit_resume_compares_every_setting(tmp_path):
    """The API: fit(resume=True) refuses another TrainConfig, naming the settings, unless allowed."""
    cfg = tf.Config.preset("micro")
    tc = TrainConfig(steps=2, batch_size=2, eval_interval=2, eval_batches=1, log_interval=10)
    fit(cfg, tc, out=tmp_path / "r", log=lambda *a: None)
    with pytest.raises(ValueError, match=r"grad_clip 1.0 -> 0.5"):
        fit(cfg, tc.override(grad_clip=0.5), out=tmp_path / "r", resume=True, log=lambda *a: None)
    params, state, metrics, data = fit(cfg, tc.override(steps=3), out=tmp_path / "r", resume=True,
                                       allow_changes=("steps",), log=lambda *a: None)
    assert state["t"] == 3 and metrics["changes"][0]["changed"] == {"steps": [2, 3]}
    with pytest.raises(ValueError, match="allow_changes names unknown"):
        fit(cfg, tc, out=tmp_path / "r", resume=True, allow_changes=("hidden",))
    assert np.isfinite(params["E"]).all()
