"""Shared by the lesson tests: one --quick run of each lesson per test session, and the handouts' parts.

`quick_run(name)` runs `python -m tinyfractal.lessons.NAME --quick --out DIR` once in a subprocess (the
module entry point, as a student types it), from a scratch folder, with this repository's package
first on the path, and caches what it printed for every test that reads it.
"""
import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANDOUTS = REPO / "lessons"
RECORDED = HANDOUTS / "recorded"
_scratch = Path(tempfile.mkdtemp(prefix="tinyfractal-lessons-"))
atexit.register(shutil.rmtree, _scratch, True)


# Lessons whose module or handout has not caught up with the course's rules yet, and what is missing:
#   "workflow"  the module does not use tinyfractal/lessons/_common.py (no quick banner, own arguments)
#   "handout"   the handout lacks the opening (prerequisites, three takeaways) or the closing self-check
#   "excerpts"  the handout quotes output that no recording in lessons/recorded/ or --quick run holds
# Their tests are marked xfail(strict=True): when the lesson catches up the test passes, the strict
# xfail fails the suite, and the entry must be removed here.
PENDING = {}


def lesson_param(name, what, value=None):
    """pytest.param of a lesson's test, xfail(strict) if the lesson is PENDING on `what`."""
    import pytest
    marks = [pytest.mark.xfail(strict=True, reason=f"lesson {name} is pending on {what} (tests/lesson_runs.py)")] \
        if what in PENDING.get(name, ()) else []
    return pytest.param(name if value is None else value, marks=marks, id=name)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    folder: Path


def env():
    """The environment of a subprocess that must run this worktree's package, not an installed one."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=None)
def quick_run(name):
    """`python -m tinyfractal.lessons.NAME --quick --out DIR`, run once per session: Run."""
    folder = _scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", f"tinyfractal.lessons.{name}", "--quick", "--out", str(folder / "out")],
                       cwd=folder, env=env(), capture_output=True, text=True, timeout=600)
    return Run(p.returncode, p.stdout, p.stderr, folder / "out")


def fenced(path, languages):
    """The fenced code blocks of a markdown file whose language is one of `languages` (also those
    indented inside a list, with the fence's indent removed): [str]."""
    blocks = re.findall(r"^([ \t]*)```(\w*)\n(.*?)^\1```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return ["".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines(True))
            for indent, lang, body in blocks if lang in languages]


def excerpt_blocks(path):
    """The handout's ```text blocks (excerpts of real output) as lists of lines, '...' and blanks dropped."""
    return [[line.rstrip() for line in block.splitlines() if line.strip() and line.strip() != "..."]
            for block in fenced(path, {"text"})]


def split_commands(script):
    """A shell script -> its commands: quotes respected (a quoted string may span lines), backslash
    continuations joined, unquoted '# ...' comments dropped, and split at unquoted newlines, ';', '&&'."""
    commands, current, quote, i = [], "", None, 0
    while i < len(script):
        c = script[i]
        if quote:
            current += c
            quote = None if c == quote else quote
        elif c in "'\"":
            quote, current = c, current + c
        elif c == "\\" and script[i + 1:i + 2] == "\n":
            current, i = current + " ", i + 1
        elif c == "#" and (not current or current[-1].isspace()):
            while i + 1 < len(script) and script[i + 1] != "\n":
                i += 1
        elif c in "\n;" or script.startswith("&&", i):
            commands.append(current.strip())
            current, i = "", i + (1 if script.startswith("&&", i) else 0)
        else:
            current += c
        i += 1
    commands.append(current.strip())
    return [c for c in commands if c]


def shell_commands(path):
    """Every command of the file's ```bash blocks (see split_commands)."""
    return [c for block in fenced(path, {"bash", "sh", "shell", "console"}) for c in split_commands(block)]


def recordings():
    """lessons/recorded/*.txt: {command: output lines}, the command being the '$ ...' first line."""
    out = {}
    for path in sorted(RECORDED.glob("*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("$ "):
            out[lines[0][2:].strip()] = [line.rstrip() for line in lines[1:] if not line.startswith("# recorded ")]
    return out
