"""kill -9 at random moments, two trainers on one folder, stale locks, unwritable folders, divergence
(issue 13): real `python -m tinyfractal train` processes, stopped the hard way."""
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tinyfractal as tf
from tinyfractal import runlock
from tinyfractal.core.tree import flatten
from tinyfractal.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# a checkpoint after every step, so a kill lands inside a save often
TRAIN = ["train", "--preset", "micro", "--steps", "100000", "--eval_interval=1", "--eval_batches=1", "--batch_size=1",
         "--log_interval=100000"]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "tinyfractal", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyfractal", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env(), cwd=ROOT)


def leftovers(folder):
    """What a save that was cut short leaves: hidden temporaries, and step folders nothing points at."""
    names = os.listdir(folder)
    temps = [n for n in names if checkpoint.TEMP_NAME.fullmatch(n)]
    try:
        kept = checkpoint._read_pointer(folder)["kept"]
    except ValueError:
        kept = []
    return temps + [n for n in checkpoint.step_folders(folder) if n not in kept]


def pointer_text(folder):
    try:
        return (Path(folder) / "checkpoint.json").read_text()
    except OSError:
        return None


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.0005)
    return False


def kill_trials(folder, trials, rng, log):
    """Start (or resume) training in `folder` and kill -9 it, `trials` times; after each kill the folder
    must load, at a step no earlier than before the kill."""
    for i in range(trials):
        had = checkpoint.exists(folder)
        step_before = tf.load(folder)[2]["step"] if had else 0
        old = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        pointer = pointer_text(folder)
        p = start(*TRAIN, "--out", folder, *(["--resume"] if had else []))
        try:
            if i % 2 == 0:   # aim inside a save: kill as soon as a new save's temporary appears
                wait_for(lambda: os.path.isdir(folder) and any(checkpoint.TEMP_NAME.fullmatch(n) and n not in old
                                                                for n in os.listdir(folder)), 30)
            else:            # anywhere in a step, an evaluation or a save, once this process has saved once
                wait_for(lambda: pointer_text(folder) not in (None, pointer), 30)
                time.sleep(rng.uniform(0, 0.5))
        finally:
            p.send_signal(signal.SIGKILL)
            p.communicate()
        assert p.returncode == -9, p.stderr
        cut = leftovers(folder) if os.path.isdir(folder) else []
        if checkpoint.exists(folder):
            params, cfg, meta = tf.load(folder)          # never "neither": the previous or the new checkpoint
            assert cfg == tf.Config.preset("micro") and meta["step"] >= step_before
            assert checkpoint.load_optimizer(folder)["t"] == meta["step"]
        else:
            assert not had, f"trial {i}: the folder held a checkpoint before the kill and none after"
        log.append((i, step_before, checkpoint.exists(folder) and tf.load(folder)[2]["step"], cut))


def test_kill_9_at_30_moments_never_leaves_an_unloadable_folder(tmp_path):
    """30 kill -9s of a training run that saves after every step (half of them aimed inside a save, as
    soon as its temporary files appear, half at a random time in the first half second after the
    process's first save), in two run folders at once: after every
    kill the folder loads, as the last checkpoint before the kill or a newer one, and the run resumes
    from it (taking over the dead trainer's lock). What killed saves left behind (hidden temporaries,
    step folders nothing points at) is gone after the next save."""
    logs = [[], []]
    errors = []

    def worker(k):
        try:
            kill_trials(tmp_path / f"run{k}", 15, random.Random(1000 + k), logs[k])
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    trials = logs[0] + logs[1]
    assert len(trials) == 30
    assert sum(1 for *_, cut in trials if cut) >= 1, "no kill landed inside a save"
    assert all(after for _, before, after, _ in trials if before), trials   # once saved, always loadable
    for k in range(2):
        folder = tmp_path / f"run{k}"
        params, cfg, meta = tf.load(folder)
        state = checkpoint.load_optimizer(folder)
        tf.save(folder, params, cfg, meta, opt_state=state)      # the next save cleans up
        assert leftovers(folder) == [] and len(checkpoint.step_folders(folder)) <= 2
        assert not any(n.startswith(".") and n != ".lock" for n in os.listdir(folder))
    print("kills that left a cut-short save behind:", sum(1 for *_, cut in trials if cut), "of 30")


