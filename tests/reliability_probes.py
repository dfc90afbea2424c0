"""Every probe of issue 13, run for real: what a careless or hostile user gets now.

    python tests/reliability_probes.py            # prints one line per probe: the probe, then what happened

Not collected by pytest (no test_ prefix); the tests that hold these results are test_reliability.py,
test_resume.py and test_kill.py. Takes about a minute and a half on a quiet 2-core machine.
"""
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinyfractal as tf                                  # noqa: E402
from tinyfractal.core.tree import flatten                 # noqa: E402
from tinyfractal.training import checkpoint               # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MICRO = ["--preset", "micro", "--eval_batches=1", "--batch_size=2"]
WORK = Path(tempfile.mkdtemp(prefix="probes-"))


def cli(*args, timeout=600, env=None):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tinyfractal", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env or ENV, cwd=ROOT)
    return r, time.monotonic() - t0


def said(r):
    """exit code and the last line of stderr (or stdout)."""
    text = (r.stderr.strip() or r.stdout.strip()).splitlines()
    lines = len(r.stderr.strip().splitlines())
    return f"exit {r.returncode}, {lines} line(s) on stderr: {text[-1][:500] if text else ''}"


def api(fn):
    try:
        out = fn()
        return f"returns {out!r}"[:200]
    except Exception as e:  # noqa: BLE001 - what the user sees is the point
        return f"{type(e).__name__}: {str(e)[:200]}"


def show(probe, result):
    print(f"| {probe} | {result} |", flush=True)


