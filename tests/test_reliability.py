"""Nothing lost and no silent wrong answers (issue 13): crash-safe checkpoints, odd files, the tokenizer
recorded in a checkpoint, finite settings, and the API refusing what it cannot do right.

Killing, locking and resuming real training runs are in test_kill.py and test_resume.py.
"""
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyfractal as tf
from strategies import BAD_TOKEN_KINDS, bad_token_arrays, configs, examples
from tinyfractal import api, cli, validate
from tinyfractal.training import checkpoint
from tinyfractal.training.checkpoint import _digest
from tinyfractal.config import Config
from tinyfractal.inference.sample import check_sampling
from tinyfractal.training.train import TrainConfig, adamw_init, save_run
from tinyfractal.core.tree import flatten

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_micro_run"


def micro(**changes):
    return Config.preset("micro").override(**changes)


def params_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinyfractal", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or ROOT)


def one_line_error(r, code=2):
    """The command failed with `code` and exactly one line on stderr, no traceback; returns that line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(folder):
    """{relative path: bytes or 'dir'} of everything in a folder, to show that nothing was written."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else p.read_bytes()
    return out


# Crash-safe layout: step folders, a pointer written last, old steps pruned after it.

def test_save_writes_step_folders_and_a_pointer_keeping_the_last_k(tmp_path):
    """Each save adds step-NNNNNN/ (params.npz + meta.json) and repoints checkpoint.json at it; only the
    newest `keep` step folders stay, and each one loads on its own (to roll back)."""
    cfg = micro()
    saved = {}
    for step in (2, 4, 6):
        p = tf.init_params(cfg, step)
        saved[step] = p
        where = tf.save(tmp_path / "run", p, cfg, {"step": step})
        assert where == tmp_path / "run" / f"step-{step:06d}"
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["checkpoint.json", "step-000004", "step-000006"]
    pointer = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert pointer["latest"] == "step-000006" and pointer["kept"] == ["step-000004", "step-000006"]
    assert params_equal(tf.load(tmp_path / "run")[0], saved[6])
    assert params_equal(tf.load(tmp_path / "run" / "step-000004")[0], saved[4])
    tf.save(tmp_path / "run", saved[6], cfg, {"step": 8}, keep=3)
    assert checkpoint.step_folders(tmp_path / "run") == ["step-000004", "step-000006", "step-000008"]
    tf.save(tmp_path / "run", saved[6], cfg, {"step": 8}, keep=1)     # the same step again gets a new name
    assert checkpoint.step_folders(tmp_path / "run") == ["step-000008-1"]
    with pytest.raises(ValueError, match="keep"):
        tf.save(tmp_path / "run", saved[6], cfg, {"step": 9}, keep=0)


