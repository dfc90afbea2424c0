"""Character-pair BPE: the tokenizer of the original, trained and applied with NumPy.

Base symbols are the sorted characters of the training text (65 for input.txt, ids 0-64). Each merge
joins two adjacent tokens into a new one (ids 65, 66, ...). The original's rule: a pair may merge only
if both sides are all letters or both sides are all non-letters, so "e" + " " never merges, and every
token is either a run of letters or a run of non-letters.

Training (`train`) runs over the whole text as one sequence, with no splitting on whitespace:
  - a pair's count is the number of times merging it would fire, i.e. its non-overlapping
    occurrences left to right ("aaa" holds ("a", "a") once, not twice);
  - the most frequent allowed pair merges; ties go to the smallest (id_a, id_b);
  - the merge replaces every occurrence, non-overlapping, left to right.
On input.txt this gives the prototype's list (docs/design.md): th, ", ", ou, er, in, an, ":\\n", the, ... Note that merge 10
("\\n\\n", 7096 times) ties with "en" (also 7096); the tie rule picks "\\n\\n" because "\\n" has id 0.
Counting overlapping occurrences instead gives "\\n\\n" 7098 and the same 63 merges with no tie.

Encoding is standard rank-order BPE: apply the merges in rank order, each everywhere, non-overlapping,
left to right. One pass per merge suffices because a merge only creates pairs that hold its new token,
and those have a higher rank. `encode_array` does this with NumPy; `encode_reference` is the plain
textbook loop ("merge the lowest-rank adjacent pair until none is left"), and the tests prove they agree.

Command line: python -m tinyfractal.text.bpe [--input input.txt] [--merges 63]
                                              [--out tokenizer/tokenizer.json] [--check]
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from tinyfractal.cli_args import Parser, UsageError, reporting
from tinyfractal.files import atomic_write_bytes
from tinyfractal.paths import CORPUS, TOKENIZER

DEFAULT_INPUT = CORPUS
DEFAULT_PATH = TOKENIZER
FORMAT = "tinyfractal-bpe"
VERSION = 1
MAX_LISTED = 10  # how many bad characters or ids an error message names before it says "and N more"


def _is_letters(s):
    """The original's class of a token: True if all its characters are letters (str.isalpha)."""
    return s.isalpha()


