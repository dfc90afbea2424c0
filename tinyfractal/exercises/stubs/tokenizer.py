"""Exercises for lesson 2, the tokenizer: character-pair BPE (handout: lessons/tokenizer.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check tokenizer

Token ids are plain Python ints in lists. Do not call tinyfractal.tokenizer here: write it yourself.
"""


def merge_pair(ids, pair, new_id):
    """Replace every occurrence of the adjacent pair (a, b) by new_id, scanning left to right and
    never reusing a token: merge_pair([7, 7, 7], (7, 7), 9) == [9, 7]. Returns a new list."""
    raise NotImplementedError


def pair_counts(ids):
    """How many times merging each adjacent pair would fire: {(a, b): count}.

    That is the number of non-overlapping occurrences, left to right, so [7, 7, 7] holds (7, 7) once
    and [7, 7, 7, 7] twice. Every adjacent pair that occurs gets an entry.
    """
    raise NotImplementedError


def encode(text, chars, merges):
    """Rank-order BPE: text -> token ids.

    chars: the sorted base characters (character chars[i] has id i); merges: list of (id_a, id_b),
    merge r makes token len(chars) + r. Start from one id per character, then apply the merges in
    rank order, each one everywhere (left to right, non-overlapping).
    """
    raise NotImplementedError


def first_merge(text):
    """The first merge BPE training makes on `text`, as a pair of strings (left, right).

    The rules of lesson 2: the base ids are the sorted distinct characters of the text; a pair counts
    its non-overlapping occurrences; a pair may merge only if both sides are letters (str.isalpha) or
    both are not; the highest count wins, and a tie goes to the smallest (id_a, id_b).
    """
    raise NotImplementedError
