"""Reference solutions to the exercises of lesson 3, speculative decoding with the models inside the model
(handout: lessons/speculative.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check speculative --solutions

p is the verifier's distribution over the vocabulary, q the drafter's: 1-D arrays that sum to 1.
"""
import numpy as np


def accept_greedy(draft, verifier_tokens):
    """Greedy verification of one draft: (accepted, next_token).

    draft (k,) drafted token ids; verifier_tokens (k+1,) the verifier's argmax after the prompt, after
    the prompt + draft[0], ..., after the prompt + all k drafted tokens. The verifier keeps the
    longest prefix of the draft that agrees with its own choices, then adds its own next token.
    """
    accepted = 0
    while accepted < len(draft) and draft[accepted] == verifier_tokens[accepted]:
        accepted += 1
    return accepted, int(verifier_tokens[accepted])


def acceptance_rate(p, q):
    """The probability that a token drawn from q is kept when the rule keeps token t with probability
    min(1, p[t] / q[t]). Return a float."""
    return float(np.sum(np.minimum(p, q)))


def residual(p, q):
    """What a rejected token is redrawn from: max(0, p - q), normalised to sum to 1 (p itself when
    p == q everywhere). With it, accept-or-redraw yields tokens distributed exactly as p."""
    r = np.maximum(np.asarray(p, dtype=np.float64) - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else np.asarray(p, dtype=np.float64)


def expected_tokens(alpha, k):
    """Tokens gained per verifier pass when each drafted token is kept independently with probability
    alpha, the draft is k tokens long, and the verifier always adds one token of its own (after the
    first refusal, or after all k were kept). 0 <= alpha <= 1. Return a float."""
    # a drafted tokens kept with probability alpha^a (1 - alpha) for a < k, alpha^k for a = k; plus one.
    return float(sum(alpha ** a for a in range(k + 1)))


def drafters(cfg, verifier, level):
    """The sub-models of `verifier` (a (level, index) node) at a deeper `level`, in index order: a list
    of (level, index) pairs. They are the models that can draft for it at no extra weights."""
    vlevel, vindex = verifier
    span = cfg.split ** (level - vlevel)
    return [(level, vindex * span + r) for r in range(span)]
