"""`python -m tinyfractal.tokenizer`: the BPE tokenizer's command line, which lives in tinyfractal/text/bpe.py."""
from tinyfractal.text.bpe import main

if __name__ == "__main__":
    raise SystemExit(main())
