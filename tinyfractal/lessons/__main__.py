"""The lesson index: `python -m tinyfractal.lessons` lists every lesson, in course order, with its command;
`python -m tinyfractal.lessons NAME [options]` runs one (the same as `python -m tinyfractal.lessons.NAME`)."""
import difflib
import importlib
import sys

from tinyfractal.cli_args import Parser, fail
from tinyfractal.lessons import ORDER, discover
from tinyfractal.paths import ROOT

PROG = "python -m tinyfractal.lessons"


def unknown(name):
    """One line for a lesson name that does not exist, with the closest names (difflib); exit code 2."""
    names = [lesson.name for lesson in discover()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return fail(f"no lesson named {name!r}; {hint}the lessons are {', '.join(names)} ({PROG} lists them)")


def run_lesson(name, argv):
    """Run lesson NAME's main with argv; an unknown NAME is one line and exit code 2."""
    if name not in [lesson.name for lesson in discover()]:
        return unknown(name)
    return importlib.import_module(f"tinyfractal.lessons.{name}").main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):
        return run_lesson(argv[0], argv[1:])
    p = Parser(prog=PROG, description=__doc__.splitlines()[0],
               epilog=f"{PROG} NAME [options] runs lesson NAME, e.g. {PROG} base --quick")
    try:
        p.parse_args(argv)
    except ValueError as e:                       # a usage mistake (cli_args.UsageError)
        return fail(e)
    lessons = discover()
    print("tinyfractal lessons, in course order (outline: lessons/README.md):\n")
    width = max(len(lesson.name) for lesson in lessons)
    for number, lesson in enumerate(lessons):
        if lesson.handout.exists():
            handout = lesson.handout.relative_to(ROOT)
        else:
            handout = f"lessons/{lesson.name}.md in the repository"
        print(f"{number:2d}. {lesson.name:<{width}}  {lesson.summary}")
        print(f"    {'':<{width}}  {lesson.command}   (handout: {handout})")
    print("\nEvery lesson takes --quick (a plumbing check of seconds, written to lesson_output/NAME-quick/), "
          "--out DIR\n(default lesson_output/NAME/) and --seed N; those that train also take --steps N and "
          "--resume.\nRun one by name too: python -m tinyfractal.lessons NAME [options].")
    planned = [name for name in ORDER if name not in {lesson.name for lesson in lessons}]
    if planned:
        print(f"Planned, not written yet: {', '.join(planned)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
