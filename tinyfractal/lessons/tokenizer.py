"""Lesson 2, the tokenizer: how 65 characters become 128 tokens, one merge at a time.

Run: python -m tinyfractal.lessons.tokenizer [--quick] [--out DIR]

It trains the character-pair BPE of the original from scratch on input.txt, printing the merges as
they happen, measures the compression, encodes and decodes a line token by token, shows why an
unknown character is refused, and saves two figures.
"""
import time

from tinyfractal.lessons._common import conclude, pyplot, run, save_figure, section
from tinyfractal.paths import CORPUS, TOKENIZER
from tinyfractal.text.bpe import Tokenizer, train
from tinyfractal.tools.plots import merge_counts

LINE = "First Citizen:\nBefore we proceed any further, hear me speak."
UNKNOWN = 'JULIET: "Adieu, café!"'
SHOWN = 20  # merges printed as they happen (then only the last few)
QUICK_CHARS, QUICK_MERGES = 100_000, 20


def main(argv=None):
    return run("tokenizer", __doc__, lesson, argv)


def lesson(args):
    text, chars = the_alphabet(args)
    tok, merges = training(args, text, chars)
    lengths = compression(text, tok, merges)
    token_by_token(tok)
    unknown_characters(tok)
    section("6. Figures")
    for path in (merge_counts(merges, args.out / "merge_counts.png"),
                 compression_figure(len(text), lengths, args.out / "compression.png")):
        print(f"saved {path}")


def shown(s):
    """A token's text with newlines and spaces visible: 'th', '_', '\\n'."""
    return repr(s)[1:-1].replace(" ", "_")


def the_alphabet(args):
    """Section 1: the corpus, and its distinct characters, which are the base tokens."""
    section("1. The corpus: every character it holds is a base token")
    text = CORPUS.read_text(encoding="utf-8")
    if args.quick:
        text = text[:QUICK_CHARS]
    chars = sorted(set(text))
    print(f"{CORPUS.name}: {len(text):,} characters{f' (the first {QUICK_CHARS:,}, --quick)' if args.quick else ''}.")
    print(f"It holds {len(chars)} distinct characters; sorted, they are the base tokens 0..{len(chars) - 1}:")
    print("  " + " ".join(shown(c) for c in chars))
    print("(shown with '_' for a space and \\n for a newline). One token per character would make "
          f"the text {len(text):,} tokens long.")
    return text, chars


def training(args, text, chars):
    """Section 2: BPE training, merge by merge: (tokenizer, [(rank, pair, count)])."""
    num_merges = QUICK_MERGES if args.quick else 63
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
    conclude(args, "Each merge fires less often than the one before (the counts go down), because the most\n"
                   "frequent pair is always taken first: see merge_counts.png.")
    return tok, merges


def compression(text, tok, merges):
    """Section 3: each merge shortens the text by its count; predicted against encoded lengths."""
    section("3. Compression: characters per token")
    print("A merge replaces every one of its `count` pairs by a single token, so it makes the text\n"
          "exactly `count` tokens shorter: after k merges the text is len(text) - (sum of the first k counts).")
    lengths = [len(text)]
    for _, _, count in merges:
        lengths.append(lengths[-1] - count)
    n = len(merges)
    print(f"{'merges':>7} {'predicted':>10} {'encoded':>10}  characters per token")
    for k in sorted({0, n // 4, n // 2, 3 * n // 4, n}):
        encoded = len(Tokenizer(tok.chars, tok.merges[:k]).encode_array(text))
        print(f"{k:7d} {lengths[k]:10,d} {encoded:10,d}  {len(text) / encoded:.3f}")
    print(f"With all {n} merges a context of 64 tokens covers about {64 * len(text) / lengths[-1]:.0f} characters "
          f"instead of 64.")
    return lengths


def token_by_token(tok):
    """Section 4: one line encoded, token by token, and decoded back."""
    section("4. Encoding and decoding a line, token by token")
    ids = tok.encode(LINE)
    print(f"The line {LINE!r}\nhas {len(LINE)} characters and encodes to {len(ids)} tokens:")
    print(f"{'pos':>4} {'id':>4}  token")
    for pos, i in enumerate(ids):
        kind = "base character" if i < len(tok.chars) else f"merge {i - len(tok.chars)}"
        print(f"{pos:4d} {i:4d}  {shown(tok.token_strings[i]):<8} ({kind})")
    print("Token boundaries: " + "|".join(shown(tok.token_strings[i]) for i in ids))
    print(f"decode(encode(line)) == line: {tok.decode(ids) == LINE}")


def unknown_characters(tok):
    """Section 5: a character outside the alphabet is refused with its position."""
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


def compression_figure(n_chars, lengths, path):
    """Characters per token after the first k merges, for every k."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(range(len(lengths)), [n_chars / n for n in lengths], marker=".")
    ax.set_xlabel("number of merges")
    ax.set_ylabel("characters per token")
    ax.set_title("BPE compression of input.txt")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
