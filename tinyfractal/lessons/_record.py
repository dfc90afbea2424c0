"""Record a full run of a command for the handouts: `python -m tinyfractal.lessons._record NAME -- COMMAND...`.

Runs COMMAND (by default `python -m tinyfractal.lessons.NAME`) from the current folder, shows its
output as it comes, and writes it to lessons/recorded/NAME.txt under a header that gives the command,
the date, the wall time and the machine. The handouts quote these files, and tests/test_handouts.py
checks that every quoted excerpt is in the recording of a command that its handout gives (or in a
--quick run). Re-record after changing what a lesson prints:

    python -m tinyfractal.lessons._record base
    python -m tinyfractal.lessons._record infer_bench_cache -- python -m tinyfractal.infer_bench cache
"""
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time

from tinyfractal.paths import ROOT

RECORDED = ROOT / "lessons" / "recorded"


def header(command, seconds, code):
    """The first lines of a recording: '$ command', then what it ran on."""
    when = datetime.datetime.now().strftime("%Y-%m-%d")
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    return (f"$ {command}\n"
            f"# recorded {when}, exit code {code}, {seconds:.0f} s wall, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, OPENBLAS_NUM_THREADS={threads}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        print(f"error: usage: python -m tinyfractal.lessons._record NAME [-- COMMAND...]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    command = rest[1:] if rest[:1] == ["--"] else ["python", "-m", f"tinyfractal.lessons.{name}", *rest]
    shown = " ".join(shlex.quote(c) for c in command)
    started = time.perf_counter()
    run = [sys.executable if c == "python" else c for c in command]
    lines = []
    with subprocess.Popen(run, stdout=subprocess.PIPE, text=True, encoding="utf-8") as p:
        for line in p.stdout:
            sys.stdout.write(line)
            lines.append(line)
    seconds = time.perf_counter() - started
    RECORDED.mkdir(parents=True, exist_ok=True)
    path = RECORDED / f"{name}.txt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header(shown, seconds, p.returncode) + "".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    print(f"recorded {shown} in {path} ({seconds:.0f} s, exit code {p.returncode})", file=sys.stderr)
    return p.returncode


if __name__ == "__main__":
    raise SystemExit(main())
