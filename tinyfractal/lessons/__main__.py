"""The lesson index: `python -m tinyfractal.lessons` lists every lesson, in course order, with its command."""
import argparse

from tinyfractal.lessons import ORDER, discover
from tinyfractal.paths import ROOT


def main(argv=None):
    argparse.ArgumentParser(prog="python -m tinyfractal.lessons", description=__doc__.splitlines()[0]).parse_args(argv)
    lessons = discover()
    print("tinyfractal lessons, in course order (outline: lessons/README.md):\n")
    width = max(len(lesson.name) for lesson in lessons)
    for number, lesson in enumerate(lessons):
        handout = lesson.handout.relative_to(ROOT) if lesson.handout.exists() else "no handout yet"
        print(f"{number:2d}. {lesson.name:<{width}}  {lesson.summary}")
        print(f"    {'':<{width}}  {lesson.command}   (handout: {handout})")
    print("\nEvery lesson takes --quick (a run of seconds, to check that it works) and --out DIR "
          "(default lesson_output/NAME/).")
    planned = [name for name in ORDER if name not in {lesson.name for lesson in lessons}]
    if planned:
        print(f"Planned, not written yet: {', '.join(planned)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
