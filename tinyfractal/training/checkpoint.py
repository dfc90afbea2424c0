"""Checkpoints: a folder with params.npz (arrays, no pickle) and meta.json (config, step, metrics).

Both files are written to temporary names and renamed into place, meta.json last. meta.json holds
the SHA-256 of params.npz, so a half-written, truncated or altered pair is refused on load.
"""
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as onp

from tinyfractal.config import Config
from tinyfractal.core.model import param_shapes
from tinyfractal.core.tree import flatten, unflatten

FORMAT = "tinyfractal-checkpoint"
VERSION = 1


def atomic_write_bytes(path, data):
    """Write bytes to path via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def save(path, params, cfg, meta=None, opt_state=None):
    """Write a checkpoint folder. `meta` is any JSON-able dict (step, metrics, ...)."""
    arrays = {f"param/{k}": onp.ascontiguousarray(v) for k, v in flatten(params).items()}
    if opt_state is not None:
        arrays.update({f"adam_m/{k}": v for k, v in opt_state["m"].items()})
        arrays.update({f"adam_v/{k}": v for k, v in opt_state["v"].items()})
    buf = io.BytesIO()
    onp.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(Path(path) / "params.npz", data)
    info = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "meta": meta or {},
            "sha256": hashlib.sha256(data).hexdigest(),
            "optimizer_step": None if opt_state is None else int(opt_state["t"])}
    info["meta_sha256"] = _digest(info)
    atomic_write_json(Path(path) / "meta.json", info)


def _digest(info):
    """SHA-256 of meta.json's content without its own checksum, so an edited config or meta is caught."""
    body = {k: v for k, v in info.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _read(path):
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a folder (expected params.npz and meta.json inside)")
    try:
        info = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} has no meta.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: meta.json is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r}: meta.json is not a {FORMAT} file")
    if info.get("version") != VERSION:
        raise ValueError(f"checkpoint {str(path)!r}: version {info.get('version')!r} is not supported (want {VERSION})")
    if info.get("meta_sha256") != _digest(info):
        raise ValueError(f"checkpoint {str(path)!r}: meta.json does not match its own checksum "
                         f"(the config or meta was edited after saving)")
    try:
        data = (path / "params.npz").read_bytes()
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} has no params.npz") from None
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise ValueError(f"checkpoint {str(path)!r}: params.npz does not match the checksum in meta.json "
                         f"(truncated, altered, or from another save)")
    try:
        with onp.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: params.npz cannot be read ({e})") from None
    return info, arrays


def _check_shapes(flat, cfg, where):
    want = flatten(param_shapes(cfg))
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: arrays do not match the config: missing {missing}, unexpected {extra}")
    for k, shape in want.items():
        a = flat[k]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{where}: array {k} has shape {tuple(a.shape)}, the config needs {tuple(shape)}")
        if a.dtype != onp.float32:
            raise ValueError(f"{where}: array {k} is {a.dtype}, expected float32")


def load(path):
    """Read a checkpoint folder -> (params, cfg, meta). Any mismatch or corruption is a ValueError."""
    info, arrays = _read(path)
    cfg = Config.from_dict(info.get("config"))
    flat = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    _check_shapes(flat, cfg, f"checkpoint {str(path)!r}")
    return unflatten(flat), cfg, info.get("meta", {})


def load_optimizer(path):
    """The AdamW state saved with a checkpoint, or None if it was saved without one."""
    info, arrays = _read(path)
    if info.get("optimizer_step") is None:
        return None
    m = {k[len("adam_m/"):]: v for k, v in arrays.items() if k.startswith("adam_m/")}
    v = {k[len("adam_v/"):]: v for k, v in arrays.items() if k.startswith("adam_v/")}
    cfg = Config.from_dict(info.get("config"))
    _check_shapes(m, cfg, f"checkpoint {str(path)!r} (optimizer m)")
    _check_shapes(v, cfg, f"checkpoint {str(path)!r} (optimizer v)")
    return {"m": m, "v": v, "t": int(info["optimizer_step"])}
