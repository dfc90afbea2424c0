"""Checkpoints that survive a kill at any instant: numbered step folders and a pointer written last.

What `save(DIR, ...)` leaves on disk:

    DIR/checkpoint.json          which step is current and which are kept; replaced atomically, last
    DIR/step-000020/             the previous checkpoint, kept to roll back to (keep=2 keeps two)
    DIR/step-000040/params.npz   the arrays: param/<name>, and adam_m/<name>, adam_v/<name> if given
    DIR/step-000040/meta.json    config, meta (step, metrics, ...), tokenizer, the SHA-256 of params.npz
                                 and of its own content

Why nothing is lost: a new step is written into a hidden temporary folder (.step-000040.XXXX.tmp),
every file fsynced, and only then renamed to step-000040, so a folder with a step name is always
complete. Then checkpoint.json is replaced (temp file + os.replace) to point at it, and only after
that are the steps beyond `keep` deleted. A kill at any instant leaves checkpoint.json naming a
complete step: the previous checkpoint or the new one, never neither. Temporaries of a killed save
are removed by the next save. A save holds the folder's lock (runlock.py), so two processes never
write one folder at once.

Each step folder is a checkpoint in the original one-folder format (params.npz beside meta.json),
so `load` takes a run folder (it follows checkpoint.json), a step folder (to roll back:
load('DIR/step-000020')), or a folder written before this layout existed. Saving into such an old
folder first adopts its checkpoint as a step folder, so it counts as one of the kept ones.

Reading is defensive, and every problem is a ValueError naming the file: only regular files are
opened (a FIFO is never opened for reading; directories, devices and symlink loops are refused),
sizes are bounded by what the config's arrays can take, each array's header is checked before
anything is allocated, deeply nested JSON is refused, and nothing is ever unpickled. Non-finite
weights are refused on save and on load. Files are created with the usual permissions (0666 minus
the umask, as open() would), not mkstemp's 0600.
"""
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as onp

from tinyfractal import runlock
from tinyfractal.config import FAITHFUL, Config
from tinyfractal.files import (atomic_write_bytes, atomic_write_json, fsync_dir, json_text, umask,  # noqa: F401
                               write_new)  # (atomic_write_*: re-exported for the lessons and tools)
from tinyfractal.core.tree import flatten, unflatten
from tinyfractal.api import check_params, expected_shapes

FORMAT = "tinyfractal-checkpoint"
VERSION = 1
RUN_FORMAT = "tinyfractal-run"
RUN_VERSION = 1
POINTER = "checkpoint.json"
STEP_NAME = re.compile(r"step-(\d{6,})(?:-(\d+))?")
TEMP_NAME = re.compile(r"\..+\.tmp")
MAX_JSON = 256 << 20     # meta.json with a long metrics history is a few MB; the pointer is tiny
MAX_POINTER = 1 << 20

# Config fields added after checkpoints of version 1 were first written, with the value that every
# checkpoint written before the field existed was trained with (no coupling, the BPE tokenizer, and
# the prototype's output and init: config.FAITHFUL, whatever today's defaults are).
LATER_FIELDS = {"coupling": "none", "coupling_cumulative": False, "coupling_sublayer": False,
                "coupling_scale_init": 1.0, "tokenizer": "bpe", **FAITHFUL}


# Checking what is written.

