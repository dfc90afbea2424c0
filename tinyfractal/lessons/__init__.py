"""The lessons: one module each (`python -m tinyfractal.lessons.NAME`), a handout each in lessons/NAME.md.

`discover()` finds every lesson module in this folder, in course order; `python -m tinyfractal.lessons`
prints the list. A lesson added here is picked up by the index and by the smoke test with no edit.
Shared helpers (arguments, output folders, errors, Ctrl-C, checkpoints) are in `_common.py`.
"""
import ast
import importlib.abc
import importlib.util
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tinyfractal.paths import ROOT

# The course order; a lesson not named here comes after these, alphabetically.
ORDER = ["transformer", "base", "tokenizer", "speculative", "merging", "coupling", "bytes", "fractal", "cluster", "tax"]
HANDOUTS = ROOT / "lessons"


@dataclass(frozen=True)
class Lesson:
    name: str
    summary: str      # the first line of the module's docstring, without a leading "Lesson N,"
    module: str
    handout: Path     # lessons/NAME.md (may not exist yet)

    @property
    def command(self):
        return f"python -m {self.module}"


def _summary(path):
    """First docstring line of a module file, read without importing it."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else "(no description)"
    rest = re.sub(r"^Lesson\s+\d+\s*[,:.-]?\s*", "", first)
    return rest[:1].upper() + rest[1:]


def discover():
    """Every lesson module of this package, in course order: [Lesson]."""
    here = Path(__file__).parent
    names = [m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and not m.ispkg]
    ordered = [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)
    return [Lesson(n, _summary(here / f"{n}.py"), f"{__name__}.{n}", HANDOUTS / f"{n}.md") for n in ordered]


class _Suggest(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """`python -m tinyfractal.lessons.bse`: 'did you mean base?' instead of Python's 'No module named'.

    Installed only while `python -m` is looking for a module (sys.argv[0] is then "-m"), and asked only
    after the normal finders failed, so imports in a running program never see it.
    """

    def find_spec(self, fullname, path, target=None):
        name = fullname[len(__name__) + 1:] if fullname.startswith(__name__ + ".") else ""
        if sys.argv[:1] != ["-m"] or not name or "." in name:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def is_package(self, fullname):
        return False

    def get_source(self, fullname):
        name = fullname.rsplit(".", 1)[1]
        return f"import sys\nfrom {__name__}.__main__ import unknown\nsys.exit(unknown({name!r}))\n"


if sys.argv[:1] == ["-m"] and not any(isinstance(f, _Suggest) for f in sys.meta_path):
    sys.meta_path.append(_Suggest())
