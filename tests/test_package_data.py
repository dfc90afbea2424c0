"""The corpus and the tokenizer ship with the package, so a plain (non-editable) `pip install .` works.

tinyfractal/data/ holds copies of the repository's input.txt and tokenizer/tokenizer.json; paths.py
uses the top-level files in a checkout and the copies in an installed package.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lesson_runs import REPO
from tinyfractal import paths
from tinyfractal.training.checkpoint import exists

COPIES = {REPO / "input.txt": REPO / "tinyfractal" / "data" / "input.txt",
          REPO / "tokenizer" / "tokenizer.json": REPO / "tinyfractal" / "data" / "tokenizer.json"}


def test_the_package_copies_equal_the_top_level_files():
    """tinyfractal/data/X is byte for byte the repository's file: after retraining the tokenizer (or
    editing the corpus), copy it there too."""
    for top, copy in COPIES.items():
        assert copy.read_bytes() == top.read_bytes(), f"{copy.relative_to(REPO)} differs from {top.relative_to(REPO)}"


def test_pyproject_ships_the_copies_as_package_data():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?=^\[|\Z)", text, flags=re.S | re.M)
    assert section is not None
    for copy in COPIES.values():
        assert f'"{copy.relative_to(REPO / "tinyfractal").as_posix()}"' in section.group(1)


def test_a_checkout_uses_its_top_level_files():
    assert paths.CORPUS == REPO / "input.txt"
    assert paths.TOKENIZER == REPO / "tokenizer" / "tokenizer.json"
    assert set(paths.SHIPPED_TOKENIZERS) == {REPO / "tokenizer" / "tokenizer.json", COPIES[REPO / "tokenizer" / "tokenizer.json"]}


def test_a_plain_install_runs_a_lesson_from_another_folder(tmp_path):
    """`pip install .` (not editable) of this repository's package alone (no top-level input.txt or
    tokenizer/ beside it) into a fresh venv runs `python -m tinyfractal.lessons.base --quick` in an
    unrelated folder, reading the corpus and the tokenizer from the installed package."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "tinyfractal", source / "tinyfractal", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                              str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import tinyfractal, tinyfractal.paths as p; "
                            "print(tinyfractal.__file__); print(p.CORPUS); print(p.TOKENIZER)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    package, corpus, tokenizer = where.stdout.split()
    installed = Path(package).parent
    assert installed.is_relative_to(venv), f"imported {package}, not the installed copy"
    assert Path(corpus) == installed / "data" / "input.txt" and Path(tokenizer) == installed / "data" / "tokenizer.json"
    lesson = subprocess.run([str(python), "-m", "tinyfractal.lessons.base", "--quick"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert lesson.returncode == 0 and lesson.stderr == "", lesson.stderr[-3000:]
    assert exists(elsewhere / "lesson_output" / "base-quick" / "checkpoint")
