"""The machinery under the fused ops: importing the package changes nothing in the process; `tune()` does,
once; a bad TINYFRACTAL_THREADS is one clear error, not a broken import."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinyfractal.core import machinery

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: records every ctypes library handle made, reads OpenBLAS's thread count
# through a handle of its own made before the recording starts, then runs BODY and prints what it saw.
PROBE = """
import ctypes, json, sys
import numpy
def openblas_threads():
    paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    for path in sorted(p for p in paths if p.startswith("/")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                     "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None
get = openblas_threads()
before = get() if get else None
handles = []
original_init = ctypes.CDLL.__init__
def recording_init(self, name, *args, **kwargs):
    handles.append(str(name))
    original_init(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = recording_init
seen = {}
BODY
seen["handles"] = handles
seen["blas_before"], seen["blas_after"] = before, get() if get else None
print(json.dumps(seen))
"""


def probe(body, **env):
    code = PROBE.replace("BODY", textwrap.dedent(body))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_package_makes_no_process_wide_change():
    """Import law: `import tinyfractal` (and every module under the fast path, the CLI and the benchmarks)
    calls no mallopt, makes no ctypes handle of libc or OpenBLAS, leaves OpenBLAS's thread count alone
    and leaves the machinery untuned, running everything in the calling thread."""
    seen = probe("""
        import tinyfractal, tinyfractal.cli, tinyfractal.core.fast, tinyfractal.core.ops, tinyfractal.tools.bench
        import tinyfractal.training.train
        from tinyfractal.core import machinery
        ids = numpy.zeros((1, 4), dtype=int)
        cfg = tinyfractal.Config.preset("micro")
        tinyfractal.tree_loss(tinyfractal.init_params(cfg), cfg, ids, ids)     # running a model does not tune either
        seen.update(tuned=machinery.tuned(), libc=machinery._libc is not None, blas=machinery._blas is not None,
                    threads=machinery.THREADS)
    """)
    assert seen["handles"] == []
    assert seen["tuned"] is False and seen["libc"] is False and seen["blas"] is False and seen["threads"] == 1
    assert seen["blas_after"] == seen["blas_before"]


def test_tune_makes_its_settings_once():
    """Idempotence law: the first tune() tunes malloc through one libc handle and takes the thread count
    from TINYFRACTAL_THREADS; a second call returns the same settings and makes no new handle."""
    seen = probe("""
        from tinyfractal.core import machinery
        first = machinery.tune()
        made = len(handles)
        second = machinery.tune()
        seen.update(same=first is second, made=made, after=len(handles), threads=machinery.THREADS,
                    openblas=first.openblas, malloc=first.malloc, tuned=machinery.tuned())
    """, TINYFRACTAL_THREADS="3")
    assert seen["same"] and seen["tuned"] and seen["made"] >= 1 and seen["after"] == seen["made"]
    assert seen["malloc"] == any("libc" in h for h in seen["handles"])
    assert seen["threads"] == (3 if seen["openblas"] else 1)


def test_one_thread_means_one_blas_thread_too():
    """TINYFRACTAL_THREADS=1 law: after tune(), OpenBLAS runs one thread as well, even where its own
    default (here OPENBLAS_NUM_THREADS=2) is more, so two one-thread runs side by side do not spin against
    each other."""
    seen = probe("""
        from tinyfractal.core import machinery
        tuning = machinery.tune()
        seen.update(openblas=tuning.openblas, threads=machinery.THREADS, blas=machinery.blas_threads())
    """, TINYFRACTAL_THREADS="1", OPENBLAS_NUM_THREADS="2")
    if not seen["openblas"]:
        pytest.skip("numpy here does not use its bundled OpenBLAS")
    assert seen["blas_before"] == 2
    assert seen["threads"] == 1 and seen["blas"] == 1 and seen["blas_after"] == 1


@pytest.mark.parametrize("value", ["abc", "0", "-2", "", "1.5"])
def test_a_bad_thread_count_is_a_value_error_naming_the_variable(value, monkeypatch):
    """Error law: TINYFRACTAL_THREADS that is not a positive integer gives a ValueError naming the variable
    and what it allows (reading it changes nothing)."""
    monkeypatch.setenv("TINYFRACTAL_THREADS", value)
    with pytest.raises(ValueError, match="TINYFRACTAL_THREADS must be a positive integer"):
        machinery.threads_from_environment()


def test_a_good_thread_count_is_read_and_none_means_every_core(monkeypatch):
    """TINYFRACTAL_THREADS=2 gives 2 threads; without it, the machine's core count."""
    monkeypatch.setenv("TINYFRACTAL_THREADS", " 2 ")
    assert machinery.threads_from_environment() == 2
    monkeypatch.delenv("TINYFRACTAL_THREADS")
    assert machinery.threads_from_environment(cores=7) == 7


def test_a_bad_thread_count_does_not_break_import_and_is_one_line_at_the_command_line():
    """With TINYFRACTAL_THREADS=abc the package imports; tune() raises the ValueError; the training
    benchmark stops with one line on stderr and exit code 2."""
    seen = probe("""
        import tinyfractal
        from tinyfractal.core import machinery
        try:
            machinery.tune()
            seen["error"] = None
        except ValueError as e:
            seen["error"] = str(e)
        seen["tuned"] = machinery.tuned()
    """, TINYFRACTAL_THREADS="abc")
    assert "TINYFRACTAL_THREADS" in seen["error"] and "'abc'" in seen["error"] and seen["tuned"] is False
    done = subprocess.run([sys.executable, "-m", "tinyfractal.bench", "--preset", "micro"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TINYFRACTAL_THREADS": "abc"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "TINYFRACTAL_THREADS" in lines[0]


def test_forced_split_restores_the_settings():
    """forced_split(2) runs every op over two threads inside the block and puts THREADS back after."""
    saved = machinery.THREADS, machinery.MIN_WORK
    with machinery.forced_split(2):
        assert machinery.THREADS == 2 and machinery.MIN_WORK == 0
        assert machinery.parallel_map(lambda p: p * p, [1, 2, 3]) == [1, 4, 9]
    assert (machinery.THREADS, machinery.MIN_WORK) == saved
