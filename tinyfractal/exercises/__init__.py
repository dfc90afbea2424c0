"""Graded exercises for the lessons, in the manner of minitorch's tasks.

    python -m tinyfractal.exercises list                          # every exercise, lesson by lesson
    python -m tinyfractal.exercises start [--dir DIR]             # copy the stubs to ./my_exercises/
    python -m tinyfractal.exercises check [LESSON[.NAME]] [--dir DIR]   # grade your work
    python -m tinyfractal.exercises check --solutions             # grade the reference solutions

`stubs/LESSON.py` holds one function per exercise, whose body raises NotImplementedError. `checks.py`
runs each function on random inputs against the engine's own code and prints a hint when an answer is
wrong. `solutions/` holds reference answers, and `solutions/ANSWERS.md` short model answers to the
handouts' open questions: a teacher may delete that folder before handing the course out.
"""
import importlib.util
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import EXERCISES, Exercise, Failed

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"
SOLUTIONS = HERE / "solutions"
DEFAULT_DIR = Path("my_exercises")


def lessons():
    """The lessons that have exercises, in course order: [name]."""
    from tinyfractal.lessons import ORDER
    names = list(dict.fromkeys(e.lesson for e in EXERCISES))
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def lesson_number(name):
    """The lesson's number in the course (its place in ORDER, from 0), or None."""
    from tinyfractal.lessons import ORDER
    return ORDER.index(name) if name in ORDER else None


def of_lesson(lesson):
    return [e for e in EXERCISES if e.lesson == lesson]


def stub_files():
    """{lesson: the stub file}, for every lesson with exercises."""
    return {lesson: STUBS / f"{lesson}.py" for lesson in lessons()}


@dataclass(frozen=True)
class Result:
    exercise: Exercise
    passed: bool
    reason: str = ""


def load(path, lesson):
    """Import a student's file -> (module, None), or (None, a one-line reason it could not be imported)."""
    path = Path(path)
    if not path.exists():
        return None, f"{path} does not exist (python -m tinyfractal.exercises start copies the stubs)"
    name = f"_tinyfractal_exercises_{lesson}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        return None, f"could not import {path}: SyntaxError on line {e.lineno}: {e.msg}"
    except Exception as e:   # noqa: BLE001 - any error in a student's file is reported, not raised
        return None, f"could not import {path}: {type(e).__name__}: {e}{_where(e, path)}"
    return module, None


def _where(error, path):
    """' (line N of FILE)' for the last traceback frame inside the student's file, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    return f" (line {frames[-1].lineno} of {Path(path).name})" if frames else ""


def run(exercise, module, path):
    """Run one exercise's check on the student's function -> Result."""
    fn = getattr(module, exercise.name, None)
    if not callable(fn):
        return Result(exercise, False, f"{Path(path).name} has no function {exercise.name}")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            exercise.check(fn)
    except NotImplementedError:
        return Result(exercise, False, "not written yet: it raises NotImplementedError")
    except Failed as e:
        return Result(exercise, False, str(e))
    except Exception as e:   # noqa: BLE001 - a crash in the student's code is a failed check
        return Result(exercise, False, f"it raised {type(e).__name__}: {e}{_where(e, path)}")
    return Result(exercise, True)


def check_folder(folder, selection=None):
    """Run the checks of the selected exercises (default: all) on the files in `folder`: [Result]."""
    results = []
    chosen = EXERCISES if selection is None else selection
    for lesson in lessons():
        todo = [e for e in chosen if e.lesson == lesson]
        if not todo:
            continue
        path = Path(folder) / f"{lesson}.py"
        module, error = load(path, lesson)
        results += [Result(e, False, error) if module is None else run(e, module, path) for e in todo]
    return results
