"""The machinery the fused ops run on: worker threads, OpenBLAS's thread count, glibc's malloc, profiling.

`ops.py` holds the math (each primitive and its hand-written gradient); this file holds how that math
is spread over the cores and timed. None of it is needed for a right answer: with one thread and no
tuning every op gives the same numbers, only slower.

Importing this module changes nothing in the process. The process-wide settings are made by one
explicit call, `tune()`, which the training entry points make (`training.train.train` and `fit`, the
training benchmark, and so every lesson that trains):

  - the fused ops split their heavy loops over THREADS threads of our own (`parallel_map`), while
    OpenBLAS runs one thread per call; THREADS comes from the environment variable
    TINYFRACTAL_THREADS (a positive integer; 1 turns threading off), else the number of cores;
  - glibc's malloc keeps freed memory for reuse instead of handing it back to the OS
    (`_keep_freed_memory` says why).

Until `tune()` runs, THREADS is 1: everything runs in the calling thread and BLAS is left alone.
`tune()` is idempotent: the first call decides, later calls return the same settings.
"""
import contextlib
import ctypes
import itertools
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as onp

THREADS = 1            # worker threads of parallel_map (the caller included); tune() raises it
MIN_WORK = 1 << 16     # below ~this many element-ops per piece, handing work to a thread costs more than it saves
ONE_PER_THREAD = 1 << 60   # a target so large that count_pieces gives one piece per thread
THREADS_VARIABLE = "TINYFRACTAL_THREADS"

_tuning = None         # the Tuning that tune() made, or None: nothing process-wide has been done
_blas = None           # (set_num_threads, get_num_threads) of numpy's OpenBLAS, once tune() has looked
_libc = None           # the ctypes handle of glibc, once tune() has tuned malloc
_pool, _pool_size = None, 0
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class Tuning:
    """What `tune()` set: our thread count, whether OpenBLAS's thread count can be set, whether malloc was tuned."""
    threads: int
    openblas: bool
    malloc: bool


def tuned():
    """True once `tune()` has run in this process."""
    return _tuning is not None


def threads_from_environment(cores=None):
    """THREADS as TINYFRACTAL_THREADS asks (a positive integer), else the number of cores.

    Raises ValueError naming the variable and what it allows, so a typo is one clear line, not a traceback.
    """
    text = os.environ.get(THREADS_VARIABLE)
    if text is None:
        return cores or os.cpu_count() or 1
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a positive integer (threads for the fused ops; 1 turns "
                         f"threading off), got {text!r}")
    return value


def tune():
    """Make the process-wide settings the fast path wants, once. Returns the `Tuning`.

    - THREADS worker threads for the fused ops, with OpenBLAS at one thread inside them (needs numpy's
      bundled OpenBLAS; without it THREADS stays 1, as another BLAS may not be told its thread count);
      with THREADS = 1, OpenBLAS is set to one thread everywhere;
    - glibc's malloc keeps freed memory (`_keep_freed_memory`).
    Raises ValueError for a bad TINYFRACTAL_THREADS, before changing anything.
    """
    global THREADS, _tuning, _blas
    if _tuning is not None:
        return _tuning
    threads = threads_from_environment()
    _blas = _openblas_thread_setter()
    THREADS = threads if _blas else 1
    if _blas and threads == 1:
        # One thread means one thread: left at its default, OpenBLAS would still wake a thread per core
        # for every matmul outside parallel_map. Two such processes side by side, each spinning at
        # OpenBLAS's barrier, ran 10-20x slower than each alone (measured: 150-200 tok/s against 3400).
        _blas[0](1)
    _tuning = Tuning(threads=THREADS, openblas=_blas is not None, malloc=_keep_freed_memory())
    return _tuning


def _openblas_thread_setter():
    """numpy's bundled OpenBLAS's (set_num_threads, get_num_threads), or None if this numpy uses another BLAS.

    The symbols are not exposed by numpy, so we find the loaded library in /proc/self/maps (Linux).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("set_", "get_"), None)
            if setter is not None and getter is not None:
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                return setter, getter
    return None


def blas_threads():
    """OpenBLAS's own thread count, or None if it cannot be read (tune() not called, or another BLAS)."""
    return _blas[1]() if _blas else None


