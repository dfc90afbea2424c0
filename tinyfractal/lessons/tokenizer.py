"""Lesson 2, the tokenizer: how 65 characters become 128 tokens, one merge at a time.

Run: python -m tinyfractal.lessons.tokenizer [--quick] [--out DIR]

It trains the character-pair BPE of the original from scratch on input.txt, printing the merges as
they happen, measures the compression, encodes and decodes a line token by token, shows why an
unknown character is refused, and saves two figures.
"""
import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tinyfractal.paths import CORPUS, TOKENIZER  # noqa: E402
from tinyfractal.tools.plots import merge_counts  # noqa: E402
from tinyfractal.text.bpe import Tokenizer, train  # noqa: E402

LINE = "First Citizen:\nBefore we proceed any further, hear me speak."
UNKNOWN = 'JULIET: "Adieu, café!"'
SHOWN = 20  # merges printed as they happen (then only the last few)


def section(title):
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tinyfractal.lessons.tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lesson_output/tokenizer", help="folder for the figures")
    p.add_argument("--quick", action="store_true", help="train on the first 100,000 characters, 20 merges")
    return p.parse_args(argv)


def shown(s):
    """A token's text with newlines and spaces visible: 'th', '_', '\\n'."""
    return repr(s)[1:-1].replace(" ", "_")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # %% 1. The corpus and its alphabet
    section("1. The corpus: every character it holds is a base token")
    text = CORPUS.read_text(encoding="utf-8")
    if args.quick:
        text = text[:100_000]
    num_merges = 20 if args.quick else 63
    chars = sorted(set(text))
    print(f"{CORPUS.name}: {len(text):,} characters{' (the first 100,000, --quick)' if args.quick else ''}.")
    print(f"It holds {len(chars)} distinct characters; sorted, they are the base tokens 0..{len(chars) - 1}:")
    print("  " + " ".join(shown(c) for c in chars))
    print("(shown with '_' for a space and \\n for a newline). One token per character would make "
          f"the text {len(text):,} tokens long.")

    # %% 2. Training: merge the most frequent pair, again and again
    section(f"2. Training: {num_merges} merges, each one the most frequent adjacent pair")
    print("Rule of the original: a pair may merge only if both sides are all letters, or both are all\n"
          "non-letters, so 'e' + ' ' never merges and every token is a run of letters or of non-letters.")
    print(f"\n{'rank':>4} {'new id':>6}  {'left':>6} + {'right':<6} -> {'token':<8} {'count':>7}")
    merges = []

    def on_merge(rank, pair, count):
        merges.append((rank, pair, count))
        a, b = pair
        if rank < SHOWN or rank >= num_merges - 3:
            print(f"{rank:4d} {len(chars) + rank:6d}  {shown(a):>6} + {shown(b):<6} -> {shown(a + b):<8} {count:7,d}")
        elif rank == SHOWN:
            print(f"{'...':>4}")

    t0 = time.perf_counter()
    tok = train(text, num_merges, on_merge=on_merge)
    print(f"\nTrained in {time.perf_counter() - t0:.2f} s: {tok}.")
    if not args.quick:
        same = tok.to_json() == Tokenizer.load(TOKENIZER).to_json()
        print(f"Identical to the committed {TOKENIZER.parent.name}/{TOKENIZER.name} that the models use: {same}.")
    print("Each merge fires less often than the one before (the counts go down), because the most\n"
          "frequent pair is always taken first: see merge_counts.png.")

    # %% 3. Compression
    section("3. Compression: characters per token")
    print("A merge replaces every one of its `count` pairs by a single token, so it makes the text\n"
          "exactly `count` tokens shorter: after k merges the text is len(text) - (sum of the first k counts).")
    lengths = [len(text)]
    for _, _, count in merges:
        lengths.append(lengths[-1] - count)
    steps = sorted({0, num_merges // 4, num_merges // 2, 3 * num_merges // 4, num_merges})
    print(f"{'merges':>7} {'predicted':>10} {'encoded':>10}  characters per token")
    for k in steps:
        n = len(Tokenizer(tok.chars, tok.merges[:k]).encode_array(text))
        print(f"{k:7d} {lengths[k]:10,d} {n:10,d}  {len(text) / n:.3f}")
    ratio = len(text) / lengths[-1]
    print(f"With all {num_merges} merges a context of 64 tokens covers about {64 * ratio:.0f} characters "
          f"instead of 64.")

    # %% 4. A line, token by token
    section("4. Encoding and decoding a line, token by token")
    ids = tok.encode(LINE)
    print(f"The line {LINE!r}\nhas {len(LINE)} characters and encodes to {len(ids)} tokens:")
    print(f"{'pos':>4} {'id':>4}  token")
    for pos, i in enumerate(ids):
        kind = "base character" if i < len(tok.chars) else f"merge {i - len(tok.chars)}"
        print(f"{pos:4d} {i:4d}  {shown(tok.token_strings[i]):<8} ({kind})")
    print("Token boundaries: " + "|".join(shown(tok.token_strings[i]) for i in ids))
    back = tok.decode(ids)
    print(f"decode(encode(line)) == line: {back == LINE}")

    # %% 5. What the tokenizer cannot read
    section("5. An unknown character is refused, not guessed")
    print(f"Try to encode {UNKNOWN!r}:")
    try:
        tok.encode(UNKNOWN)
        print("  encoded (this corpus holds every character of it)")
    except ValueError as e:
        print(f"  ValueError: {e}")
    print("The vocabulary is exactly the characters of input.txt plus merges of them: there is no\n"
          "'unknown' token and no byte fallback, and the model has one embedding row per token, so a\n"
          "character it has never seen has no row. Refusing with the character and its position is\n"
          "better than silently dropping it. (The bytes lesson reads raw bytes, so it accepts any text.)")

    # %% 6. Figures
    section("6. Figures")
    for path in (merge_counts(merges, out / "merge_counts.png"), compression_figure(len(text), lengths, out / "compression.png")):
        print(f"saved {path}")
    return 0


def compression_figure(n_chars, lengths, path):
    """Characters per token after the first k merges, for every k."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(lengths)), [n_chars / n for n in lengths], marker=".")
    ax.set_xlabel("number of merges")
    ax.set_ylabel("characters per token")
    ax.set_title("BPE compression of input.txt")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