def fresh(name, steps=20, *extra):
    out = WORK / name
    r, _ = cli("train", *MICRO, "--steps", steps, "--eval_interval=5", *extra, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def main():
    print("| probe | now |\n|---|---|")
    # 1. kills and interrupted saves
    out = WORK / "kills"
    unloadable = leftovers_after_kill = leftovers_after_next_save = loaded = 0
    rng = random.Random(35)
    for i in range(35):
        had = checkpoint.exists(out)
        p = subprocess.Popen([sys.executable, "-m", "tinyfractal", "train", "--preset", "micro", "--steps", "400",
                              "--eval_interval=1", "--out", str(out), *(["--resume"] if had else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
        time.sleep(rng.uniform(0.5, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if p.returncode == 0:          # finished before the kill: start again
            shutil.rmtree(out)
            continue
        if any(checkpoint.TEMP_NAME.fullmatch(n) for n in os.listdir(out)):
            leftovers_after_kill += 1
        if checkpoint.exists(out):
            try:
                tf.load(out)
                loaded += 1
            except ValueError:
                unloadable += 1
    params, cfg, meta = tf.load(out)
    tf.save(out, params, cfg, meta, opt_state=checkpoint.load_optimizer(out))
    leftovers_after_next_save = sum(1 for n in os.listdir(out) if checkpoint.TEMP_NAME.fullmatch(n))
    show("35 random kill -9s of `train --preset micro --steps 400 --eval_interval=1` (resumed after each)",
         f"{unloadable} unloadable, {loaded} loaded; {leftovers_after_kill} kills left temporaries, "
         f"{leftovers_after_next_save} left after the next save")

    run = fresh("json")
    show("`tf.save(..., meta={'x': np.float32(1)})` into a good run",
         api(lambda: (tf.save(run, *tf.load(run)[:2], meta={"x": np.float32(1)}), tf.load(run)[2])[1]))
    show("`tf.save(..., meta={'x': object()})` into a good run",
         api(lambda: tf.save(run, *tf.load(run)[:2], meta={"x": object()})) + f"; the run still loads, with the "
         f"meta of the save before: {tf.load(run)[2]}")

    # 2. divergence and numbers
    good = fresh("diverge", 20, "--warmup=0")
    r, _ = cli("train", *MICRO, "--out", good, "--resume", "--lr=1e3")
    show("`--lr=1e3 --resume` on a good run", said(r))
    r, _ = cli("train", *MICRO, "--out", good, "--resume", "--allow-changes", "--lr=1e3", "--steps", "200",
               "--eval_interval=1")
    _, _, m = tf.load(good)
    show("`--lr=1e3 --resume --allow-changes --steps 200 --eval_interval=1` on it", said(r) +
         f"; checkpoint on disk: step {m['step']}, loads (finite)")
    for flag in ("--lr=nan", "--lr=inf", "--weight_decay=inf", "--grad_clip=nan", "--min_lr=nan",
                 "--level-weights=1,nan", "--eps=inf"):
        r, _ = cli("train", *MICRO, "--steps", "5", flag, "--out", WORK / "never")
        show(f"`train {flag}`", said(r))

    # 3. one owner per folder
    run = fresh("owner")
    r, _ = cli("train", *MICRO, "--steps", "5", "--out", run)
    show("`train --out DIR` on a folder holding a run", said(r))
    codes, bad = [], 0
    for k in range(10):
        d = WORK / f"pair{k}"
        a = subprocess.Popen([sys.executable, "-m", "tinyfractal", "train", *MICRO, "--steps", "40",
                              "--eval_interval=1", "--out", str(d)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        b = subprocess.Popen([sys.executable, "-m", "tinyfractal", "train", *MICRO, "--steps", "40",
                              "--eval_interval=1", "--out", str(d)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        codes.append(tuple(sorted((a.wait(), b.wait()))))
        try:
            tf.load(d)
        except ValueError:
            bad += 1
    show("two trainers on one new folder, 10 times", f"exit codes {sorted(set(codes))} (one trains, the other is "
         f"refused), {bad} of 10 folders unloadable")

    # 4. resume
    run = fresh("resume", 20, "--warmup=5")
    for flag in ("--lr=0.01", "--seed=1", "--batch_size=4", "--steps=40"):
        r, _ = cli("train", *MICRO, "--out", run, "--resume", flag)
        show(f"`--resume {flag}` on a 20-step run", said(r))
    straight = WORK / "straight"
    r, _ = cli("train", *MICRO, "--steps", "40", "--warmup=5", "--eval_interval=20", "--out", straight)
    cut = WORK / "cut"
    driver = ("import os, signal, sys\nimport tinyfractal.training.train as T\nfrom tinyfractal import cli\nreal = T.save_run\n"
              "def save_run(*a, **k):\n    real(*a, **k)\n    if a[4]['t'] == 20:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\nT.save_run = save_run\nsys.exit(cli.main(sys.argv[1:]))\n")
    args = ["train", *MICRO, "--steps", "40", "--warmup=5", "--eval_interval=20", "--out", str(cut)]
    subprocess.run([sys.executable, "-c", driver, *args], env=ENV, cwd=ROOT, capture_output=True)
    r, _ = cli(*args, "--resume")
    a, b = tf.load(straight)[0], tf.load(cut)[0]
    diff = max(float(np.abs(a_ - b_).max()) for a_, b_ in zip(flatten(a).values(), flatten(b).values()))
    same_meta = tf.load(straight)[2] == tf.load(cut)[2]
    show("`--warmup=5`: 40 steps killed after the step-20 checkpoint, resumed with the same command, vs 40 "
         "straight", f"max |Δparam| {diff}, metrics and settings equal: {same_meta}")
    r, _ = cli("train", *MICRO, "--out", cut, "--resume", "--extend-to", "60")
    show("`--resume --extend-to 60` on the finished 40-step run", f"exit {r.returncode}; recorded: "
         f"{json.dumps(tf.load(cut)[2]['metrics']['changes'])[:200]}")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    r, _ = cli("train", *MICRO, "--out", run, "--resume", "--steps", "10")
    show("`--resume --steps 10` on a 20-step checkpoint", said(r) + f"; folder unchanged: "
         f"{before == sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob('*'))}")
    r, _ = cli("train", *MICRO, "--out", run, "--resume")
    show("`--resume` on the finished 20-step run", f"exit {r.returncode}, stdout: {r.stdout.strip()}; folder "
         f"unchanged: {before == sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob('*'))}")

    # 5. late and raw errors
    (WORK / "afile").write_text("x")
    ro = WORK / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    for target in (WORK / "afile", ro, "/dev/null"):
        r, t = cli("train", *MICRO, "--steps", "5", "--out", target)
        show(f"`train --out {target.name if isinstance(target, Path) else target}`"
             + (" (read-only folder; running as root)" if target == ro and os.geteuid() == 0 else ""),
             said(r) + f" after {t:.1f} s")
    import test_reliability as T
    for kind in T.ODD:
        d = Path(tempfile.mkdtemp(dir=WORK))
        folder = T.odd_folder(d, kind)
        t0 = time.monotonic()
        res = api(lambda: T.within(30, lambda: tf.load(folder)))
        show(f"load with {kind}", f"{res} ({time.monotonic() - t0:.2f} s)")
    r, _ = cli("train", "--help", env={**ENV, "TINYFRACTAL_THREADS": "abc"})
    show("`TINYFRACTAL_THREADS=abc python -m tinyfractal` (left to the lead)", said(r))

    # 6. the API
    cfg = tf.Config.preset("micro")
    p = tf.init_params(cfg, 0)
    ids = np.zeros((1, 4), dtype=np.int64)
    show("`tf.forward` with a token id -1", api(lambda: tf.forward(p, cfg, ids - 1)))
    show("`tf.forward` with a token id 128 (= V)", api(lambda: tf.forward(p, cfg, ids + 128)))
    show("`tf.forward` with float ids", api(lambda: tf.forward(p, cfg, ids.astype(float))))
    show("`tf.tree_loss` with T = 0", api(lambda: tf.tree_loss(p, cfg, ids[:, :0], ids[:, :0])))
    long = np.zeros((1, cfg.context + 1), dtype=np.int64)
    show("`tf.tree_loss` with T = context + 1", api(lambda: tf.tree_loss(p, cfg, long, long)))
    other = tf.Config.preset("tiny")
    show("`tf.view(params of tiny, micro config, 1, 0)`", api(lambda: tf.view(tf.init_params(other, 0), cfg, 1, 0)))
    show("`tf.view(params, cfg, np.int64(1), np.int64(0))`",
         api(lambda: sorted(tf.view(p, cfg, np.int64(1), np.int64(0)))))
    for k, v in (("eps", float("inf")), ("rope_theta", float("inf")), ("vocab_size", 10 ** 12)):
        show(f"`Config(..., {k}={v})`", api(lambda: tf.Config(**{**tf.Config().to_dict(), k: v})))
    show("`Config.from_dict({})`", api(lambda: tf.Config.from_dict({})))
    nan_run = Path(tempfile.mkdtemp(dir=WORK))
    flat = {f"param/{k}": v.copy() for k, v in flatten(p).items()}
    flat["param/E"][0, 0] = np.nan
    T.crafted(nan_run, flat)
    r, _ = cli("eval", "--ckpt", nan_run / "crafted", "--batches", "1")
    show("`eval` of NaN weights with a valid checksum", said(r))
    tok = tf.Tokenizer.default()
    for t in (float("nan"), 1e-320):
        show(f"`tf.generate(..., temperature={t})`", api(lambda: tf.generate(p, cfg, tok, "a", temperature=t)))
    r, t = cli("train", "--preset", "micro", "--batch_size=100000000", "--out", WORK / "huge")
    show("`train --preset micro --batch_size=100000000`", said(r) + f" after {t:.1f} s")

    # 7. the tokenizer and permissions
    run = fresh("tok", 5)
    changed = T.other_tokenizer()
    show("`tf.load(run, tokenizer=<a BPE whose last merge differs>)`", api(lambda: tf.load(run, tokenizer=changed)))
    modes = sorted({oct(f.stat().st_mode & 0o777) for f in run.rglob("*") if f.is_file() and f.name != ".lock"})
    show("checkpoint file modes (umask " + oct(os.umask(0o022)) + ")", ", ".join(modes))
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
