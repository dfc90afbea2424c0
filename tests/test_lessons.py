"""Every lesson runs (--quick), has a handout, and is in the course outline; the index lists them all;
lessons run by name, and a wrong name or a bad option is one line on stderr with exit code 2.

The lessons are discovered from tinyfractal/lessons, so a lesson added there is tested with no edit here.
"""
import importlib
import re
import subprocess
import sys

import pytest

from lesson_runs import REPO, env, lesson_param, quick_run
from tinyfractal.lessons import ORDER, discover
from tinyfractal.lessons.__main__ import main as index_main
from tinyfractal.lessons._common import QUICK_BANNER

LESSONS = discover()
README = REPO / "lessons" / "README.md"


def test_discovery_finds_the_lesson_modules():
    """discover() returns every public module file of tinyfractal/lessons, known ones in course order."""
    files = sorted(p.stem for p in (REPO / "tinyfractal" / "lessons").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(lesson.name for lesson in LESSONS) == files
    known = [lesson.name for lesson in LESSONS if lesson.name in ORDER]
    assert known == sorted(known, key=ORDER.index)
    assert {"base", "tokenizer"} <= set(files)


@pytest.mark.parametrize("lesson", [lesson_param(lesson.name, "workflow", lesson) for lesson in LESSONS])
def test_lesson_runs_quick_and_saves_figures(lesson):
    """`python -m tinyfractal.lessons.NAME --quick --out DIR` exits 0 with nothing on stderr, opens with the
    one-line quick banner (printed once), tells its story in sections and saves its figures into DIR."""
    run = quick_run(lesson.name)
    assert run.code == 0, run.err
    assert run.err == ""
    lines = run.out.splitlines()
    assert lines[0] == QUICK_BANNER and run.out.count(QUICK_BANNER) == 1
    assert "plumbing check" in QUICK_BANNER and "mean nothing" in QUICK_BANNER
    assert len(lines) > 10 and sum(line.startswith("=" * 78) for line in lines) >= 4
    assert list(run.folder.rglob("*.png")), "a lesson saves its figures into --out"
    assert re.fullmatch(rf"Lesson done in \S+; outputs in {re.escape(str(run.folder))}/", lines[-1]), lines[-1]


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.name for lesson in LESSONS])
def test_every_lesson_has_a_handout_and_a_place_in_the_outline(lesson):
    """lessons/NAME.md exists, gives the command and exercises; lessons/README.md links it."""
    assert lesson.handout.exists(), f"missing handout {lesson.handout.relative_to(REPO)}"
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


def test_a_lesson_runs_by_name_and_writes_to_its_quick_folder(tmp_path, monkeypatch, capsys):
    """`python -m tinyfractal.lessons tokenizer --quick` runs the lesson; with no --out, a quick run writes
    to lesson_output/tokenizer-quick/ and never to the full run's lesson_output/tokenizer/."""
    monkeypatch.chdir(tmp_path)
    assert index_main(["tokenizer", "--quick"]) == 0
    assert capsys.readouterr().out.startswith(QUICK_BANNER)
    assert (tmp_path / "lesson_output" / "tokenizer-quick" / "merge_counts.png").exists()
    assert not (tmp_path / "lesson_output" / "tokenizer").exists()


def one_line_error(err):
    """The CLI's error style: exactly one line on stderr, 'error: ...', no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_wrong_lesson_name_gets_did_you_mean(capsys):
    """`python -m tinyfractal.lessons bse` -> one line naming 'base', exit code 2."""
    assert index_main(["bse"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "did you mean 'base'" in line


def test_a_wrong_lesson_module_gets_did_you_mean():
    """`python -m tinyfractal.lessons.bse` (a typo in the module name) -> one line naming 'base', exit 2;
    importing a missing lesson module from Python is still an ImportError."""
    p = subprocess.run([sys.executable, "-m", "tinyfractal.lessons.bse"], capture_output=True, text=True,
                       env=env(), cwd=REPO, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert "did you mean 'base'" in one_line_error(p.stderr)
    with pytest.raises(ImportError):
        importlib.import_module("tinyfractal.lessons.bse")


def test_a_missing_checkpoint_is_one_line(tmp_path):
    """`python -m tinyfractal.lessons.speculative --ckpt runs/nope` -> one line naming it, exit code 2."""
    p = subprocess.run([sys.executable, "-m", "tinyfractal.lessons.speculative", "--ckpt", "runs/nope"],
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=60)
    assert p.returncode == 2
    assert "runs/nope" in one_line_error(p.stderr)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "x"], ["--bogus"], ["--seed"]])
def test_bad_options_are_one_line(argv, capsys):
    """A bad option of a lesson (or of the lesson index) is one line on stderr and exit code 2, as in
    the CLI."""
    assert importlib.import_module("tinyfractal.lessons.base").main(argv) == 2
    one_line_error(capsys.readouterr().err)
    assert index_main(argv) == 2
    one_line_error(capsys.readouterr().err)


def test_quick_runs_skip_the_conclusions_their_numbers_cannot_support():
    """base --quick prints no verdict on stuck models or on the levels; merging --quick no compute saving.
    (The same sentences are in the recorded full runs, so the test cannot pass by a change of wording.)"""
    from lesson_runs import recordings
    full = {command: "\n".join(lines) for command, lines in recordings().items()}
    for name, phrases in {"base": ["models whose sample is one repeated character",
                                   "models are at least 0.5 nats below the unigram entropy"],
                          "merging": ["of the compute saved", "The other way round"]}.items():
        quick = quick_run(name).out
        for phrase in phrases:
            assert phrase not in quick
            assert phrase in full[f"python -m tinyfractal.lessons.{name}"]
