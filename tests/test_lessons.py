"""Every lesson runs (--quick), has a handout, and is in the course outline; the index lists them all.

The lessons are discovered from tinyfractal/lessons, so a lesson added there is tested with no edit here.
"""
import importlib
import re

import pytest

from tinyfractal.lessons import ORDER, discover
from tinyfractal.lessons.__main__ import main as index_main
from tinyfractal.paths import ROOT

LESSONS = discover()
README = ROOT / "lessons" / "README.md"


def test_discovery_finds_the_lesson_modules():
    """discover() returns every public module file of tinyfractal/lessons, known ones in course order."""
    files = sorted(p.stem for p in (ROOT / "tinyfractal" / "lessons").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(lesson.name for lesson in LESSONS) == files
    known = [lesson.name for lesson in LESSONS if lesson.name in ORDER]
    assert known == sorted(known, key=ORDER.index)
    assert {"base", "tokenizer"} <= set(files)


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.name for lesson in LESSONS])
def test_lesson_runs_quick_and_saves_figures(lesson, tmp_path, capsys):
    """`python -m tinyfractal.lessons.NAME --quick --out DIR` finishes, prints its story, saves a figure."""
    module = importlib.import_module(lesson.module)
    code = module.main(["--quick", "--out", str(tmp_path)])
    assert code in (0, None)
    assert len(capsys.readouterr().out.splitlines()) > 10
    assert list(tmp_path.rglob("*.png")), "a lesson saves its figures into --out"


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.name for lesson in LESSONS])
def test_every_lesson_has_a_handout_and_a_place_in_the_outline(lesson):
    """lessons/NAME.md exists, gives the command and exercises; lessons/README.md links it."""
    assert lesson.handout.exists(), f"missing handout {lesson.handout.relative_to(ROOT)}"
    text = lesson.handout.read_text(encoding="utf-8")
    assert lesson.command in text
    assert "exercise" in text.lower()
    assert f"({lesson.name}.md)" in README.read_text(encoding="utf-8")


def test_index_lists_every_lesson_with_its_command(capsys):
    assert index_main([]) == 0
    out = capsys.readouterr().out
    for lesson in LESSONS:
        assert f"{lesson.name}  " in out and lesson.command in out


def test_outline_is_in_course_order():
    """The lessons linked from lessons/README.md appear in the order of ORDER."""
    linked = re.findall(r"\((\w+)\.md\)", README.read_text(encoding="utf-8"))
    known = [name for name in dict.fromkeys(linked) if name in ORDER]
    assert known == sorted(known, key=ORDER.index) and known[:3] == ["transformer", "base", "tokenizer"]


def excerpt_lines(handout):
    """The lines of the handout's ```text blocks (excerpts of real output), blank lines dropped."""
    blocks = re.findall(r"```text\n(.*?)```", handout.read_text(encoding="utf-8"), flags=re.S)
    return [line.rstrip() for block in blocks for line in block.splitlines() if line.strip() and line.strip() != "..."]


def test_tokenizer_handout_quotes_what_the_lesson_prints_today(tmp_path, capsys):
    """Every line of the tokenizer handout's output excerpts is a line of a full run's output."""
    module = importlib.import_module("tinyfractal.lessons.tokenizer")
    assert module.main(["--out", str(tmp_path)]) == 0
    printed = {line.rstrip() for line in capsys.readouterr().out.splitlines()}
    quoted = excerpt_lines(ROOT / "lessons" / "tokenizer.md")
    assert len(quoted) >= 10
    missing = [line for line in quoted if line not in printed]
    assert missing == []
