"""python -m tinyfractal.exercises {list, start, check}: copy the exercise stubs, and grade them.

Exit codes: 0 done (check: every selected exercise passes), 1 check found failures, 2 a usage error
(one line on stderr).
"""
import argparse
import difflib
import shutil
import sys
import textwrap
from pathlib import Path

from tinyfractal.exercises import (DEFAULT_DIR, EXERCISES, SOLUTIONS, check_folder, lesson_number, lessons,
                                   of_lesson, stub_files)

PROG = "python -m tinyfractal.exercises"


class UsageError(Exception):
    """A mistake in the command: reported as one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def build_parser():
    parser = Parser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="{list,start,check}")
    sub.add_parser("list", help="every exercise, lesson by lesson")
    start = sub.add_parser("start", help="copy the exercise stubs into a folder of your own")
    start.add_argument("--dir", default=str(DEFAULT_DIR), help=f"where to put them (default ./{DEFAULT_DIR}/)")
    start.add_argument("--force", action="store_true", help="replace files that are already there (your work is lost)")
    check = sub.add_parser("check", help="grade the exercises in your folder")
    check.add_argument("selection", nargs="?", default=None, metavar="LESSON[.NAME]",
                       help="one lesson (e.g. transformer) or one exercise (e.g. transformer.rmsnorm); default all")
    check.add_argument("--dir", default=None, help=f"your folder (default ./{DEFAULT_DIR}/)")
    check.add_argument("--solutions", action="store_true", help="grade the reference solutions instead (teachers)")
    return parser


def title(lesson):
    number = lesson_number(lesson)
    return f"lesson {number}, {lesson}" if number is not None else lesson


def run_list():
    for lesson in lessons():
        todo = of_lesson(lesson)
        print(f"{title(lesson)} (handout lessons/{lesson}.md): {len(todo)} exercises in {lesson}.py")
        for e in todo:
            print(f"  {lesson + '.' + e.name:<36} {e.title}")
        print()
    print(f"{len(EXERCISES)} exercises. Start with: {PROG} start")
    return 0


def run_start(args):
    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{PROG} start: {folder} exists and is not a folder")
    files = stub_files()
    existing = [path.name for path in files.values() if (folder / path.name).exists()]
    if existing and not args.force:
        raise UsageError(f"{PROG} start: {folder}/ already holds {', '.join(existing)}, which may be your work, "
                         f"so nothing was copied (--force replaces them, --dir DIR starts elsewhere)")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Copied the exercise stubs to {folder}/:")
    for lesson, path in files.items():
        shutil.copyfile(path, folder / path.name)
        print(f"  {str(folder / path.name):<36} {len(of_lesson(lesson)):2d} exercises ({title(lesson)})")
    where = "" if Path(args.dir) == DEFAULT_DIR else f" --dir {args.dir}"
    print(f"\nOpen one, replace each `raise NotImplementedError` with your code, then grade it:\n"
          f"  {PROG} check transformer{where}\n"
          f"  {PROG} list            (every exercise)")
    return 0


def select(selection):
    """'transformer' or 'transformer.rmsnorm' -> the exercises it names; UsageError with a suggestion."""
    if selection is None:
        return None
    lesson, _, name = selection.partition(".")
    if lesson not in lessons():
        close = difflib.get_close_matches(lesson, lessons(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"{PROG} check: no lesson {lesson!r}; {hint}lessons with exercises: {', '.join(lessons())}")
    chosen = of_lesson(lesson)
    if name:
        names = [e.name for e in chosen]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {lesson}.{close[0]}? " if close else ""
            raise UsageError(f"{PROG} check: lesson {lesson} has no exercise {name!r}; {hint}"
                             f"its exercises: {', '.join(names)}")
        chosen = [e for e in chosen if e.name == name]
    return chosen


def run_check(args):
    chosen = select(args.selection)
    if args.solutions:
        if args.dir is not None:
            raise UsageError(f"{PROG} check: give --solutions or --dir, not both")
        if not SOLUTIONS.is_dir():
            raise UsageError(f"{PROG} check: the reference solutions were removed from this installation "
                             f"({SOLUTIONS} does not exist)")
        folder = SOLUTIONS
    else:
        folder = Path(args.dir) if args.dir is not None else DEFAULT_DIR
        if not folder.is_dir():
            raise UsageError(f"{PROG} check: there is no folder {folder}/; run `{PROG} start` first"
                             + ("" if args.dir is None else f" with --dir {args.dir}"))
    results = check_folder(folder, chosen)
    print(f"Checking {folder}/ against the engine: {len(results)} exercises.")
    wrap = textwrap.TextWrapper(width=100, subsequent_indent=" " * 14)
    last = None
    for r in results:
        if r.exercise.lesson != last:
            last = r.exercise.lesson
            print(f"\n{title(last)}: {folder / (last + '.py')}")
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.exercise.name:<22} {r.exercise.title}")
        if not r.passed:
            print(wrap.fill(f"        why:  {r.reason}"))
            print(wrap.fill(f"        hint: {r.exercise.hint}"))
    passed = sum(r.passed for r in results)
    print(f"\n{passed} of {len(results)} exercises pass."
          + ("" if passed == len(results) else " Fix the first failure and run the same command again."))
    return 0 if passed == len(results) else 1


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            return run_list()
        if args.command == "start":
            return run_start(args)
        return run_check(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {PROG}: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {PROG}: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
