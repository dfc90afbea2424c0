"""Writing files atomically: a reader sees the old file or the new one, never half of one.

Checkpoints, the tokenizer's JSON, metrics and benchmark results are all written here: to a temporary
file in the same folder, flushed and fsynced, then renamed over the target (a rename within one folder
is atomic), and the folder fsynced so the rename survives a crash. Files get the usual permissions
(0666 minus the umask, as open() would), not mkstemp's 0600. This module imports nothing of the
package, so any module, however low in the stack, may write through it.
"""
import json
import os
import tempfile
from pathlib import Path


def umask():
    """The process umask, read without changing it where Linux allows (else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder):
    """Make a rename in `folder` durable (not possible on every filesystem: then skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_new(path, data, mode):
    """Write bytes to a path that does not exist yet, fsynced, with the given permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data):
    """Write bytes to path via a temporary file in the same folder and a rename (0666 minus umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def json_text(obj):
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json_text(obj).encode("utf-8"))
