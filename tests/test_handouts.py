"""The handouts are checked against the code.

- Every command in a fenced shell block of the README, lessons/README.md and every handout runs, in
  its cheapest real form: lessons parse their options and start (each lesson's --quick run is checked
  in test_lessons.py); training, evaluation, sampling, growing, tracing, figures and the tokenizer run
  with a few steps; long benchmarks show their help, which must name every option the command uses.
  A command no rule knows fails the test.
- Every quoted output excerpt (a ```text block) is a run of lines of one real output: the lesson's
  --quick run, or a recorded full run (lessons/recorded/*.txt) whose command the handout gives.
- Every handout opens with prerequisites and three takeaways, and ends with three self-check questions
  whose answers are folded in <details>; none cites files the project does not ship.
"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

from lesson_runs import (PENDING, HANDOUTS, REPO, excerpt_blocks, lesson_param, quick_run, recordings,
                         shell_commands, split_commands)
from tinyfractal.lessons import discover

LESSON_NAMES = [lesson.name for lesson in discover()]
HANDOUT_FILES = sorted(p for p in HANDOUTS.glob("*.md") if p.stem in LESSON_NAMES)
DOCUMENTS = [REPO / "README.md", HANDOUTS / "README.md"] + HANDOUT_FILES
ENV_PREFIX = re.compile(r"^(?:[A-Z_]+=\S*\s+)+")
WRAPPERS = [re.compile(r"^nice(?:\s+-n\s*-?\d+)?\s+"), re.compile(r"^/usr/bin/time(?:\s+-v)?\s+"),
            re.compile(r"^time\s+"), re.compile(r"^srun\s+")]
# Checked through --help: several hosts or devices, or the JAX engine, whose compile alone takes tens of
# seconds (tests/test_jax.py runs it).
CHECKED_BY_HELP = ("--distributed", "--model-axis", "--backend")
HELP_ONLY = {"tinyfractal.bench", "tinyfractal.infer_bench", "tinyfractal.tools.bench", "tinyfractal.tools.infer_bench"}
SKIPPED = [re.compile(r"^(?:python -m )?pip install "), re.compile(r"^python -m pytest\b"),
           re.compile(r"^python tests/mutants\.py"), re.compile(r"^cd\s")]


def ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def plain(command):
    """A command without environment variables, nice or time in front: what actually runs."""
    command = ENV_PREFIX.sub("", command.strip())
    changed = True
    while changed:
        changed = False
        for wrapper in WRAPPERS:
            stripped = wrapper.sub("", command)
            changed, command = changed or stripped != command, stripped
    return command


def words(command):
    """shlex words, with optional options written [--like this] taken as given."""
    return shlex.split(re.sub(r"\[(-[^\]]*)\]", r"\1", command))


def set_option(argv, name, value):
    """argv with option `name` set to value (replaced if present, appended if not)."""
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == name:
            skip = True
            continue
        if word.startswith(name + "="):
            continue
        out.append(word)
    return out + [name, value]


def call(main, argv, capsys):
    """Run main(argv) in-process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code or 0, captured.out, captured.err


def check_lesson(name, argv, capsys, monkeypatch):
    """A lesson command: its options parse and the lesson starts (the body is replaced by a recorder).
    A lesson not yet on the shared helpers (PENDING "workflow") shows its --help, which must name
    every option the command uses."""
    if name == "NAME":                       # the generic form of lessons/README.md
        return
    assert name in LESSON_NAMES, f"no lesson {name!r}"
    if "workflow" in PENDING.get(name, ()):
        return check_help(f"tinyfractal.lessons.{name}", ["--"] + argv, capsys)
    module = importlib.import_module(f"tinyfractal.lessons.{name}")
    seen = []
    monkeypatch.setattr(module, "lesson", seen.append)
    code, out, err = call(module.main, argv, capsys)
    assert code == 0 and err == "" and len(seen) == 1, err
    args = seen[0]
    assert args.out == (Path(argv[argv.index("--out") + 1]) if "--out" in argv else
                        Path("lesson_output") / (f"{name}-quick" if args.quick else name))