def set_blas_threads(n):
    """Set OpenBLAS's own thread count (for the whole process). Needs `tune()` and numpy's OpenBLAS."""
    if not _blas:
        raise ValueError("setting the BLAS thread count needs numpy's bundled OpenBLAS and machinery.tune() first")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the BLAS thread count must be a positive integer, got {n!r}")
    _blas[0](n)


def _keep_freed_memory():
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the OS (Linux only).

    A training step allocates and frees the same few hundred MB of arrays every time. By default glibc
    serves each large array with a fresh mmap, and the kernel zero-fills every page on first touch:
    we measured ~110k page faults and ~0.5-0.7 s of system time per `original` step, a third of the
    step's CPU time. With the mmap threshold at its maximum (32 MB) and no trimming of the heap, freed
    arrays are reused and the faults disappear. Peak memory is unchanged; memory is just not returned
    between steps. A no-op where there is no glibc. Returns True if malloc was tuned.
    """
    global _libc
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return False
    _libc = libc
    return True


# Threads.

class _FreeCores:
    """How many cores the rest of the machine leaves us, re-estimated at most every `every` seconds.

    Why: splitting work over threads pays only when the cores are free. On a machine shared with
    other busy processes a helper thread is often descheduled halfway through its piece, and the
    caller waits for it: we measured a tiny-preset step at 0.34 s on two threads against 0.21 s on
    one while two other processes were running. So we look at /proc/stat (all cores' busy time),
    subtract our own CPU time, and give parallel_map only the cores that are left. Without
    /proc/stat (not Linux) every core counts as free.
    """

    def __init__(self, every=0.5):
        self.every, self.last, self.free = every, None, float(os.cpu_count() or 1)

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        busy = sum(ticks) - ticks[3] - ticks[4]                    # all but idle and iowait
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def __call__(self):
        if self.last is not None and time.perf_counter() - self.last[0] < self.every:
            return self.free
        try:
            now = self._sample()
        except (OSError, ValueError, IndexError):
            return self.free
        if self.last is not None:
            wall, busy, ours = (a - b for a, b in zip(now, self.last))
            self.free = (os.cpu_count() or 1) - max(0.0, busy - ours) / wall
        self.last = now
        return self.free


_free_cores = _FreeCores()


def parallel_map(fn, pieces):
    """[fn(p) for p in pieces], shared among the calling thread and up to THREADS - 1 helper threads,
    with BLAS running one thread per call meanwhile.

    Why: OpenBLAS wakes its own threads for every matmul and makes them spin at a barrier. For the
    hundreds of small matmuls of attention that handoff costs more than the math, and on a machine
    shared with other processes a descheduled BLAS thread stalls the others: we measured 5-50x
    slowdowns against one thread. NumPy releases the GIL inside its loops and BLAS calls, so our own
    threads, each running whole pieces with single-threaded BLAS, keep the free cores busy and each
    piece's tiles in cache. The calling thread takes pieces too, from the same counter, so a
    two-piece job costs one handoff. Only as many threads as there are free cores join in (_FreeCores).
    """
    global _pool, _pool_size
    if THREADS <= 1:
        return [fn(p) for p in pieces]
    with _pool_lock:
        if _pool_size < THREADS - 1:
            _pool, _pool_size = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="tinyfractal"), THREADS - 1
        before = _blas[1]() if _blas else None
        if _blas:
            _blas[0](1)
        results, counter = [None] * len(pieces), itertools.count()

        def drain():
            for i in iter(counter.__next__, None):
                if i >= len(pieces):
                    return
                results[i] = fn(pieces[i])

        workers = max(1, min(THREADS, len(pieces), int(_free_cores() + 0.5)))
        helpers = [_pool.submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        finally:
            for helper in helpers:
                helper.result()
            if _blas:
                _blas[0](before)
        return results


@contextlib.contextmanager
def forced_split(threads=2):
    """Inside this block every op splits its work over `threads` threads, however small (for tests:
    the chunking code runs even on tiny shapes, and even when the machine is busy). Restores after."""
    global THREADS, MIN_WORK, _free_cores
    saved = THREADS, MIN_WORK, _free_cores
    THREADS, MIN_WORK, _free_cores = threads, (0 if threads > 1 else MIN_WORK), (lambda: float(threads))
    try:
        yield
    finally:
        THREADS, MIN_WORK, _free_cores = saved


def count_pieces(n, cost_each, target):
    """How many pieces to cut n items of cost_each into: about `target` work each, at least THREADS
    of them, and just one (run in the calling thread) when the whole job is small."""
    total = n * cost_each
    if THREADS <= 1 or total < 2 * MIN_WORK:
        return 1
    return min(n, max(THREADS, -(-total // target)))


def chunks(n, cost_each, target=1 << 18):
    """range(n) cut into count_pieces(...) slices."""
    count = count_pieces(n, cost_each, target)
    edges = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def row_pieces(N, R, cost_per_row, target=1 << 18):
    """(models, rows) slices covering an (N, R, ...) array, about `target` work each."""
    count = count_pieces(N * R, cost_per_row, target)
    if count == 1:
        return [(slice(None), slice(None))]
    per_model = min(R, -(-count // N))
    return [(slice(n, n + 1), slice(R * i // per_model, R * (i + 1) // per_model))
            for n in range(N) for i in range(per_model)]


def batched_matmul(a, b):
    """(N,m,k) @ (N,k,n) -> (N,m,n), split over THREADS threads (see parallel_map).

    The split runs along models when there are enough of them, else along the rows of each model,
    so every thread gets one large single-threaded matmul. Small products stay in the calling thread.
    """
    N, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    out = onp.empty((N, m, n), dtype=onp.result_type(a, b))
    if THREADS <= 1 or N * m * k * n < 32 * MIN_WORK:
        pieces = [(slice(None), slice(None))]
    elif N >= THREADS:
        pieces = [(slice(N * i // THREADS, N * (i + 1) // THREADS), slice(None)) for i in range(THREADS)]
    else:
        pieces = [(slice(j, j + 1), slice(m * i // THREADS, m * (i + 1) // THREADS))
                  for j in range(N) for i in range(THREADS)]

    def piece(p):
        models, rows = p
        onp.matmul(a[models, rows], b[models], out=out[models, rows])
    parallel_map(piece, pieces)
    return out


# Profiling.

_profile = None
_profile_lock = threading.Lock()
_now = time.perf_counter


def now():
    """The profile's clock (wall time unless `profiling` chose another)."""
    return _now()


@contextlib.contextmanager
def profiling(clock=time.perf_counter):
    """Collect seconds spent per category of op inside this block: {category: seconds}.

    `clock` is wall time by default; time.thread_time measures CPU time instead, which a busy
    machine disturbs less (with THREADS = 1).
    """
    global _profile, _now
    saved = _profile, _now
    _profile, _now = defaultdict(float), clock
    try:
        yield _profile
    finally:
        _profile, _now = saved


@contextlib.contextmanager
def clock(category):
    """Add the time spent inside this block to `category` of the running profile (if any)."""
    if _profile is None:
        yield
        return
    t0 = _now()
    try:
        yield
    finally:
        with _profile_lock:
            _profile[category] += _now() - t0


def record_split(wall, busy):
    """Share `wall` seconds among categories in proportion to their summed thread time `busy`."""
    total = sum(busy.values())
    if _profile is not None and total > 0:
        with _profile_lock:
            for category, seconds in busy.items():
                _profile[category] += wall * seconds / total


def run_timed(piece, pieces):
    """parallel_map(piece, pieces), where each piece returns {category: seconds}; the wall time is
    shared among the categories in proportion."""
    t0 = _now()
    busy = parallel_map(piece, pieces)
    total = defaultdict(float)
    for b in busy:
        for category, seconds in b.items():
            total[category] += seconds
    record_split(_now() - t0, total)
