"""Where the repository's shipped files live: the corpus and the trained tokenizer."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "input.txt"
TOKENIZER = ROOT / "tokenizer" / "tokenizer.json"
