"""Exercises for lesson 3, speculative decoding with the models inside the model
(handout: lessons/speculative.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check speculative

p is the verifier's distribution over the vocabulary, q the drafter's: 1-D arrays that sum to 1.
"""
import numpy as np


def accept_greedy(draft, verifier_tokens):
    """Greedy verification of one draft: (accepted, next_token).

    draft (k,) drafted token ids; verifier_tokens (k+1,) the verifier's argmax after the prompt, after
    the prompt + draft[0], ..., after the prompt + all k drafted tokens. The verifier keeps the
    longest prefix of the draft that agrees with its own choices, then adds its own next token.
    """
    raise NotImplementedError


def acceptance_rate(p, q):
    """The probability that a token drawn from q is kept when the rule keeps token t with probability
    min(1, p[t] / q[t]). Return a float."""
    raise NotImplementedError


def residual(p, q):
    """What a rejected token is redrawn from: max(0, p - q), normalised to sum to 1 (p itself when
    p == q everywhere). With it, accept-or-redraw yields tokens distributed exactly as p."""
    raise NotImplementedError


def expected_tokens(alpha, k):
    """Tokens gained per verifier pass when each drafted token is kept independently with probability
    alpha, the draft is k tokens long, and the verifier always adds one token of its own (after the
    first refusal, or after all k were kept). 0 <= alpha <= 1. Return a float."""
    raise NotImplementedError


def drafters(cfg, verifier, level):
    """The sub-models of `verifier` (a (level, index) node) at a deeper `level`, in index order: a list
    of (level, index) pairs. They are the models that can draft for it at no extra weights."""
    raise NotImplementedError
