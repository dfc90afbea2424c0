"""The mutation harness cannot rot unnoticed: every mutant of tests/mutants.py still applies to today's code.

A mutant patches the source text of one function; when the code moves or changes, the patch no longer
applies and `python tests/mutants.py` would only report it as "n/a" after minutes of running. Here each
mutant is built (its source edits found and compiled, every attribute it replaces present) without
being installed and without running any law's tests: a second or two for all of them.
"""
import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

import mutants

HERE = Path(__file__).resolve().parent
# Every module a mutant patches, loaded first: replace_everywhere counts the references it would repoint.
MODULES = ["tinyfractal", "tinyfractal.core.fast", "tinyfractal.core.ops", "tinyfractal.core.formulas",
           "tinyfractal.inference.decoder", "tinyfractal.variants.coupled", "tinyfractal.variants.byte_model",
           "tinyfractal.training.checkpoint", "tinyfractal.text.bpe", "tinyfractal.config"]


@pytest.fixture(scope="module", autouse=True)
def loaded():
    for name in MODULES:
        importlib.import_module(name)


def snapshot():
    """What a mutant could change: every attribute of the package's modules (and of their classes), and
    the VJP makers of every autograd primitive."""
    from autograd.core import primitive_vjps
    out = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("tinyfractal") and module is not None:
            for attr, value in vars(module).items():
                out[(name, attr)] = id(value)
                if inspect.isclass(value) and value.__module__ == name:
                    out.update({(name, attr, k): id(v) for k, v in vars(value).items()})
    out["vjps"] = {id(k): id(v) if callable(v) else {n: id(f) for n, f in v.items()} for k, v in primitive_vjps.items()}
    return out


@pytest.mark.parametrize("name", sorted(mutants.MUTANTS))
def test_every_mutant_still_applies_and_a_dry_run_changes_nothing(name):
    """Rot law: mutant `name` builds against today's code (else NotApplicable says what moved), and building
    it in a dry run installs nothing."""
    before = snapshot()
    mutants.build(name)
    assert snapshot() == before


def test_a_mutant_whose_code_moved_is_reported_not_applicable():
    """The check can fail: a rewrite whose source text is gone, or a missing attribute, is NotApplicable."""
    tree = importlib.import_module("tinyfractal.core.tree")
    with mutants.dry_run():
        with pytest.raises(mutants.NotApplicable, match="expected 1"):
            mutants.rewrite(tree, "children", "text that is not in children", "x")
        with pytest.raises(mutants.NotApplicable, match="no attribute"):
            mutants.install(tree, "no_such_function", None)
        with pytest.raises(mutants.NotApplicable, match="nothing refers"):
            mutants.replace_everywhere(object(), None)


def test_every_mutant_is_in_the_plan_and_every_plan_row_names_a_law():
    """Every mutant function of tests/mutants.py is run by some law, and every row of the plan names a law."""
    defined = {name for name, fn in vars(mutants).items()
               if inspect.isfunction(fn) and fn.__module__ == "mutants" and fn.__doc__
               and not inspect.signature(fn).parameters and name not in ("main", "dry_run")}
    assert defined == set(mutants.MUTANTS)
    laws = {law.number for law in mutants.LAWS}
    assert all(number in laws for number, _, _, _ in mutants.PLAN)
    assert laws == {number for number, _, _, _ in mutants.PLAN}


def names_of_tests(path):
    return [node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


def selects(expression, name):
    """pytest's -k on a test name: words are substrings, joined by and, or, not, parentheses."""
    words = re.findall(r"\w+|[()]", expression)
    python = " ".join(w if w in ("and", "or", "not", "(", ")") else repr(w.lower() in name.lower()) for w in words)
    return eval(python)


@pytest.mark.parametrize("law", mutants.LAWS, ids=lambda law: f"law{law.number}")
def test_every_law_selects_tests_that_exist(law):
    """Each law's files exist, and its -k expression (and each row's own) picks at least one of their tests."""
    names = [n for f in law.files.split() for n in names_of_tests(HERE / f)]
    assert names, law.files
    for select in {law.select} | {row[2] for row in mutants.PLAN if row[0] == law.number and row[2]}:
        assert any(selects(select, n) for n in names), (law.name, select)
