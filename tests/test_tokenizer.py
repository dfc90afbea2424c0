"""Laws of the character-pair BPE tokenizer (tinyfractal/text/bpe.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfractal.text.bpe import Tokenizer, main, train, train_reference

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (ROOT / "input.txt").read_text(encoding="utf-8")
COMMITTED = ROOT / "tokenizer" / "tokenizer.json"
TOK = Tokenizer.load(COMMITTED)
ALPHABET = "".join(TOK.chars)
# TOK cut after its first k merges, k = 0..63: the tokenizer that training would have stopped at.
TRUNCATED = [Tokenizer(TOK.chars, TOK.merges[:k]) for k in range(len(TOK.merges) + 1)]

# Copied by hand from docs/design.md §9, deliberately not from the code under test.
SPEC_FIRST_MERGES = [
    "th", ", ", "ou", "er", "in", "an", ":\n", "the", "or", "is", "\n\n",
    "en", "ar", "at", "on", "st", "ll", ",\n", "me", "to", ".\n\n", "and",
]

# Random text over the alphabet rarely contains "the" or ":\n", so also draw slices of the corpus,
# where most merges fire, and a salad of common fragments glued in any order.
any_text = st.text(alphabet=ALPHABET, max_size=200)
corpus_slice = st.integers(0, len(CORPUS) - 1).flatmap(
    lambda i: st.integers(0, 400).map(lambda n: CORPUS[i:i + n])
)
fragment_salad = st.lists(
    st.sampled_from(["the", "th", "e", "and", "\n\n", ":\n", ".", " ", "ll", "lll", "oo", "ooo", "you", "A"]),
    max_size=40,
).map("".join)
alphabet_text = st.one_of(any_text, corpus_slice, fragment_salad)
foreign_char = st.characters(codec=None).filter(lambda c: c not in ALPHABET)


@pytest.fixture(scope="module")
def retrained():
    """(tokenizer, merge counts) from training on input.txt afresh."""
    counts = []
    tok = train(CORPUS, 63, on_merge=lambda rank, pair, count: counts.append(count))
    return tok, counts


def test_first_22_merges_are_the_spec_list():
    """The first 22 merges on input.txt are the list of docs/design.md §9; there are 65 base characters and 128 tokens."""
    assert [TOK.token_strings[65 + r] for r in range(22)] == SPEC_FIRST_MERGES
    assert len(TOK.chars) == 65
    assert TOK.chars == sorted(set(CORPUS))
    assert TOK.vocab_size == 128
    assert len(TOK.token_strings) == 128


def test_every_merge_joins_two_letter_tokens_or_two_non_letter_tokens():
    """The original's rule: both sides of a merge are all letters, or both are all non-letters."""
    for a, b in TOK.merges:
        sa, sb = TOK.token_strings[a], TOK.token_strings[b]
        assert sa.isalpha() == sb.isalpha(), (sa, sb)
        assert all(c.isalpha() for c in sa) or not any(c.isalpha() for c in sa)


def test_retraining_reproduces_the_committed_file(retrained):
    """Training on input.txt gives, byte for byte, the committed tokenizer/tokenizer.json."""
    tok, _ = retrained
    assert tok.to_json().encode("utf-8") == COMMITTED.read_bytes()


def test_each_merge_saves_exactly_its_count(retrained):
    """Training counts a pair as the merge takes it: len(corpus) - sum(counts) = len(encode(corpus))."""
    tok, counts = retrained
    assert len(CORPUS) - sum(counts) == len(tok.encode_array(CORPUS))


def test_command_line_check_passes_on_the_committed_file(capsys):
    """`python -m tinyfractal.text.bpe --check` retrains and finds the committed file identical (exit 0)."""
    assert main(["--check"]) == 0
    assert "matches" in capsys.readouterr().out


def test_command_line_writes_what_check_then_accepts(tmp_path, capsys):
    """The file the command line writes passes --check; any change to it makes --check exit 1."""
    src, out = tmp_path / "small.txt", tmp_path / "tok" / "t.json"
    src.write_text(CORPUS[:3000], encoding="utf-8")
    assert main(["--input", str(src), "--merges", "10", "--out", str(out)]) == 0
    assert main(["--input", str(src), "--merges", "10", "--out", str(out), "--check"]) == 0
    assert main(["--input", str(src), "--merges", "9", "--out", str(out), "--check"]) == 1
    assert list(out.parent.iterdir()) == [out]  # the atomic write left no temp file behind