def check_cli(argv, capsys):
    """`python -m tinyfractal COMMAND ...`, made cheap: few steps and batches, short samples."""
    from tinyfractal.cli import main
    command = argv[0]
    if any(flag in argv for flag in CHECKED_BY_HELP):
        return check_help("tinyfractal.cli", argv, capsys)
    if "--ckpt" in argv:
        path = argv[argv.index("--ckpt") + 1]
        lesson = re.fullmatch(r"lesson_output/(\w+)/checkpoint", path)
        if lesson and not Path(path).exists():   # a lesson's model: its --quick run's stands in for it
            argv = set_option(argv, "--ckpt", str(quick_run(lesson.group(1)).folder / "checkpoint"))
    if command == "train":
        argv = set_option(argv, "--steps", "2") + ["--eval_batches=1", "--batch_size=2", "--log_interval=1"]
    elif command == "eval":
        argv = set_option(set_option(argv, "--batches", "1"), "--batch-size", "2")
    elif command == "sample":
        argv = set_option(argv, "--max-new-tokens", "3")
    elif command == "grow":
        argv = set_option(argv, "--steps-per-stage", "1") + ["--eval_batches=1", "--batch_size=2"]
    elif command not in ("trace", "figures"):
        raise AssertionError(f"no rule to check `python -m tinyfractal {command}`: add one to {__file__}")
    code, out, err = call(main, argv, capsys)
    assert code == 0, err
    assert out, "the command printed nothing"


def check_help(module, argv, capsys):
    """A long benchmark: its --help (of the subcommand, if any) runs and names every option used."""
    main = importlib.import_module(module).main
    sub = [w for w in argv[:1] if not w.startswith("-")]
    argv = [w for w in argv if w != "--"]
    code, out, err = call(main, sub + ["--help"], capsys)
    assert code == 0 and "usage:" in out, err
    for word in argv:
        if word.startswith("--") and "=" not in word:        # --key=value overrides are not in the help
            assert word in out, f"`{module} {' '.join(sub)}` has no option {word}"


def check_study(argv, capsys):
    """`python -m tinyfractal.study`: `tax` in its --quick form (seconds; the same flags and overrides),
    `table` as written (it reads the tax.json files the commands before it wrote)."""
    from tinyfractal.tools.study import main
    if argv[:1] == ["tax"]:
        argv = argv + ["--quick"]
    code, out, err = call(main, argv, capsys)
    assert code == 0, err
    assert out, "the command printed nothing"


def check_command(command, capsys, monkeypatch):
    run = plain(command)
    if any(p.search(run) for p in SKIPPED):
        return
    argv = words(run)
    if argv[0] == "gcloud":                 # a remote launcher: the command it runs on the hosts is checked
        remote = [w.split("=", 1)[1] for w in argv if w.startswith("--command=")]
        assert remote, f"no --command=... in `{command}`"
        for inner in split_commands(remote[0]):
            check_command(inner, capsys, monkeypatch)
        return
    if argv[:2] == ["python", "-c"]:        # a snippet: it must compile (it may need a trained model)
        compile(argv[2], f"<{command[:40]}...>", "exec")
        return
    assert argv[:2] == ["python", "-m"], f"no rule to check `{command}`: add one to {__file__}"
    module, rest = argv[2], argv[3:]
    if module.startswith("tinyfractal.lessons."):
        check_lesson(module.rsplit(".", 1)[1], rest, capsys, monkeypatch)
    elif module == "tinyfractal.lessons":
        if rest and not rest[0].startswith("-"):
            check_lesson(rest[0], rest[1:], capsys, monkeypatch)
        else:
            from tinyfractal.lessons.__main__ import main
            assert call(main, rest, capsys)[0] == 0
    elif module == "tinyfractal":
        check_cli(rest, capsys)
    elif module in HELP_ONLY:
        check_help(module, rest, capsys)
    elif module in ("tinyfractal.tokenizer", "tinyfractal.text.bpe"):
        from tinyfractal.text.bpe import main
        assert "--check" in rest, f"only the tokenizer's --check form is run here: `{command}`"
        assert call(main, rest, capsys)[0] == 0
    elif module in ("tinyfractal.study", "tinyfractal.tools.study"):
        check_study(rest, capsys)
    elif module == "tinyfractal.exercises":
        main = importlib.import_module("tinyfractal.exercises.__main__").main
        code, out, err = call(main, rest, capsys)
        assert code in ((0, 1) if rest[:1] == ["check"] else (0,)) and "Traceback" not in err, err
    else:
        raise AssertionError(f"no rule to check `{command}`: add one to {__file__}")


@pytest.mark.parametrize("document", DOCUMENTS, ids=ids(DOCUMENTS))
def test_every_command_runs(document, tmp_path, monkeypatch, capsys):
    """Each fenced command of the document, in order, from one scratch folder (so `train --out runs/x`
    followed by `eval --ckpt runs/x` works as it does for a reader)."""
    commands = shell_commands(document)
    assert commands, f"{document.name} gives no command"
    monkeypatch.chdir(tmp_path)
    for command in commands:
        check_command(command, capsys, monkeypatch)


