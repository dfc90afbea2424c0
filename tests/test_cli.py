"""The command line: a table of commands imported only when one runs, one parser for every command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyfractal import cli
from tinyfractal.cli_args import Parser, UsageError, fail, parse_overrides, reporting, split_overrides
from tinyfractal.config import Config
from tinyfractal.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Runs `python -m tinyfractal ARGS` for each ARGS in one fresh interpreter, as runpy runs `-m`, and reports
# after each command its exit code and whether matplotlib has been imported by then.
LIGHT = """
import json, runpy, sys
seen = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["python -m tinyfractal", *argv]
    try:
        runpy.run_module("tinyfractal", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    seen.append([argv[0], code, "matplotlib" in sys.modules])
import tinyfractal.cli
tinyfractal.cli.build_parser("figures")          # the one command that draws: its module does import matplotlib
seen.append(["figures", None, "matplotlib" in sys.modules])
print(json.dumps(seen))
"""


def test_train_eval_and_sample_run_without_importing_matplotlib(tmp_path):
    """Lightness law: `python -m tinyfractal train`, then `eval --ckpt DIR` and `sample --ckpt DIR` on what it
    wrote, all exit 0 and none of them imports matplotlib; asking for `figures` does import it."""
    out = str(tmp_path / "run")
    commands = [["train", "--preset", "micro", "--steps", "2", "--out", out, "--eval_batches=1", "--eval_interval=2"],
                ["eval", "--ckpt", out, "--batches", "1", "--batch-size", "2"],
                ["sample", "--ckpt", out, "--prompt", "RO", "--max-new-tokens", "3"]]
    done = subprocess.run([sys.executable, "-c", LIGHT, json.dumps(commands)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == [["train", 0, False], ["eval", 0, False], ["sample", 0, False], ["figures", None, True]]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_of_the_table_declares_its_arguments_and_runner(name):
    """Each "module:function" of the table imports, declares its subparser's arguments and sets `run`,
    and `--help` of that command lists an argument it declared."""
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    assert callable(sub.get_default("run"))
    assert len(sub._actions) > 1                                  # more than -h
    assert sub.description                                       # the table's help, or the command's own


def test_the_table_loads_only_the_command_asked_for():
    """Building the parser for `eval` imports no other command's module: not tools/plots.py (nor so
    matplotlib), nor tools/bench.py (checked in a fresh process; grow and trace are in the public API)."""
    code = ("import sys, tinyfractal.cli as c; c.build_parser('eval'); "
            "print(' '.join(m for m in ('tinyfractal.tools.plots', 'tinyfractal.tools.bench', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_shared_parser_raises_a_usage_error_naming_the_program():
    """Parser turns argparse's usage dump into a UsageError (a ValueError) that names the program."""
    p = Parser(prog="prog")
    p.add_argument("--n", type=int)
    with pytest.raises(UsageError, match=r"^prog: argument --n: invalid int value: 'x'"):
        p.parse_args(["--n", "x"])
    assert issubclass(UsageError, ValueError)


def test_reporting_turns_bad_input_into_one_line_and_exit_2(capsys):
    """A command's ValueError, missing file or Ctrl-C ends as one `error: ...` line on stderr, exit code 2;
    a good run returns its own code."""
    def raising(error):
        @reporting
        def main(argv=None):
            raise error
        return main
    assert raising(ValueError("bad\nvalue"))() == 2
    assert raising(FileNotFoundError("no such file"))() == 2
    assert raising(KeyboardInterrupt())() == 2
    assert capsys.readouterr().err.splitlines() == ["error: bad value", "error: no such file", "error: interrupted"]
    assert reporting(lambda argv=None: 0)() == 0
    assert fail("x") == 2


def test_overrides_are_parsed_and_sent_to_the_dataclass_that_has_the_field():
    """--key=value pairs go to the first target with that field; anything else is a UsageError naming the
    allowed settings."""
    over = parse_overrides(["--levels=2", "--lr=0.1", "--batch-size=4"])
    assert over == {"levels": "2", "lr": "0.1", "batch_size": "4"}
    model, train = split_overrides(over, ("model", Config), ("training", TrainConfig))
    assert model == {"levels": "2"} and train == {"lr": "0.1", "batch_size": "4"}
    with pytest.raises(UsageError, match="overrides are written --key=value"):
        parse_overrides(["lr=1"])
    with pytest.raises(UsageError, match=r"unknown setting --nonsense; model settings are \[.*'levels'"):
        split_overrides({"nonsense": "1"}, ("model", Config), ("training", TrainConfig))


@pytest.mark.parametrize("module, argv", [
    ("tinyfractal.bench", ["--preset", "huge"]),
    ("tinyfractal.bench", ["--paths", "slow"]),
    ("tinyfractal.infer_bench", ["frobnicate"]),
    ("tinyfractal.infer_bench", ["cache", "--new", "x"]),
    ("tinyfractal.tokenizer", ["--merges", "-1"]),
    ("tinyfractal", ["train", "--out"]),
])
def test_every_command_line_reports_a_mistake_as_one_line_and_exit_2(module, argv):
    """The benchmarks, the tokenizer and the main CLI share the parser: one `error:` line, exit 2, no traceback."""
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