@pytest.mark.parametrize(
    "argv",
    [
        ["--input", "/nonexistent/input.txt"],
        ["--merges", "-1"],
        ["--merges", "many"],
        ["--bogus"],
    ],
)
def test_command_line_bad_input_is_one_line_and_exit_2(argv, capsys, tmp_path):
    """A bad argument or unreadable input gives exit code 2 and exactly one line on stderr."""
    assert main(argv + ["--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_command_line_too_many_merges_is_exit_2(tmp_path, capsys):
    """Asking for more merges than the text allows is a bad input: exit 2, one line on stderr."""
    src = tmp_path / "tiny.txt"
    src.write_text("ab", encoding="utf-8")
    assert main(["--input", str(src), "--merges", "2", "--out", str(tmp_path / "t.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@settings(deadline=None)
@given(alphabet_text)
def test_decode_inverts_encode(text):
    """decode(encode(s)) == s for every string s over the alphabet."""
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode(TOK.encode_array(text)) == text


@settings(deadline=None)
@given(alphabet_text)
def test_encoding_is_deterministic(text):
    """Encoding the same text twice, or with a freshly loaded tokenizer, gives the same ids."""
    first = TOK.encode(text)
    assert TOK.encode(text) == first
    assert Tokenizer.load(COMMITTED).encode(text) == first
    assert TOK.encode_array(text).dtype == np.int32


@settings(deadline=None)
@given(alphabet_text)
def test_fast_encoder_equals_reference_encoder(text):
    """The vectorised encoder gives the same ids as the plain lowest-rank-pair-first loop."""
    assert TOK.encode(text) == TOK.encode_reference(text)


def test_fast_encoder_equals_reference_encoder_on_the_corpus():
    """On a 5,000-character slice of input.txt the two encoders agree."""
    text = CORPUS[100_000:105_000]
    fast = TOK.encode(text)
    assert fast == TOK.encode_reference(text)
    assert len(fast) < len(text)


@settings(deadline=None)
@given(alphabet_text)
def test_encoding_never_has_more_tokens_than_characters(text):
    """len(encode(s)) <= len(s)."""
    assert len(TOK.encode(text)) <= len(text)


@settings(deadline=None, max_examples=50)
@given(alphabet_text)
def test_each_further_merge_never_adds_tokens(text):
    """With the first k merges, s has no more tokens than with the first k-1, for every k."""
    lengths = [len(t.encode_array(text)) for t in TRUNCATED]
    assert lengths[0] == len(text)
    assert all(later <= earlier for earlier, later in zip(lengths, lengths[1:]))


@settings(deadline=None)
@given(alphabet_text, foreign_char, st.data())
def test_a_character_outside_the_alphabet_is_rejected_by_name(text, char, data):
    """Any character outside the alphabet raises ValueError naming it and its position."""
    pos = data.draw(st.integers(0, len(text)))
    bad = text[:pos] + char + text[pos:]
    for encode in (TOK.encode, TOK.encode_reference):
        with pytest.raises(ValueError) as err:
            encode(bad)
        assert f"{char!r} at {pos}" in str(err.value)


def test_every_unknown_character_is_listed_with_its_position():
    """Several unknown characters are all named, each with its position."""
    with pytest.raises(ValueError, match=r"'é' at 7, '€' at 10; the alphabet is the 65 characters"):
        TOK.encode("The café: €3")
    with pytest.raises(ValueError, match=r"'0' at 9 and 2 more;"):  # long lists are cut after ten
        TOK.encode("0124567890€€")
    with pytest.raises(ValueError, match=r"'\\ud800' at 1"):  # a lone surrogate too, not a codec error
        TOK.encode("a\ud800")


@pytest.mark.parametrize("ids", [[128], [-1], [5, 200, 7], np.array([0, 999])])
def test_decode_rejects_out_of_range_ids(ids):
    """An id outside 0..vocab_size-1 raises ValueError naming it."""
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode(ids)


@pytest.mark.parametrize("ids", [[1.5], [[1, 2]], ["a"]])
def test_decode_rejects_non_integer_ids(ids):
    """Anything but a 1-D sequence of integers raises ValueError."""
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        TOK.decode(ids)


def test_save_then_load_gives_the_same_tokenizer(tmp_path):
    """load(save(t)) has the same chars, merges and file text as t."""
    path = tmp_path / "t.json"
    TOK.save(path)
    again = Tokenizer.load(path)
    assert (again.chars, again.merges) == (TOK.chars, TOK.merges)
    assert path.read_bytes() == COMMITTED.read_bytes()


def _committed():
    return json.loads(COMMITTED.read_text(encoding="utf-8"))


def _edited(**changes):
    data = _committed()
    data.update(changes)
    return json.dumps(data)


CORRUPT = {
    "truncated": COMMITTED.read_text(encoding="utf-8")[:500],
    "empty": "",
    "not an object": "[1, 2]",
    "wrong format": _edited(format="minbpe"),
    "wrong version": _edited(version=2),
    "missing merges": json.dumps({k: v for k, v in _committed().items() if k != "merges"}),
    "extra key": _edited(vocab={}),
    "chars not a list": _edited(chars="abc"),
    "empty chars": _edited(chars=[], merges=[]),
    "unsorted chars": _edited(chars=list(reversed(TOK.chars))),
    "duplicate chars": _edited(chars=TOK.chars[:1] + TOK.chars),
    "multi-char base symbol": _edited(chars=["ab"] + TOK.chars[1:]),
    "merge with three ids": _edited(merges=[[1, 2, 3]]),
    "merge of strings": _edited(merges=[["t", "h"]]),
    "merge of booleans": _edited(merges=[[True, False]]),
    "merge uses a later id": _edited(merges=[[65, 1]]),
    "merge uses a negative id": _edited(merges=[[-1, 1]]),
    "repeated merge": _edited(merges=[[58, 46], [58, 46]]),
    "merge across letters and non-letters": _edited(merges=[[1, 58]]),
    "too few chars for the merges": _edited(chars=TOK.chars[:30]),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_load_rejects_a_corrupt_or_mismatched_file(name, tmp_path):
    """load raises ValueError, naming the file, for anything but a valid tokenizer file."""
    path = tmp_path / "bad.json"
    path.write_text(CORRUPT[name], encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(path)


def test_load_rejects_bytes_that_are_not_utf8(tmp_path):
    """A binary file raises ValueError, not UnicodeDecodeError."""
    path = tmp_path / "bad.json"
    path.write_bytes(b"\x80\x81\xff{}")
    with pytest.raises(ValueError, match="not UTF-8"):
        Tokenizer.load(path)


def test_default_is_the_committed_tokenizer():
    """Tokenizer.default() loads tokenizer/tokenizer.json."""
    tok = Tokenizer.default()
    assert (tok.chars, tok.merges) == (TOK.chars, TOK.merges)


@settings(deadline=None)
@given(st.text(alphabet="ab A.\n", min_size=1, max_size=60), st.integers(0, 12))
def test_fast_trainer_equals_reference_trainer(text, num_merges):
    """train and the plain-Python train_reference pick the same merges, ties included, or both refuse."""
    try:
        expected = train_reference(text, num_merges)
    except ValueError:
        with pytest.raises(ValueError, match="no adjacent pair may merge"):
            train(text, num_merges)
        return
    assert train(text, num_merges).merges == expected.merges


def test_fast_trainer_equals_reference_trainer_on_the_corpus():
    """On the first 1,500 characters of input.txt both trainers make the same 15 merges."""
    text = CORPUS[:1500]
    assert train(text, 15).merges == train_reference(text, 15).merges


@pytest.mark.parametrize("text, num_merges", [("", 1), ("abc", -1), ("abc", 1.5), ("abc", True), (b"abc", 1)])
def test_train_rejects_bad_arguments(text, num_merges):
    """train needs a non-empty str and an integer num_merges >= 0."""
    with pytest.raises(ValueError):
        train(text, num_merges)