def sources(handout):
    """The outputs an excerpt of this handout may quote: {description: lines}."""
    out = {}
    if handout.stem in LESSON_NAMES:
        out[f"the --quick run of {handout.stem}"] = [line.rstrip() for line in quick_run(handout.stem).out.splitlines()]
    given = {plain(c) for c in shell_commands(handout)}
    for command, lines in recordings().items():
        if command in given:
            out[f"the recording of `{command}`"] = lines
    return out


def contains_in_order(lines, block):
    """True if the block's lines all occur in `lines`, in the same order."""
    position = 0
    for line in block:
        try:
            position = lines.index(line, position) + 1
        except ValueError:
            return False
    return True


@pytest.mark.parametrize("handout", [lesson_param(p.stem, "excerpts", p) for p in HANDOUT_FILES])
def test_every_excerpt_is_real_output(handout):
    """Each ```text block of the handout is found, line for line and in order, in one real output."""
    blocks = excerpt_blocks(handout)
    assert blocks, f"{handout.name} quotes no output"
    found = sources(handout)
    for block in blocks:
        where = [name for name, lines in found.items() if contains_in_order(lines, block)]
        assert where, (f"{handout.name}: this excerpt is in no output of {sorted(found)}:\n" + "\n".join(block) +
                       "\n(record a full run with python -m tinyfractal.lessons._record NAME, give its command in the "
                       "handout, and quote it as printed)")


def test_recordings_match_todays_sections():
    """A recorded lesson run has the section headers that the lesson prints today (numbers masked), so a
    change to a lesson's story shows up as a stale recording."""
    def headers(lines):
        rule = "=" * 78
        return [re.sub(r"\d+", "#", line) for before, line, after in zip(lines, lines[1:], lines[2:])
                if before == rule and after == rule]
    for command, lines in recordings().items():
        name = command.split("tinyfractal.lessons.")[-1] if command.startswith("python -m tinyfractal.lessons.") else None
        if name not in LESSON_NAMES:
            continue
        quick = quick_run(name).out.splitlines()
        assert headers(lines) == headers(quick), f"lessons/recorded/{name}.txt is stale: re-record it"


def section_titles(text):
    return re.findall(r"^## (.+)$", text, flags=re.M)


@pytest.mark.parametrize("handout", [lesson_param(p.stem, "handout", p) for p in HANDOUT_FILES])
def test_handout_opens_with_prerequisites_and_three_takeaways(handout):
    text = handout.read_text(encoding="utf-8")
    opening = text.split("\n## ", 1)[0]
    assert opening.startswith("# "), "a handout starts with its title"
    assert re.search(r"\*\*Prerequisites[:.]\*\*", opening), "the opening states the prerequisites"
    takeaways = re.split(r"\*\*Takeaways[:.]\*\*", opening, maxsplit=1)
    assert len(takeaways) == 2, "the opening lists the takeaways"
    assert re.findall(r"^(\d+)\. ", takeaways[1], flags=re.M) == ["1", "2", "3"]


@pytest.mark.parametrize("handout", [lesson_param(p.stem, "handout", p) for p in HANDOUT_FILES])
def test_handout_ends_with_three_self_check_questions_and_folded_answers(handout):
    text = handout.read_text(encoding="utf-8")
    assert section_titles(text)[-1] == "Self-check"
    last = text.rsplit("\n## Self-check\n", 1)[1]
    questions = re.findall(r"^(\d+)\. ", last, flags=re.M)
    assert questions == ["1", "2", "3"]
    answers = re.findall(r"<details><summary>Answer</summary>(.*?)</details>", last, flags=re.S)
    assert len(answers) == 3 and all(a.strip() for a in answers)


@pytest.mark.parametrize("document", DOCUMENTS, ids=ids(DOCUMENTS))
def test_no_document_cites_files_the_project_does_not_ship(document):
    text = document.read_text(encoding="utf-8")
    outside = ["SPEC" + ".md", "STYLE" + ".md", "SPEC" + " §"]   # developer files the repository does not ship
    assert not any(name in text for name in outside)


@pytest.mark.parametrize("document", [HANDOUTS / "README.md"] + HANDOUT_FILES, ids=ids([HANDOUTS / "README.md"] + HANDOUT_FILES))
def test_the_course_names_only_files_that_exist(document):
    for path in re.findall(r"`((?:tinyfractal|tests)/[\w/]+\.py)`", document.read_text(encoding="utf-8")):
        assert (REPO / path).exists(), f"{document.name} names {path}, which does not exist"
