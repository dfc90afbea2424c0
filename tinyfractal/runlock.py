"""One owner per run folder: a lock file that holds the owner's pid and dies with the owner.

`hold(folder)` creates the folder if needed, then DIR/.lock, and takes an exclusive flock on it.
The kernel releases a flock when its process ends, however it ends (kill -9 included), so a lock
left behind by a dead trainer is recognised as stale without guessing: nobody holds its flock any
more. The file holds the owner's pid, so a second trainer can say who is in the way:

    error: runs/tiny is in use by another trainer (pid 4242, running); ...

On release the owner deletes the file while still holding the flock. A process that opened the old
file just before it was deleted would lock a file that no longer has a name, so after locking we
check that the path still names the file we locked, and start over if not.

Within one process the lock is re-entrant: `fit` holds it for the whole run, and every `save` it
makes inside takes it again for free. Where flock does not exist (Windows) the file is created with
O_EXCL instead, and a lock left by a crash must be deleted by hand (the message says so).
"""
import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:   # Windows
    fcntl = None

LOCK_NAME = ".lock"
_held = {}   # real path of the folder -> [fd, depth]


class RunLocked(ValueError):
    """Another process owns the folder."""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _owner(path_or_fd):
    """The pid written in a lock file, or None."""
    try:
        if isinstance(path_or_fd, int):
            os.lseek(path_or_fd, 0, os.SEEK_SET)
            text = os.read(path_or_fd, 64).decode("ascii", "replace")
        else:
            with open(path_or_fd, "rb") as f:
                text = f.read(64).decode("ascii", "replace")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _prepare(folder):
    """Create the folder, or explain in one line why it cannot be a run folder."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} exists and is not a folder; give --out a folder (new or existing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {str(folder)!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {str(folder)!r}: permission denied")


def _acquire(folder):
    """Take the lock on folder -> (fd, pid of a stale owner it replaced, or None)."""
    path = Path(folder) / LOCK_NAME
    for _ in range(10):
        try:
            if fcntl is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            pid = _owner(path)
            raise RunLocked(f"{str(folder)!r} is in use by another trainer (pid {pid}); if none is running, "
                            f"delete {str(path)!r}") from None
        except OSError as e:
            raise ValueError(f"cannot write in {str(folder)!r}: {e.strerror or e}") from None
        if fcntl is None:
            return fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _owner(fd)
            os.close(fd)
            state = "running" if pid is not None and _pid_alive(pid) else "state unknown"
            raise RunLocked(f"{str(folder)!r} is in use by another trainer (pid {pid}, {state}); wait for it "
                            f"to finish or stop it, or use another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if not same:   # the owner deleted the file between our open and our flock: start over
            os.close(fd)
            continue
        stale = _owner(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        return fd, (stale if stale is not None and stale != os.getpid() else None)
    raise RunLocked(f"{str(folder)!r}: could not take the lock (it kept changing hands)")


def _release(folder, fd):
    try:
        os.unlink(Path(folder) / LOCK_NAME)
    except OSError:
        pass
    os.close(fd)


class Held:
    """What `hold` yields: `stale` is the pid of a dead owner whose lock was taken over, or None."""

    def __init__(self, stale):
        self.stale = stale


@contextlib.contextmanager
def hold(folder):
    """Own `folder` for the duration of the with-block (re-entrant within a process).

    Raises RunLocked (a ValueError) if another live process owns it, ValueError if the folder
    cannot be created or written.
    """
    _prepare(folder)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield Held(None)
        finally:
            _held[key][1] -= 1
        return
    fd, stale = _acquire(folder)
    _held[key] = [fd, 1]
    try:
        yield Held(stale)
    finally:
        del _held[key]
        _release(folder, fd)


def owner(folder):
    """The pid that holds folder's lock now, or None if nobody does."""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    if fcntl is None:
        return _owner(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _owner(fd)
    finally:
        os.close(fd)
    return None