def _plain_json(meta):
    """meta as plain JSON values (NumPy scalars become numbers), or a ValueError naming what is not."""
    def plain(v):
        if isinstance(v, (onp.integer, onp.floating, onp.bool_)):
            return v.item()
        raise TypeError(f"{type(v).__name__} is not a JSON value")
    try:
        return json.loads(json.dumps(meta, default=plain, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"meta must hold only JSON values (dicts, lists, strings, finite numbers, "
                         f"bools, None): {e}") from None


# The tokenizer a checkpoint was trained with.

def tokenizer_record(cfg, tokenizer=None):
    """{'kind': 'bytes'} for byte models; {'kind': 'bpe', 'sha256': hash of its tokenizer.json text}
    for a BPE tokenizer; sha256 None when no tokenizer was given (then nothing can be compared)."""
    if cfg.tokenizer == "bytes":
        return {"kind": "bytes"}
    if tokenizer is None:
        return {"kind": "bpe", "sha256": None}
    if not hasattr(tokenizer, "to_json"):
        raise ValueError(f"a {cfg.tokenizer!r} model needs a BPE Tokenizer, got {type(tokenizer).__name__}")
    return {"kind": "bpe", "sha256": hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest(),
            "vocab_size": int(tokenizer.vocab_size)}


def check_tokenizer(info, tokenizer, where):
    """Raise ValueError if `tokenizer` is not the one the checkpoint records (when it records one)."""
    saved = info.get("tokenizer")
    if not isinstance(saved, dict):
        return   # written before checkpoints recorded their tokenizer: nothing to compare with
    given = ({"kind": "bpe", "sha256": hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()}
             if hasattr(tokenizer, "to_json") else {"kind": "bytes"})
    if saved.get("kind") != given["kind"]:
        raise ValueError(f"{where} was trained with the {saved.get('kind')!r} tokenizer, not {given['kind']!r}")
    if given["kind"] == "bpe" and saved.get("sha256") and saved["sha256"] != given["sha256"]:
        raise ValueError(f"{where} was trained with a BPE tokenizer whose tokenizer.json has SHA-256 "
                         f"{saved['sha256'][:12]}..., but the tokenizer here has {given['sha256'][:12]}... "
                         f"(was tokenizer/tokenizer.json changed?); its ids would mean other text")


# Saving.

def _check_finite(flat, where):
    for k, a in flat.items():
        if not onp.isfinite(a).all():
            bad = int(onp.size(a) - onp.count_nonzero(onp.isfinite(a)))
            raise ValueError(f"{where}: array {k} holds {bad} non-finite values (nan or inf); a diverged "
                             f"model is not a checkpoint")


def _check_float32(flat, where):
    for k, a in flat.items():
        if a.dtype != onp.float32:
            raise ValueError(f"{where}: array {k} is {a.dtype}; checkpoints hold float32 (convert with "
                             f".astype(numpy.float32))")


def _step_of(meta, opt_state):
    step = meta.get("step") if isinstance(meta, dict) else None
    if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 10 ** 12:
        return step
    return int(opt_state["t"]) if opt_state is not None else 0


def save(path, params, cfg, meta=None, opt_state=None, tokenizer=None, keep=2, new_run=False):
    """Write a checkpoint into folder `path` as a new step folder; returns the step folder's path.

    `meta` is any JSON-able dict (step, metrics, ...); meta['step'] (else the optimizer's step)
    names the folder. `tokenizer` is recorded (see tokenizer_record). `keep` (>= 1) is how many
    step folders stay; older ones are deleted once the new one is in place. `new_run` starts the
    history afresh: every earlier step of the folder is deleted once this one is in place.
    Everything that can be checked (shapes, float32, finite values, JSON) is checked before
    anything is written.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (how many checkpoints stay in the folder) must be an integer >= 1, got {keep!r}")
    check_params(params, cfg)
    arrays = {f"param/{k}": onp.ascontiguousarray(v) for k, v in flatten(params).items()}
    if opt_state is not None:
        for part in ("m", "v"):
            _check_shapes(opt_state[part], cfg, f"optimizer state {part}")
            arrays.update({f"adam_{part}/{k}": onp.asarray(a) for k, a in opt_state[part].items()})
    _check_float32(arrays, "save")
    _check_finite(arrays, "save")
    buf = io.BytesIO()
    onp.savez(buf, **arrays)
    data = buf.getvalue()
    meta = _plain_json(meta or {})
    info = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "meta": meta,
            "sha256": hashlib.sha256(data).hexdigest(),
            "optimizer_step": None if opt_state is None else int(opt_state["t"]),
            "tokenizer": tokenizer_record(cfg, tokenizer)}
    info["meta_sha256"] = _digest(info)
    text = json_text(info).encode("utf-8")
    folder = Path(path)
    try:
        with runlock.hold(folder):
            return _publish(folder, _step_of(meta, opt_state), data, text, keep, new_run)
    except OSError as e:
        raise ValueError(f"cannot write the checkpoint in {str(folder)!r}: {e.strerror or e}") from None


def _publish(folder, step, data, text, keep, new_run):
    """Under the folder's lock: clean up, write the step folder, repoint, prune."""
    clean_temporaries(folder)
    pointer = _read_pointer(folder) if _present(folder / POINTER) else None
    if pointer is None and not new_run and _present(folder / "meta.json"):
        pointer = _adopt_flat(folder)
    referenced = [] if pointer is None else [n for n in pointer["kept"] if (folder / n).is_dir()]
    _prune(folder, referenced, old_layout=False)   # step folders of killed saves: nothing points at them
    kept = [] if new_run else referenced
    name = _fresh_name(folder, step)
    _write_step(folder, name, {"params.npz": data, "meta.json": text})
    kept = (kept + [name])[-keep:]
    _write_pointer(folder, name, kept)
    _prune(folder, kept)
    return folder / name


def _fresh_name(folder, step):
    """step-000040, or step-000040-1, -2, ... if a kept folder already has that step's name."""
    name, suffix = f"step-{step:06d}", 0
    while os.path.lexists(folder / name):
        suffix += 1
        name = f"step-{step:06d}-{suffix}"
    return name


def _write_step(folder, name, files):
    """Write files into a hidden temporary folder, then rename it to `name` (a complete step or none)."""
    mask = umask()
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~mask)
        for filename, data in files.items():
            write_new(tmp / filename, data, 0o666 & ~mask)
        fsync_dir(tmp)
        os.rename(tmp, folder / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder)