def test_an_exception_between_the_two_writes_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that fails after its step folder is written but before checkpoint.json points at it (or
    halfway through the step folder's files, or while building the JSON) leaves the folder loading as
    the previous checkpoint, bit for bit; the next save cleans up what the failed one left."""
    cfg = micro()
    good, other = tf.init_params(cfg, 1), tf.init_params(cfg, 2)
    folder = tmp_path / "run"
    tf.save(folder, good, cfg, {"step": 1})

    def fail(*args, **kwargs):
        raise RuntimeError("injected between the step folder and the pointer")
    monkeypatch.setattr(checkpoint, "_write_pointer", fail)
    with pytest.raises(RuntimeError, match="injected"):
        tf.save(folder, other, cfg, {"step": 2})
    assert "step-000002" in os.listdir(folder)                 # written, but not pointed at
    assert params_equal(tf.load(folder)[0], good)
    monkeypatch.undo()

    calls = []
    real = checkpoint.write_new

    def fail_second(path, data, mode):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt   # as a Ctrl-C between params.npz and meta.json would
        real(path, data, mode)
    monkeypatch.setattr(checkpoint, "write_new", fail_second)
    with pytest.raises(KeyboardInterrupt):
        tf.save(folder, other, cfg, {"step": 3})
    monkeypatch.undo()
    assert not any(n.startswith(".step-000003") for n in os.listdir(folder))   # its temp folder is gone
    assert params_equal(tf.load(folder)[0], good)

    before = snapshot(folder)
    with pytest.raises(ValueError, match="JSON"):           # meta that is not JSON fails before any write
        tf.save(folder, other, cfg, {"step": 4, "bad": object()})
    assert snapshot(folder) == before
    tf.save(folder, other, cfg, {"step": 5, "x": np.float32(1.5), "n": np.int64(3)})   # NumPy scalars are fine
    assert tf.load(folder)[2] == {"step": 5, "x": 1.5, "n": 3}
    assert checkpoint.step_folders(folder) == ["step-000001", "step-000005"]       # the orphan step-2 is gone


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    """Hidden '.*.tmp' files and folders that a killed save left in the run folder go at the next save."""
    cfg = micro()
    folder = tmp_path / "run"
    tf.save(folder, tf.init_params(cfg, 0), cfg, {"step": 1})
    (folder / ".step-000002.abc123.tmp").mkdir()
    (folder / ".step-000002.abc123.tmp" / "params.npz").write_bytes(b"half")
    (folder / ".checkpoint.json.x1y2.tmp").write_text("{")
    (folder / "notes.txt").write_text("mine")                  # not ours: stays
    tf.save(folder, tf.init_params(cfg, 0), cfg, {"step": 2})
    assert sorted(os.listdir(folder)) == ["checkpoint.json", "notes.txt", "step-000001", "step-000002"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_files_get_the_usual_permissions(tmp_path, umask):
    """Checkpoint files are created 0666 and folders 0777, minus the umask (as open() and mkdir do), not
    with mkstemp's private 0600."""
    cfg = micro()
    old = os.umask(umask)
    try:
        step = tf.save(tmp_path / "run", tf.init_params(cfg, 0), cfg, {"step": 1})
    finally:
        os.umask(old)
    for f in (step / "params.npz", step / "meta.json", tmp_path / "run" / "checkpoint.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(step.stat().st_mode) == 0o777 & ~umask


def test_save_refuses_what_it_could_not_load_before_writing(tmp_path):
    """Non-finite or non-float32 arrays, or arrays of another config, are refused before anything is
    written (so a bad save can never push a good checkpoint out of the kept ones)."""
    cfg = micro()
    p = tf.init_params(cfg, 0)
    folder = tmp_path / "run"
    tf.save(folder, p, cfg, {"step": 1})
    before = snapshot(folder)
    nan = tf.init_params(cfg, 0)
    nan["layers"][0]["Wq"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        tf.save(folder, nan, cfg, {"step": 2})
    f64 = tf.init_params(cfg, 0)
    f64["E"] = f64["E"].astype(np.float64)
    with pytest.raises(ValueError, match="float32"):
        tf.save(folder, f64, cfg, {"step": 2})
    with pytest.raises(ValueError, match="shape"):
        tf.save(folder, tf.init_params(micro(hidden=32), 0), cfg, {"step": 2})
    state = adamw_init(p)
    state["v"]["E"][0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        tf.save(folder, p, cfg, {"step": 2}, opt_state=state)
    assert snapshot(folder) == before


# Checkpoints written before this layout.

def test_a_checkpoint_written_before_this_change_still_loads(tmp_path):
    """tests/fixtures/legacy_micro_run was written by the code before step folders existed (`python -m
    tinyfractal train --preset micro --steps 2 --eval_interval=2 --eval_batches=1 --batch_size=2
    --log_interval=1` at commit 3367b1d): params.npz and meta.json side by side, files mode 0600. It loads
    with its optimizer state, evaluates from the command line, and can be resumed; resuming adopts it as
    a step folder, kept for rolling back."""
    params, cfg, meta = tf.load(FIXTURE)
    # written before the nesting-tax options: it was trained with the prototype's output and init
    assert cfg == PROTOTYPE_MICRO and meta["step"] == 2 and meta["train"]["steps"] == 2
    assert checkpoint.load_optimizer(FIXTURE)["t"] == 2
    r = run_cli("eval", "--ckpt", FIXTURE, "--batches", "1", "--json")
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"0.0", "1.0", "1.1"}, r.stderr
    run = tmp_path / "legacy"
    shutil.copytree(FIXTURE, run)
    r = run_cli("train", "--out", run, "--resume")
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [f"{run} is a finished run of 2 steps; nothing to "
                                                                   f"do (give --extend-to N to train it further)"]
    r = run_cli("train", "--out", run, "--resume", "--extend-to", "4")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(run)) == ["checkpoint.json", "metrics.json", "step-000002", "step-000004"]
    assert params_equal(tf.load(run / "step-000002")[0], params)
    _, _, meta4 = tf.load(run)
    assert meta4["step"] == 4 and meta4["metrics"]["changes"][0]["changed"] == {"steps": [2, 4]}


# The micro preset as every checkpoint written before the nesting-tax options was trained: no logit scale,
# the root's init (written out here, not taken from Config.faithful).
PROTOTYPE_MICRO = Config.preset("micro").override(logit_scale="none", nested_init=False, node_gains=False)


def test_old_checkpoints_without_later_config_fields_load_with_what_they_meant(tmp_path):
    """A meta.json from before the coupling, tokenizer and output/init fields existed loads as an
    uncoupled BPE model with the prototype's output and init (explicitly, in the checkpoint loader);
    Config.from_dict itself refuses missing fields."""
    run = tmp_path / "older"
    shutil.copytree(FIXTURE, run)
    info = json.loads((run / "meta.json").read_text())
    for k in ("coupling", "coupling_cumulative", "coupling_sublayer", "coupling_scale_init", "tokenizer"):
        del info["config"][k]
    info["meta_sha256"] = _digest(info)
    (run / "meta.json").write_text(json.dumps(info))
    _, cfg, _ = tf.load(run)
    assert cfg == PROTOTYPE_MICRO
    with pytest.raises(ValueError, match="missing fields"):
        Config.from_dict(info["config"])
    with pytest.raises(ValueError, match="missing fields"):
        Config.from_dict({})


# Odd files in a checkpoint folder: ValueErrors, never a traceback or a hang.

def crafted(tmp_path, arrays, cfg=None, npz=None):
    """A step folder whose meta.json has valid checksums for the given npz bytes (as an attacker or a
    buggy tool could write it)."""
    cfg = cfg or micro()
    folder = tmp_path / "crafted"
    folder.mkdir()
    if npz is None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        npz = buf.getvalue()
    (folder / "params.npz").write_bytes(npz)
    import hashlib
    info = {"format": checkpoint.FORMAT, "version": 1, "config": cfg.to_dict(), "meta": {},
            "sha256": hashlib.sha256(npz).hexdigest(), "optimizer_step": None}
    info["meta_sha256"] = _digest(info)
    (folder / "meta.json").write_text(json.dumps(info))
    return folder


def npy_member(name, header_shape, payload=b"", dtype="<f4"):
    """One .npy member whose header claims any shape, followed by whatever payload."""
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    text = repr(header).encode("latin1")
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return name, b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def zip_of(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def odd_folder(tmp_path, kind):
    """A checkpoint folder with one odd thing in it."""
    cfg = micro()
    folder = tmp_path / "run"
    step = tf.save(folder, tf.init_params(cfg, 0), cfg, {"step": 1})
    flat = {f"param/{k}": v for k, v in flatten(tf.init_params(cfg, 0)).items()}
    if kind == "meta.json is a directory":
        (step / "meta.json").unlink()
        (step / "meta.json").mkdir()
    elif kind == "params.npz is a directory":
        (step / "params.npz").unlink()
        (step / "params.npz").mkdir()
    elif kind == "params.npz is a FIFO":
        (step / "params.npz").unlink()
        os.mkfifo(step / "params.npz")
    elif kind == "meta.json is a FIFO":
        (step / "meta.json").unlink()
        os.mkfifo(step / "meta.json")
    elif kind == "checkpoint.json is a FIFO":
        (folder / "checkpoint.json").unlink()
        os.mkfifo(folder / "checkpoint.json")
    elif kind == "meta.json is a symlink loop":
        (step / "meta.json").unlink()
        os.symlink(step / "loop-a", step / "loop-b")
        os.symlink(step / "loop-b", step / "loop-a")
        os.symlink(step / "loop-a", step / "meta.json")
    elif kind == "checkpoint.json is a symlink loop":
        (folder / "checkpoint.json").unlink()
        os.symlink(folder / "checkpoint.json", folder / "checkpoint.json")
    elif kind == "the run folder is a symlink loop":
        shutil.rmtree(folder)
        os.symlink(folder, folder)
    elif kind == "deeply nested meta.json":
        (step / "meta.json").write_text("[" * 100000 + "]" * 100000)
    elif kind == "deeply nested checkpoint.json":
        (folder / "checkpoint.json").write_text('{"a":' * 100000 + "1" + "}" * 100000)
    elif kind == "npz header claims a 40 GiB array":
        big = dict(flat)
        del big["param/E"]
        members = [(f"{k}.npy", None) for k in big]
        buf = io.BytesIO()
        np.savez(buf, **big)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
            members = [(n, z.read(n)) for n in z.namelist()]
        members.append(npy_member("param/E.npy", (10 * 2 ** 30,), b"\0" * 64))
        return crafted(tmp_path, None, npz=zip_of(members))
    elif kind == "npz member holds a pickled object array":
        members = [npy_member("param/E.npy", (1,), b"\x80\x04N.", dtype="|O")]
        return crafted(tmp_path, None, npz=zip_of(members))
    elif kind == "npz member is compressed to a bomb":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("param/E.npy", npy_member("x", (2 ** 24,))[1] + b"\0" * (2 ** 26))   # 64 MiB in ~64 KB
        return crafted(tmp_path, None, npz=buf.getvalue())
    elif kind == "pointer names a folder outside":
        (folder / "checkpoint.json").write_text(json.dumps({"format": "tinyfractal-run", "version": 1,
                                                            "latest": "../../etc", "kept": ["../../etc"]}))
    elif kind == "pointer names a missing step":
        shutil.rmtree(step)
    elif kind == "params.npz is huge":
        with open(step / "params.npz", "wb") as f:
            f.truncate(10 * 2 ** 30)      # sparse: takes no disk, but claims 10 GiB
    else:
        raise AssertionError(kind)
    return folder


ODD = ["meta.json is a directory", "params.npz is a directory", "params.npz is a FIFO", "meta.json is a FIFO",
       "checkpoint.json is a FIFO", "meta.json is a symlink loop", "checkpoint.json is a symlink loop",
       "the run folder is a symlink loop", "deeply nested meta.json", "deeply nested checkpoint.json",
       "npz header claims a 40 GiB array", "npz member holds a pickled object array", "npz member is compressed to a bomb",
       "pointer names a folder outside", "pointer names a missing step", "params.npz is huge"]


def within(seconds, fn):
    """fn() in a daemon thread: its result, or its exception raised here; a hang fails the test."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the caller
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.parametrize("kind", ODD)
def test_odd_files_in_a_checkpoint_folder_are_value_errors(tmp_path, kind, capsys):
    """Directories, FIFOs, symlink loops, deeply nested JSON, npz headers claiming huge arrays, pickles and
    zip bombs where checkpoint files should be are refused with a ValueError: never a traceback
    (RecursionError, MemoryError, OSError) and never a hang (a FIFO is never opened for reading); `eval`
    says so in one line with exit 2."""
    folder = odd_folder(tmp_path, kind)
    with pytest.raises(ValueError):
        within(30, lambda: tf.load(folder))
    assert within(30, lambda: cli.main(["eval", "--ckpt", str(folder)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


# Non-finite weights and the tokenizer.

def test_non_finite_weights_with_valid_checksums_are_refused(tmp_path):
    """A checkpoint whose arrays hold nan (with checksums that match, so only the values are wrong) is
    refused by load, and `eval` exits 2 with one line instead of printing nan with exit 0."""
    cfg = micro()
    flat = {f"param/{k}": v for k, v in flatten(tf.init_params(cfg, 0)).items()}
    flat["param/layers.0.Wv"] = flat["param/layers.0.Wv"].copy()
    flat["param/layers.0.Wv"][1, 0, 2] = np.nan
    folder = crafted(tmp_path, flat)
    with pytest.raises(ValueError, match="non-finite"):
        tf.load(folder)
    assert "non-finite" in one_line_error(run_cli("eval", "--ckpt", folder, "--batches", "1"))


def other_tokenizer():
    """A 128-token BPE that differs from the shipped one in its last merge."""
    tok = tf.Tokenizer.default()
    a, b = tok.merges[-1]
    pair = next((x, y) for x in range(65) for y in range(65) if (x, y) not in set(map(tuple, tok.merges))
                and tok.token_strings[x].isalpha() and tok.token_strings[y].isalpha())
    return tf.Tokenizer(tok.chars, [list(m) for m in tok.merges[:-1]] + [list(pair)])


def test_a_checkpoint_refuses_another_tokenizer(tmp_path, monkeypatch, capsys):
    """The checkpoint records its tokenizer (kind, and the SHA-256 of tokenizer.json); loading, evaluating
    or sampling with another one is a clear error naming the tokenizer, and a byte model refuses a BPE."""
    cfg = micro()
    p = tf.init_params(cfg, 0)
    save_run(tmp_path / "run", p, cfg, TrainConfig(steps=1), adamw_init(p), {"step": [], "loss": [],
             "eval_step": [], "train": {}, "val": {}})
    info = json.loads((checkpoint.resolve(tmp_path / "run") / "meta.json").read_text())
    assert info["tokenizer"]["kind"] == "bpe" and len(info["tokenizer"]["sha256"]) == 64
    tf.load(tmp_path / "run", tokenizer=tf.Tokenizer.default())
    other = other_tokenizer()
    assert other.vocab_size == 128
    with pytest.raises(ValueError, match="tokenizer"):
        tf.load(tmp_path / "run", tokenizer=other)
    path = tmp_path / "changed.json"
    other.save(path)
    from tinyfractal.text import bpe as tokenizer_module
    monkeypatch.setattr(tokenizer_module, "DEFAULT_PATH", path)     # as if tokenizer/tokenizer.json changed
    for argv in (["eval", "--ckpt", str(tmp_path / "run"), "--batches", "1"],
                 ["sample", "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "2"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tokenizer" in err
    byte_cfg = micro(tokenizer="bytes")
    q = tf.init_params(byte_cfg, 0)
    tf.save(tmp_path / "bytes", q, byte_cfg, {"step": 1})
    with pytest.raises(ValueError, match="'bytes' tokenizer"):
        tf.load(tmp_path / "bytes", tokenizer=tf.Tokenizer.default())


# Every numeric setting finite and in range.

@pytest.mark.parametrize("field, value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", -1e-3), ("min_lr", math.nan), ("weight_decay", math.inf),
    ("grad_clip", math.nan), ("beta1", math.nan), ("beta2", 1.0), ("steps", 0), ("steps", 10 ** 12),
    ("batch_size", True), ("warmup", -1), ("seed", -1), ("min_lr", 1.0), ("steps", 2.5)])
def test_training_settings_must_be_finite_and_in_range(field, value):
    """Every training setting is validated when made: NaN and inf are refused (not let through by `v < 0`),
    integers must be whole and in range, and min_lr may not exceed lr."""
    with pytest.raises(ValueError, match=field):
        TrainConfig().override(**{field: value}) if field != "batch_size" else TrainConfig(batch_size=value)


@pytest.mark.parametrize("override, words", [
    ("--lr=nan", "lr"), ("--lr=inf", "lr"), ("--weight_decay=inf", "weight_decay"), ("--grad_clip=nan", "grad_clip"),
    ("--min_lr=nan", "min_lr"), ("--level-weights=1,nan", "level-weights"), ("--eps=inf", "eps"),
    ("--rope_theta=inf", "rope_theta"), ("--vocab_size=1000000000000", "vocab_size"), ("--eps=2", "eps"),
    ("--batch_size=100000000", "batch_size")])
def test_bad_numbers_are_refused_at_parse_time(tmp_path, override, words):
    """A non-finite or absurd number on the command line is one line on stderr and exit 2, before any
    training starts and before --out is created (a batch that cannot fit in memory included)."""
    out = tmp_path / "never"
    r = run_cli("train", "--preset", "micro", "--out", out, override)
    assert words in one_line_error(r) and not out.exists() and "step" not in r.stdout


@pytest.mark.parametrize("changes, words", [
    (dict(eps=math.inf), "eps"), (dict(eps=math.nan), "eps"), (dict(rope_theta=math.inf), "rope_theta"),
    (dict(vocab_size=10 ** 12), "vocab_size"), (dict(hidden=2 ** 30), "hidden"),
    (dict(vocab_size=2 ** 22, hidden=2 ** 10), "parameters")])
def test_config_refuses_non_finite_values_and_absurd_sizes(changes, words):
    """Config refuses eps or rope_theta that are not finite, and sizes no CPU engine can hold (a field above
    2**24, or more than 2**31 parameters), naming the field."""
    with pytest.raises(ValueError, match=words):
        Config(**{**Config().to_dict(), **changes})


@examples(40)
@given(configs())
def test_parameter_count_formula_equals_the_arrays(cfg):
    """config.parameter_count (used to refuse absurd configs before any array exists) and the shapes that
    view and checkpoints check against (api.expected_shapes) agree with the arrays init_params
    really builds, for base, coupled and byte models."""
    for c in (cfg, cfg.override(coupling="upstream"), cfg.override(tokenizer="bytes"), cfg.faithful(),
              cfg.override(logit_scale="sqrt", node_gains=False)):
        arrays = flatten(tf.init_params(c, 0))
        assert api.expected_shapes(c) == {k: a.shape for k, a in arrays.items()}
        assert tf.config.parameter_count(c) == sum(a.size for a in arrays.values())


# The API refuses what it cannot do right.

@examples(60)
@given(st.data())
def test_bad_token_arrays_are_value_errors_naming_what_is_wrong(data):
    """Token arrays: ids that are negative, >= vocab_size, floats or bools, not of rank 2, with an empty axis,
    or longer than the context are refused by forward, forward_level, tree_loss, node_losses and
    tree_loss_reference with a ValueError naming the offending value or shape: never a silent wrap-around
    (a negative id would index the last embedding row), an IndexError, or a nan loss."""
    cfg = data.draw(configs(max_nodes=7))
    ids, kind = data.draw(bad_token_arrays(cfg))
    good = np.zeros((1, 1), dtype=np.int64)
    params = tf.init_params(cfg, 0)
    calls = [lambda: tf.forward(params, cfg, ids), lambda: tf.forward_level(params, cfg, 0, ids),
             lambda: tf.tree_loss(params, cfg, ids, ids), lambda: tf.node_losses(params, cfg, good, ids),
             lambda: tf.tree_loss_reference(params, cfg, ids, ids)]
    flat = np.asarray(ids).reshape(-1)
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        if kind == "negative":
            assert str(int(flat.min())) in msg and "[0," in msg
        elif kind == "too_large":
            assert str(int(flat.max())) in msg and f"{cfg.vocab_size})" in msg
        elif kind in ("float", "bool"):
            assert str(np.asarray(ids).dtype) in msg
        elif kind == "too_long":
            assert f"context = {cfg.context}" in msg
        else:
            assert str(np.asarray(ids).shape) in msg


@examples(30)
@given(st.data())
def test_valid_token_arrays_pass_the_check_unchanged(data):
    """check_ids accepts every integer array of shape (B, T), 1 <= T <= context, with values in [0, V),
    whatever its integer dtype, and hands back the same values."""
    cfg = data.draw(configs(max_nodes=7))
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, cfg.context))
    dtype = data.draw(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64]))
    ids = np.array(data.draw(st.lists(st.integers(0, min(cfg.vocab_size - 1, 127)), min_size=B * T,
                                      max_size=B * T)), dtype=dtype).reshape(B, T)
    out = validate.check_ids(cfg, ids)
    assert out.shape == (B, T) and np.array_equal(out, ids)
    assert validate.check_ids(cfg, ids.tolist()).tolist() == ids.tolist()


@pytest.mark.parametrize("kind", ["rank", "too_large", "negative", "float"])
def test_byte_models_check_their_groups_too(kind):
    """A byte model reads (B, T, g) groups of byte values in [0, 256): other shapes and values are
    ValueErrors naming the offending value or shape, for the whole model and for one level (whose
    groups are g_level bytes long: single bytes at the leaves)."""
    cfg = micro(tokenizer="bytes")
    params = tf.init_params(cfg, 0)
    groups = np.zeros((2, cfg.context, 2), dtype=np.int64)
    bad = {"rank": groups[:, :, 0], "too_large": groups + 256, "negative": groups - 1,
           "float": groups.astype(float)}[kind]
    words = {"rank": r"\(B, T, 2\)", "too_large": r"256 at \(0, 0, 0\)", "negative": r"-1 at \(0, 0, 0\)",
             "float": "float64"}[kind]
    for call in (lambda: tf.tree_loss(params, cfg, bad, groups), lambda: tf.forward(params, cfg, bad)):
        with pytest.raises(ValueError, match=words):
            call()
    assert np.isfinite(float(tf.tree_loss(params, cfg, groups, groups)))
    with pytest.raises(ValueError, match=r"\(B, T, 1\)"):
        tf.forward_level(params, cfg, 1, groups)
    assert tf.forward_level(params, cfg, 1, groups[:, :, :1]).shape == (2, 2, cfg.context, 1, 256)


def test_view_refuses_the_params_of_another_config():
    """view (and level_view, forward_level) check that the arrays have this config's shapes: params of
    another config are a ValueError naming the array, not a wrong model cut into wrong blocks."""
    cfg, other = micro(), micro(hidden=32, head_dim=16)
    p = tf.init_params(other, 0)
    for call in (lambda: tf.view(p, cfg, 1, 0), lambda: tf.level_view(p, cfg, 1),
                 lambda: tf.forward_level(p, cfg, 1, np.zeros((1, 2), int))):
        with pytest.raises(ValueError, match="E has shape"):
            call()
    two_layers = tf.init_params(micro(layers=2), 0)
    with pytest.raises(ValueError, match="params have 2 layers but the config has layers=1"):
        tf.view(two_layers, cfg, 1, 0)
    del p["out_norm"]
    with pytest.raises(ValueError, match="missing"):
        tf.view(p, other, 0, 0)


def test_numpy_integer_levels_and_indices_are_accepted():
    """np.int64 (and other NumPy integer) levels and indices work like Python ints in view, sub, nodes'
    checks and generate; bools and floats are refused."""
    cfg = micro()
    p = tf.init_params(cfg, 0)
    for a, b in ((np.int64(1), np.int32(1)), (np.uint8(1), np.int16(0))):
        assert params_equal(tf.view(p, cfg, a, b), tf.view(p, cfg, int(a), int(b)))
        assert cfg.sub(a) == cfg.sub(int(a)) and cfg.check_node(a, b) == (int(a), int(b))
        assert type(cfg.check_node(a, b)[0]) is int
    tok = tf.Tokenizer.default()
    assert tf.generate(p, cfg, tok, "ab", np.int64(1), np.int64(1), max_new_tokens=np.int64(3), temperature=0) == \
        tf.generate(p, cfg, tok, "ab", 1, 1, max_new_tokens=3, temperature=0)
    for bad in (True, 1.0, np.float64(1.0)):
        with pytest.raises(ValueError, match="out of range"):
            cfg.check_level(bad)
    with pytest.raises(ValueError, match="level 5 is out of range"):
        cfg.check_level(np.int64(5))         # the message shows 5, not np.int64(5)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0, 1e-320, 1e-9, "0.5", None])
def test_sampling_validates_temperature(temperature):
    """temperature must be 0 (greedy) or a finite number >= 1e-6: NaN, inf, negative and denormal values
    (which overflow logits / temperature to inf, and its softmax to nan) are ValueErrors up front."""
    with pytest.raises(ValueError, match="temperature"):
        check_sampling(temperature, None, None)
    cfg = micro()
    with pytest.raises(ValueError, match="temperature"):
        tf.generate(tf.init_params(cfg, 0), cfg, tf.Tokenizer.default(), "a", temperature=temperature)


def test_sampling_accepts_numpy_scalars_and_refuses_nan_on_the_command_line(tmp_path):
    """np.float32 temperatures and np.int64 top_k work; `sample --temperature nan` is one line and exit 2."""
    check_sampling(np.float32(0.7), np.int64(5), np.float64(0.9), np.int64(3))
    cfg = micro()
    tf.save(tmp_path / "run", tf.init_params(cfg, 0), cfg, {"step": 1})
    for t in ("nan", "1e-320", "inf"):
        assert "temperature" in one_line_error(run_cli("sample", "--ckpt", tmp_path / "run", "--temperature", t))
        break   # one child process shows the whole path; the others run in-process below
    for t in ("1e-320", "inf"):
        assert cli.main(["sample", "--ckpt", str(tmp_path / "run"), "--temperature", t]) == 2


def test_generate_refuses_a_tokenizer_of_another_size():
    """A token model's prompt must come from a tokenizer of its vocabulary size (else ids would be out of
    range or mean other text)."""
    cfg = micro(vocab_size=64)
    with pytest.raises(ValueError, match="reads 64"):
        tf.generate(tf.init_params(cfg, 0), cfg, tf.Tokenizer.default(), "a", max_new_tokens=1)


# Memory of a step, estimated up front.

def test_an_impossible_batch_is_refused_up_front():
    """check_memory refuses a batch whose lower-bound estimate exceeds the machine's memory, naming a
    batch size that fits; the estimate grows linearly with the batch and lies between the arrays it
    counts and a generous multiple of them."""
    cfg = Config.preset("micro")
    limit = 8 * 2 ** 30
    with pytest.raises(ValueError, match="batch_size=100000000 needs at least"):
        validate.check_memory(cfg, 10 ** 8, limit=limit)
    assert validate.check_memory(cfg, 16, limit=limit) < limit
    a1, a2 = validate.activation_floats(cfg, 1), validate.activation_floats(cfg, 2)
    assert a2 == 2 * a1
    # micro, per token: levels 0 and 1; per layer 2D + (H+2K)hd + H hd + 2F + N H T/2; logits 2 N V
    D, H, K, hd, F, V, T = 16, 2, 1, 8, 32, 128, 16
    expected = T * sum(1 * (2 * D + (H + 2 * K) * hd + H * hd + 2 * F + N * H * T // 2) + 2 * N * V for N in (1, 2))
    assert a1 == expected


@pytest.mark.parametrize("preset, changes, B", [("micro", {}, 64), ("sierpinski", {}, 4),
                                                 ("micro", {"tokenizer": "bytes"}, 16)])
def test_the_memory_estimate_is_a_lower_bound_of_a_real_step(preset, changes, B):
    """The NumPy memory a training step really holds at its peak (measured with tracemalloc, which sees
    every NumPy array) is at least the estimate's activation memory, so a batch that the estimate
    refuses could never have run."""
    import tracemalloc
    from autograd import value_and_grad
    cfg = Config.preset(preset).override(**changes)
    p = tf.init_params(cfg, 0)
    shape = (B, cfg.context) + ((2,) if cfg.tokenizer == "bytes" else ())
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, shape)
    step = value_and_grad(lambda q: tf.tree_loss(q, cfg, ids, ids))
    step(p)                                             # caches (RoPE tables, ...) are not the step's
    tracemalloc.start()
    try:
        step(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = validate.FLOAT * validate.activation_floats(cfg, B)
    assert peak >= estimate > 0, (peak, estimate)


def test_eval_and_sample_use_the_checkpoints_own_tokenizer(tmp_path, capsys):
    """eval and sample read a checkpoint with its variant's tokenizer: a byte model samples bytes (it is
    not handed the 128-token BPE), and its recorded tokenizer kind is checked."""
    cfg = micro(tokenizer="bytes")
    p = tf.init_params(cfg, 0)
    save_run(tmp_path / "bytes", p, cfg, TrainConfig(steps=1), adamw_init(p),
             {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}})
    assert cli.main(["sample", "--ckpt", str(tmp_path / "bytes"), "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert cli.main(["eval", "--ckpt", str(tmp_path / "bytes"), "--batches", "1", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"0.0", "1.0", "1.1"}