def test_two_trainers_on_one_folder(tmp_path):
    """While a trainer owns --out, a second trainer on the same folder (resuming, overwriting or starting)
    exits 2 with one line naming the owner's pid, and writes nothing; the first one is undisturbed and
    its folder loads. A tf.save into the locked folder is refused too."""
    out = tmp_path / "run"
    first = start(*TRAIN[:3], "--steps", "150", *TRAIN[5:], "--out", out)
    try:
        assert wait_for(lambda: checkpoint.exists(out), 60), "the first trainer never saved"
        for extra in (["--resume"], ["--overwrite"], []):
            r = run(*TRAIN, "--out", out, *extra)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            if extra:
                assert f"in use by another trainer (pid {first.pid}" in lines[0], lines
            else:   # refused either for the lock or because the folder holds a run
                assert f"pid {first.pid}" in lines[0] or "already holds a run" in lines[0]
        code = ("import sys, tinyfractal as tf\ncfg = tf.Config.preset('micro')\n"
                "try:\n    tf.save(sys.argv[1], tf.init_params(cfg, 0), cfg, {'step': 1})\n"
                "except ValueError as e:\n    print(e)\n")
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env(),
                           timeout=60)
        assert f"in use by another trainer (pid {first.pid}" in r.stdout, (r.stdout, r.stderr)
        assert runlock.owner(out) == first.pid
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    _, _, meta = tf.load(out)
    assert meta["step"] == 150 and meta["metrics"]["step"] == list(range(1, 151))
    assert runlock.owner(out) is None and not (out / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    """A lock file left by a trainer that was killed (its pid gone, its flock released by the kernel) does
    not block the next trainer, which says that it takes it over."""
    out = tmp_path / "run"
    p = start(*TRAIN, "--out", out)
    try:
        assert wait_for(lambda: checkpoint.exists(out), 60)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert (out / ".lock").read_text().strip() == str(p.pid)
    assert runlock.owner(out) is None
    r = run(*TRAIN[:3], "--steps", str(tf.load(out)[2]["step"] + 2), *TRAIN[5:], "--out", out, "--resume",
            "--allow-changes")
    assert r.returncode == 0, r.stderr
    assert f"locked by pid {p.pid}, which is no longer running; taking it over" in r.stdout


@pytest.mark.parametrize("where", ["an existing file", "/dev/null", "under a file", "read-only folder"])
def test_an_unwritable_out_is_refused_before_training(tmp_path, where):
    """--out that cannot be a writable folder (an existing file, /dev/null, a path under a file, a
    read-only folder) is one line and exit 2 before any training step, not a traceback at the first save."""
    if where == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    target = {"an existing file": tmp_path / "file", "/dev/null": Path("/dev/null"),
              "under a file": tmp_path / "file" / "run", "read-only folder": tmp_path / "ro"}[where]
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    started = time.monotonic()
    r = run("train", "--preset", "micro", "--steps", "5000", "--out", target)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "step" not in r.stdout and time.monotonic() - started < 60


def test_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path):
    """A good run resumed with a huge learning rate (an explicit change) diverges: one line on stderr naming
    the step and the likely cause (the learning rate), exit 3; the checkpoint on disk is finite and from
    before that step; resuming it with a sane learning rate goes on."""
    out = tmp_path / "run"
    base = ["train", "--preset", "micro", "--eval_interval=1", "--eval_batches=1", "--batch_size=2", "--warmup=0",
            "--logit_scale=none", "--nested_init=false"]   # the prototype's output: the run this guard was built on
    assert run(*base, "--steps", "10", "--out", out).returncode == 0
    r = run(*base, "--steps", "60", "--out", out, "--resume", "--allow-changes", "--lr=1e3")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: training diverged ") and "learning rate" in line and "the last finite one" in line
    bad_step = int(line.split(" step ")[1].split(":")[0])
    params, _, meta = tf.load(out)             # load refuses non-finite arrays, so this also proves finiteness
    assert all(np.isfinite(a).all() for a in flatten(params).values())
    assert 10 <= meta["step"] < bad_step and f"keeps the checkpoint of step {meta['step']}" in line
    r = run(*base, "--steps", str(meta["step"] + 3), "--out", out, "--resume", "--allow-changes", "--lr=1e-3",
            "--min_lr=1e-4")
    assert r.returncode == 0, r.stderr