def _write_pointer(folder, latest, kept):
    atomic_write_json(folder / POINTER, {"format": RUN_FORMAT, "version": RUN_VERSION, "latest": latest,
                                         "kept": kept})


def _adopt_flat(folder):
    """Give a checkpoint of the old layout (params.npz and meta.json in the folder itself) a step
    folder and a pointer, so that it is one of the kept checkpoints; the old files go afterwards.
    A folder whose old checkpoint does not load is left as it is (nothing to keep)."""
    try:
        info, _, _ = _read(folder)
    except ValueError:
        return None
    name = _fresh_name(folder, _step_of(info.get("meta"), {"t": info.get("optimizer_step") or 0}))
    files = {n: (folder / n).read_bytes() for n in ("params.npz", "meta.json")}
    _write_step(folder, name, files)
    _write_pointer(folder, name, [name])
    for n in ("meta.json", "params.npz"):
        (folder / n).unlink()
    return {"latest": name, "kept": [name]}


def clean_temporaries(folder):
    """Remove what killed saves left behind in a run folder: hidden '.*.tmp' files and folders."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if TEMP_NAME.fullmatch(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _prune(folder, kept, old_layout=True):
    """Delete step folders not in `kept`, and (old_layout) old-layout files a pointer now supersedes."""
    for entry in list(os.scandir(folder)):
        if STEP_NAME.fullmatch(entry.name) and entry.name not in kept and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
    for n in ("meta.json", "params.npz") if old_layout else ():
        if os.path.isfile(folder / n) and not os.path.islink(folder / n):
            (folder / n).unlink()


def _digest(info):
    """SHA-256 of meta.json's content without its own checksum, so an edited config or meta is caught."""
    body = {k: v for k, v in info.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


# Reading.

def _describe_mode(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path):
    """os.stat, with every failure (missing, symlink loop, no permission) as a ValueError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror or e}") from None


def _present(path):
    """True if something is at path (a broken symlink or a loop counts: reading it will explain)."""
    return os.path.lexists(path)


def _read_file(path, limit):
    """The bytes of a regular file of at most `limit` bytes; anything else is a ValueError.

    The type is checked with stat before opening, and again on the open descriptor (opened
    non-blocking), so a FIFO swapped in between cannot make the read hang.
    """
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{str(path)!r} is {_describe_mode(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{str(path)!r} is {st.st_size} bytes, more than the {limit} a checkpoint file of "
                         f"this config can be")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be opened: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{str(path)!r} is not a regular file")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{str(path)!r} is more than the {limit} bytes it can be")
            chunks.append(chunk)
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _read_json(path, limit):
    data = _read_file(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{str(path)!r} is nested too deeply to be a checkpoint file") from None


def _read_pointer(folder):
    """checkpoint.json of a run folder, validated: {'latest': step name, 'kept': [step names]}."""
    path = Path(folder) / POINTER
    pointer = _read_json(path, MAX_POINTER)
    if not isinstance(pointer, dict) or pointer.get("format") != RUN_FORMAT:
        raise ValueError(f"{str(path)!r} is not a {RUN_FORMAT} file")
    if pointer.get("version") != RUN_VERSION:
        raise ValueError(f"{str(path)!r}: version {pointer.get('version')!r} is not supported (want {RUN_VERSION})")
    latest, kept = pointer.get("latest"), pointer.get("kept")
    names = kept if isinstance(kept, list) else [None]
    if not all(isinstance(n, str) and STEP_NAME.fullmatch(n) for n in [latest] + names) or latest not in names:
        raise ValueError(f"{str(path)!r} names step folders {latest!r} / {kept!r}; expected names like "
                         f"'step-000020', the latest among the kept")
    return {"latest": latest, "kept": kept}


def step_folders(folder):
    """Names of the complete step folders in a run folder, oldest step first."""
    try:
        names = [e.name for e in os.scandir(folder) if STEP_NAME.fullmatch(e.name) and e.is_dir()]
    except OSError:
        return []
    return sorted(names, key=lambda n: tuple(int(x or 0) for x in STEP_NAME.fullmatch(n).groups()))


def resolve(path):
    """The folder holding the current checkpoint's files: via checkpoint.json, or `path` itself
    (a step folder, or a folder of the old layout)."""
    folder = Path(path)
    if not stat.S_ISDIR(_stat_checkpoint(folder).st_mode):
        raise ValueError(f"checkpoint {str(folder)!r} is not a folder (expected {POINTER} or meta.json inside)")
    if _present(folder / POINTER):
        return folder / _read_pointer(folder)["latest"]
    if _present(folder / "meta.json"):
        return folder
    steps = step_folders(folder)
    hint = (f"; its step folders {steps} were written by a save that did not finish, load one directly "
            f"(e.g. {str(folder / steps[-1])!r})" if steps else "")
    raise ValueError(f"checkpoint {str(folder)!r} holds no checkpoint (no {POINTER} and no meta.json){hint}")


def _stat_checkpoint(folder):
    try:
        return os.stat(folder)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(folder)!r} is not a folder (it does not exist)") from None
    except OSError as e:
        raise ValueError(f"checkpoint {str(folder)!r} cannot be read: {e.strerror or e}") from None


def exists(path):
    """True if `path` holds a checkpoint of either layout (loadable or not): a run lives there."""
    folder = Path(path)
    return folder.is_dir() and (_present(folder / POINTER) or _present(folder / "meta.json"))


def _config(info, where):
    """The Config recorded in meta.json; fields added after version 1 was first written are filled
    in with the value those older checkpoints were trained with (LATER_FIELDS)."""
    d = info.get("config")
    if not isinstance(d, dict):
        raise ValueError(f"{where}: meta.json has no config")
    try:
        return Config.from_dict({**{k: v for k, v in LATER_FIELDS.items() if k not in d}, **d})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _npz_limit(cfg, with_optimizer):
    """The most bytes params.npz can take for this config: the arrays plus generous headers."""
    shapes = expected_shapes(cfg)
    copies = 3 if with_optimizer else 1
    return copies * (4 * sum(math.prod(s) for s in shapes.values()) + 4096 * len(shapes)) + 65536


def _read_npz(data, max_count, where):
    """{name: float32 array} from .npz bytes, each header checked before its array is built."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{where}: params.npz cannot be read ({e})") from None
    arrays = {}
    with zf:
        for member in zf.infolist():
            name = member.filename[:-len(".npy")]
            if not member.filename.endswith(".npy") or name in arrays:
                raise ValueError(f"{where}: params.npz holds {member.filename!r}, not one array per name")
            if member.file_size > 4 * max_count + 65536:
                raise ValueError(f"{where}: params.npz member {member.filename!r} claims {member.file_size} bytes, "
                                 f"more than any array of this config")
            try:
                raw = zf.read(member)
                f = io.BytesIO(raw)
                version = onp.lib.format.read_magic(f)
                read_header = (onp.lib.format.read_array_header_1_0 if version == (1, 0)
                               else onp.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                raise ValueError(f"{where}: params.npz member {member.filename!r} cannot be read ({e})") from None
            except Exception as e:   # noqa: BLE001 - zlib and header parsing raise assorted types
                raise ValueError(f"{where}: params.npz member {member.filename!r} cannot be read ({e})") from None
            if dtype != onp.dtype("<f4"):
                raise ValueError(f"{where}: array {name} is {dtype}, expected float32")
            count = math.prod(shape)
            if count > max_count or len(raw) - f.tell() != 4 * count:
                raise ValueError(f"{where}: array {name} claims shape {shape}, which its {len(raw)} bytes "
                                 f"do not hold or this config never has")
            a = onp.frombuffer(raw, dtype, count, f.tell()).reshape(shape, order="F" if fortran else "C")
            arrays[name] = onp.array(a, order="C")
    return arrays


def _read(path):
    """(info, cfg, arrays) of a folder holding params.npz and meta.json; every problem a ValueError."""
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not stat.S_ISDIR(_stat_checkpoint(path).st_mode):
        raise ValueError(f"{where} is not a folder (expected params.npz and meta.json inside)")
    if not _present(path / "meta.json"):
        raise ValueError(f"{where} has no meta.json")
    info = _read_json(path / "meta.json", MAX_JSON)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{where}: meta.json is not a {FORMAT} file")
    if info.get("version") != VERSION:
        raise ValueError(f"{where}: version {info.get('version')!r} is not supported (want {VERSION})")
    if info.get("meta_sha256") != _digest(info):
        raise ValueError(f"{where}: meta.json does not match its own checksum "
                         f"(the config or meta was edited after saving)")
    cfg = _config(info, where)
    if not _present(path / "params.npz"):
        raise ValueError(f"{where} has no params.npz")
    data = _read_file(path / "params.npz", _npz_limit(cfg, info.get("optimizer_step") is not None))
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise ValueError(f"{where}: params.npz does not match the checksum in meta.json "
                         f"(truncated, altered, or from another save)")
    arrays = _read_npz(data, max(math.prod(s) for s in expected_shapes(cfg).values()), where)
    return info, cfg, arrays


def _check_shapes(flat, cfg, where):
    want = expected_shapes(cfg)
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: arrays do not match the config: missing {missing}, unexpected {extra}")
    for k, shape in want.items():
        a = flat[k]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{where}: array {k} has shape {tuple(a.shape)}, the config needs {tuple(shape)}")
        if a.dtype != onp.float32:
            raise ValueError(f"{where}: array {k} is {a.dtype}, expected float32")


def _part(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def load(path, tokenizer=None):
    """Read a checkpoint -> (params, cfg, meta). Any mismatch or corruption is a ValueError.

    `path` is a run folder (its current step), a step folder, or an old-layout folder. With
    `tokenizer`, it must be the tokenizer the checkpoint was trained with (when recorded).
    """
    path = resolve(path)
    info, cfg, arrays = _read(path)
    flat = _part(arrays, "param/")
    _check_shapes(flat, cfg, f"checkpoint {str(path)!r}")
    _check_finite(flat, f"checkpoint {str(path)!r}")
    if tokenizer is not None:
        check_tokenizer(info, tokenizer, f"checkpoint {str(path)!r}")
    return unflatten(flat), cfg, info.get("meta", {})


def load_optimizer(path):
    """The AdamW state saved with a checkpoint, or None if it was saved without one."""
    path = resolve(path)
    info, cfg, arrays = _read(path)
    return _optimizer(info, cfg, arrays, f"checkpoint {str(path)!r}")


def _optimizer(info, cfg, arrays, where):
    t = info.get("optimizer_step")
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"{where}: optimizer_step must be an integer >= 0, got {t!r}")
    m, v = _part(arrays, "adam_m/"), _part(arrays, "adam_v/")
    _check_shapes(m, cfg, f"{where} (optimizer m)")
    _check_shapes(v, cfg, f"{where} (optimizer v)")
    _check_finite({**m, **v}, f"{where} (optimizer)")
    return {"m": m, "v": v, "t": t}


def load_run(path, tokenizer=None):
    """Everything needed to resume, read once: (params, cfg, meta, optimizer state or None, step folder)."""
    path = resolve(path)
    info, cfg, arrays = _read(path)
    where = f"checkpoint {str(path)!r}"
    flat = _part(arrays, "param/")
    _check_shapes(flat, cfg, where)
    _check_finite(flat, where)
    if tokenizer is not None:
        check_tokenizer(info, tokenizer, where)
    return unflatten(flat), cfg, info.get("meta", {}), _optimizer(info, cfg, arrays, where), path


def read_meta(path):
    """(cfg, meta, step folder) of the current checkpoint, without reading its arrays (cheap)."""
    path = resolve(path)
    where = f"checkpoint {str(path)!r}"
    info = _read_json(path / "meta.json", MAX_JSON)
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("meta_sha256") != _digest(info):
        raise ValueError(f"{where}: meta.json is not an intact {FORMAT} file")
    return _config(info, where), info.get("meta", {}), path
