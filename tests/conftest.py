"""Shared test settings: hypothesis profiles, the opt-in marker for slow runs, and mutants.

HYPOTHESIS_PROFILE=thorough runs many more examples than the default profile that CI uses (the law
tests, tests/test_laws_*.py, take ten times their default counts; see strategies.examples).
HYPOTHESIS_PROFILE=mutants is the default profile made repeatable (fixed seed, no example database, no
shrinking), for tests/mutants.py, which sets TINYFRACTAL_MUTANT=name to run the suite against a broken engine.
"""
import os

import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("mutants", max_examples=25, deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    name = os.environ.get("TINYFRACTAL_MUTANT")
    if name:
        import mutants
        try:
            mutants.activate(name)
        except mutants.NotApplicable as e:
            pytest.exit(f"mutant {name} does not apply: {e}", returncode=3)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