def _codepoints(text):
    """str of length T -> (T,) uint32 code points. surrogatepass lets lone surrogates through, so
    they get the 'unknown character' error instead of a UnicodeEncodeError."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _describe(items):
    """[(value, position), ...] -> "'é' at 3, '€' at 10" (at most MAX_LISTED, then 'and N more')."""
    shown = ", ".join(f"{v!r} at {i}" for v, i in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        shown += f" and {len(items) - MAX_LISTED} more"
    return shown


def _run_offsets(x):
    """(T,) ints -> (T,) offset of each position inside its run of equal symbols.
    Example: [7, 7, 7, 3, 7] -> [0, 1, 2, 0, 0]."""
    T = len(x)
    starts = np.ones(T, dtype=bool)
    starts[1:] = x[1:] != x[:-1]
    start_of_run = np.maximum.accumulate(np.where(starts, np.arange(T), 0))
    return np.arange(T) - start_of_run


def _merge_pair(x, a, b, new_id):
    """(T,) int32 -> (T',) int32 with every (a, b) replaced by new_id, non-overlapping, left to right.

    For a != b two matches can never overlap. For a == b a run of k copies of a holds k-1 overlapping
    matches; left to right takes those at even offsets in the run, k//2 in all."""
    hit = (x[:-1] == a) & (x[1:] == b)
    if a == b:
        hit &= _run_offsets(x)[:-1] % 2 == 0
    pos = np.flatnonzero(hit)
    if len(pos) == 0:
        return x
    x = x.copy()
    x[pos] = new_id
    return np.delete(x, pos + 1)


def _merge_list(ids, pair, new_id):
    """Plain-Python _merge_pair: scan left to right, replace each (a, b) by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    """A trained BPE: base characters plus merges in rank order.

    chars: sorted list of the V0 base characters (id i is chars[i]).
    merges: list of (id_a, id_b); merge r makes token V0 + r.
    token_strings: the text of every id, len == vocab_size.
    """

    def __init__(self, chars, merges):
        self.chars = list(chars)
        self.merges = [tuple(m) for m in merges]
        self._validate()
        self.token_strings = list(self.chars)
        for a, b in self.merges:
            self.token_strings.append(self.token_strings[a] + self.token_strings[b])
        self._sorted_codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def _validate(self):
        """Raise ValueError unless chars and merges describe a tokenizer the trainer could have made."""
        if not self.chars:
            raise ValueError("chars is empty; a tokenizer needs at least one base character")
        for i, c in enumerate(self.chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars[{i}] is {c!r}; every base symbol must be a 1-character string")
        for i in range(1, len(self.chars)):
            if self.chars[i - 1] >= self.chars[i]:
                raise ValueError(
                    f"chars must be sorted and distinct, but chars[{i - 1}]={self.chars[i - 1]!r} "
                    f"comes before chars[{i}]={self.chars[i]!r}"
                )
        strings = list(self.chars)
        seen = {}
        for r, m in enumerate(self.merges):
            new_id = len(self.chars) + r
            if len(m) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in m):
                raise ValueError(f"merges[{r}] is {list(m)!r}; a merge must be a pair of integer ids")
            a, b = m
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(
                    f"merges[{r}] = [{a}, {b}] makes token {new_id}, so it may only use ids 0..{new_id - 1}"
                )
            if m in seen:
                raise ValueError(f"merges[{r}] = [{a}, {b}] repeats merges[{seen[m]}]")
            seen[m] = r
            if _is_letters(strings[a]) != _is_letters(strings[b]):
                raise ValueError(
                    f"merges[{r}] joins {strings[a]!r} and {strings[b]!r}; a merge must join two "
                    "all-letter or two all-non-letter tokens"
                )
            strings.append(strings[a] + strings[b])

    @property
    def vocab_size(self):
        return len(self.chars) + len(self.merges)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, base={len(self.chars)}, merges={len(self.merges)})"

    def _unknown_error(self, items):
        return ValueError(
            f"unknown characters {_describe(items)}; the alphabet is the {len(self.chars)} characters "
            "the tokenizer was trained on (those of input.txt)"
        )

    def _char_ids(self, text):
        """str of length T -> (T,) int32 base ids; ValueError naming any character outside chars."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        cps = _codepoints(text)
        idx = np.searchsorted(self._sorted_codepoints, cps)
        found = idx < len(self.chars)
        found[found] = self._sorted_codepoints[idx[found]] == cps[found]
        if not found.all():
            bad = np.flatnonzero(~found)
            raise self._unknown_error([(text[i], int(i)) for i in bad])
        return idx.astype(np.int32)

    def encode_array(self, text):
        """str of length T -> (T',) int32 token ids, T' <= T. The fast path: one vectorised pass per merge."""
        x = self._char_ids(text)
        for r, (a, b) in enumerate(self.merges):
            if len(x) < 2:
                break
            x = _merge_pair(x, a, b, len(self.chars) + r)
        return x

    def encode(self, text):
        """str -> list[int] token ids."""
        return self.encode_array(text).tolist()

    def encode_reference(self, text):
        """str -> list[int]. The readable reference: merge the lowest-rank adjacent pair until none is left."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        unknown = [(c, i) for i, c in enumerate(text) if c not in self._ids]
        if unknown:
            raise self._unknown_error(unknown)
        ids = [self._ids[c] for c in text]
        rank = {pair: r for r, pair in enumerate(self.merges)}
        while len(ids) >= 2:
            best = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, len(rank)))
            if best not in rank:
                break
            ids = _merge_list(ids, best, len(self.chars) + rank[best])
        return ids

    def decode(self, ids):
        """(T',) ints (list or array) -> str. ValueError for ids outside 0..vocab_size-1."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if len(bad):
            raise ValueError(
                f"token ids out of range: {_describe([(int(arr[i]), int(i)) for i in bad])}; "
                f"valid ids are 0..{self.vocab_size - 1}"
            )
        return "".join([self.token_strings[i] for i in arr.tolist()])

    def to_json(self):
        """The file's exact text. Deterministic (sorted keys, fixed indent, ASCII escapes) so that
        retraining reproduces the committed file byte for byte."""
        data = {"format": FORMAT, "version": VERSION, "chars": self.chars, "merges": [list(m) for m in self.merges]}
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"

    def save(self, path):
        """Write to_json() to path atomically: a temp file in the same directory, then os.replace,
        so a crash never leaves a half-written tokenizer behind."""
        atomic_write_bytes(path, self.to_json().encode("utf-8"))

    @classmethod
    def from_json(cls, text, source="tokenizer JSON"):
        """Parse and validate the JSON text; ValueError naming the problem (prefixed by source)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        expected = {"format", "version", "chars", "merges"}
        if set(data) != expected:
            missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
            raise ValueError(f"{source}: keys must be {sorted(expected)}; missing {missing}, unexpected {extra}")
        if data["format"] != FORMAT:
            raise ValueError(f"{source}: format is {data['format']!r}, expected {FORMAT!r}")
        if data["version"] != VERSION or isinstance(data["version"], bool):
            raise ValueError(f"{source}: version is {data['version']!r}; this code reads version {VERSION}")
        if not isinstance(data["chars"], list):
            raise ValueError(f"{source}: chars must be a list of 1-character strings")
        if not isinstance(data["merges"], list) or not all(isinstance(m, list) for m in data["merges"]):
            raise ValueError(f"{source}: merges must be a list of [id_a, id_b] pairs")
        try:
            return cls(data["chars"], data["merges"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path):
        """Read a file written by save(). ValueError if it is not a valid tokenizer file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_json(text, source=str(path))

    @classmethod
    def default(cls):
        """The committed tokenizer, ROOT/tokenizer/tokenizer.json (128 tokens)."""
        return cls.load(DEFAULT_PATH)


def _check_train_args(text, num_merges):
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty str")
    if not isinstance(num_merges, int) or isinstance(num_merges, bool) or num_merges < 0:
        raise ValueError(f"num_merges must be an integer >= 0, got {num_merges!r}")


def _no_pair_error(rank, num_merges):
    return ValueError(
        f"after {rank} merges no adjacent pair may merge any more (all tokens are alone or between "
        f"tokens of the other class), so {num_merges} merges are impossible; use more text or fewer merges"
    )


def train(text, num_merges=63, on_merge=None):
    """Train the original's BPE on text (one sequence) -> Tokenizer with len(set(text)) + num_merges tokens.

    on_merge(rank, (str_a, str_b), count), if given, is called after each merge (rank counts from 0).
    ValueError if the text runs out of mergeable pairs before num_merges.
    """
    _check_train_args(text, num_merges)
    chars = sorted(set(text))
    is_letters = np.array([_is_letters(c) for c in chars], dtype=bool)  # (V,) class of every token
    strings = list(chars)
    x = Tokenizer(chars, [])._char_ids(text)  # (T,) int32, shrinks with every merge
    merges = []
    for rank in range(num_merges):
        V = len(strings)
        left, right = x[:-1].astype(np.int64), x[1:].astype(np.int64)
        # Count each pair the way the merge will take it: inside a run "aaaa" only the pairs at even
        # offsets, so ("a","a") counts 2, not 3. Pairs across letter / non-letter never count.
        countable = is_letters[left] == is_letters[right]
        countable &= (left != right) | (_run_offsets(x)[:-1] % 2 == 0)
        codes, counts = np.unique(left[countable] * V + right[countable], return_counts=True)
        if len(codes) == 0:
            raise _no_pair_error(rank, num_merges)
        best = int(np.argmax(counts))  # the first maximum, and codes are sorted: ties -> smallest (a, b)
        a, b = divmod(int(codes[best]), V)
        x = _merge_pair(x, a, b, V)
        merges.append((a, b))
        strings.append(strings[a] + strings[b])
        is_letters = np.append(is_letters, is_letters[a])
        if on_merge is not None:
            on_merge(rank, (strings[a], strings[b]), int(counts[best]))
    return Tokenizer(chars, merges)


def train_reference(text, num_merges=63):
    """The readable reference for train(): same rule, plain Python, for small texts only.
    A pair's count is how many tokens merging it would save; the best is the highest count, then
    the smallest (id_a, id_b)."""
    _check_train_args(text, num_merges)
    chars = sorted(set(text))
    strings = list(chars)
    ids = [chars.index(c) for c in text]
    merges = []
    for rank in range(num_merges):
        new_id = len(strings)
        allowed = {p for p in zip(ids, ids[1:]) if _is_letters(strings[p[0]]) == _is_letters(strings[p[1]])}
        if not allowed:
            raise _no_pair_error(rank, num_merges)
        saved = {p: len(ids) - len(_merge_list(ids, p, new_id)) for p in allowed}
        best = min(allowed, key=lambda p: (-saved[p], p))
        ids = _merge_list(ids, best, new_id)
        merges.append(best)
        strings.append(strings[best[0]] + strings[best[1]])
    return Tokenizer(chars, merges)


def _read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r" if the file has it
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _is_shipped(path):
    """True if path is the shipped tokenizer (the repository's or the installed package's copy)."""
    from tinyfractal.paths import SHIPPED_TOKENIZERS
    return Path(path).resolve() in {p.resolve() for p in SHIPPED_TOKENIZERS}


@reporting
def main(argv=None):
    """Train on --input and write --out (or, with --check, compare with it). Returns the exit code:
    0 ok, 1 --check found a difference, 2 bad input (one line on stderr, cli_args.py)."""
    parser = Parser(prog="python -m tinyfractal.text.bpe", description="Train the character-pair BPE tokenizer.")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="training text (default: input.txt)")
    parser.add_argument("--merges", type=int, default=63, help="number of merges (default 63 -> 128 tokens)")
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="output JSON (default: tokenizer/tokenizer.json)")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing; exit 1 if different")
    parser.add_argument("--force", action="store_true",
                        help="allow writing over the shipped tokenizer/tokenizer.json, which every model depends on")
    args = parser.parse_args(argv)
    if args.merges < 0:
        raise UsageError(f"--merges must be >= 0, got {args.merges}")
    if not args.check and not args.force and _is_shipped(args.out):
        raise UsageError(f"refusing to overwrite the shipped {args.out}: every model and checkpoint uses it. "
                         f"Write elsewhere with --out FILE, compare with --check, or pass --force")
    text = _read_text(args.input)
    print(f"training BPE on {args.input}: {len(text):,} characters, {len(set(text))} base symbols, {args.merges} merges")
    n_base = len(set(text))

    def show(rank, pair, count):
        a, b = pair
        print(f"  {rank:3d}  id {n_base + rank:4d}  {a!r:>8} + {b!r:<8} -> {a + b!r:<10} {count:7d} times")

    t0 = time.perf_counter()
    tok = train(text, args.merges, on_merge=show)
    t1 = time.perf_counter()
    n_tokens = len(tok.encode_array(text))
    t2 = time.perf_counter()
    print(f"trained in {t1 - t0:.2f} s; the text is {n_tokens:,} tokens ({len(text) / n_tokens:.3f} characters "
          f"per token), encoded in {t2 - t1:.2f} s")
    out = Path(args.out)
    if args.check:
        if not out.exists():
            print(f"{out} does not exist", file=sys.stderr)
            return 1
        if out.read_bytes() != tok.to_json().encode("utf-8"):
            print(f"{out} differs from what training produces; rerun without --check to rewrite it", file=sys.stderr)
            return 1
        print(f"{out} matches ({tok.vocab_size} tokens)")
        return 0
    try:
        tok.save(out)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"wrote {out} ({tok.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
