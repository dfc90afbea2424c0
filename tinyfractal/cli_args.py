"""What every command line of the package shares: one argument parser, one way to report a mistake, and
the `--key=value` overrides.

`python -m tinyfractal ...` (cli.py), the benchmarks (tools/bench.py, tools/infer_bench.py) and the
tokenizer's command (text/bpe.py) all parse with `Parser` and report with `fail`, so a usage mistake
anywhere is ONE line on stderr, `error: ...`, and exit code 2, never a usage dump or a traceback.
This module imports nothing of the package, so any module, however low in the stack, may use it.
"""
import argparse
import dataclasses
import functools
import sys


class UsageError(ValueError):
    """A mistake on the command line: reported by `fail` as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake raises UsageError (naming the program) instead of printing the usage
    and exiting, so the command's `main` reports it like any other bad input (see `reporting`)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def fail(message):
    """Print `error: message` as one line on stderr; returns the exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def reporting(main):
    """Decorate a command's `main(argv) -> exit code` so that bad input (ValueError, which includes
    UsageError, or a missing file) and Ctrl-C end it with `fail`: one line on stderr, exit code 2."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            return fail(e)
        except KeyboardInterrupt:
            return fail("interrupted")
    return wrapped


def parse_overrides(extra):
    """['--lr=0.01', '--levels=2'] -> {'lr': '0.01', 'levels': '2'}; anything else is a UsageError."""
    out = {}
    for item in extra:
        if not item.startswith("--") or "=" not in item:
            raise UsageError(f"unrecognised argument {item!r}; overrides are written --key=value")
        key, value = item[2:].split("=", 1)
        out[key.replace("-", "_")] = value
    return out


def split_overrides(overrides, *targets):
    """Send each override to the dataclass that has a field of that name.

    targets are (what, dataclass) pairs, e.g. ("model", Config), ("training", TrainConfig); returns one
    dict per target, in order. A name no target has is a UsageError listing every allowed name.
    """
    fields = [(what, {f.name for f in dataclasses.fields(cls)}) for what, cls in targets]
    out = [{} for _ in targets]
    for key, value in overrides.items():
        where = next((i for i, (_, names) in enumerate(fields) if key in names), None)
        if where is None:
            allowed = ", ".join(f"{what} settings are {sorted(names)}" for what, names in fields)
            raise UsageError(f"unknown setting --{key}; {allowed}")
        out[where][key] = value
    return out
