"""Where the shipped files live: the corpus (input.txt) and the trained tokenizer (tokenizer.json).

In a checkout of the repository they are its top-level `input.txt` and `tokenizer/tokenizer.json`, the
files a reader sees and `python -m tinyfractal.tokenizer --check` compares with. An installed package
(`pip install .`, not editable) has no repository around it, so it carries copies as package data in
`tinyfractal/data/`; tests/test_package_data.py checks that the copies equal the top-level files.
The top-level file is used when it exists, the package's copy otherwise.
"""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent            # the repository in a checkout; site-packages in an installed package
DATA = PACKAGE / "data"


def _shipped(top_level, copy):
    """The checkout's file if there is one, else the package's copy."""
    return top_level if top_level.is_file() else copy


CORPUS = _shipped(ROOT / "input.txt", DATA / "input.txt")
TOKENIZER = _shipped(ROOT / "tokenizer" / "tokenizer.json", DATA / "tokenizer.json")
SHIPPED_TOKENIZERS = (ROOT / "tokenizer" / "tokenizer.json", DATA / "tokenizer.json")
