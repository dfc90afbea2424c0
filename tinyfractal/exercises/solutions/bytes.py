"""Reference solutions to the exercises of lesson 6, bytes and concepts (handout: lessons/bytes.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check bytes --solutions

`cfg` is a byte model's tinyfractal.Config (tokenizer="bytes", vocab_size=256): cfg.levels (L),
cfg.split (s), cfg.context, cfg.eps.
"""
import numpy as np


def group_size(cfg, level):
    """How many bytes one position of a model at this level reads (its group size g)."""
    return cfg.split ** (cfg.levels - 1 - level)


def slot_offset(cfg, level):
    """The first row of this level's slot gains in the stacked P and Q arrays: the levels above it
    come first, each with one row per byte of its group."""
    return sum(group_size(cfg, k) for k in range(level))


def context_bytes(cfg, level):
    """How many bytes of text a model at this level sees in its cfg.context positions."""
    return cfg.context * group_size(cfg, level)


def concept_embedding(E, P, emb_norm, group, eps):
    """The concept of one group of bytes: rmsnorm(sum over m of E[group[m]] * (1 + P[m]), emb_norm).

    E (256, D), P (g, D) the slot gains of this level, emb_norm (D,), group (g,) byte values -> (D,).
    rmsnorm(y, w) = y / sqrt(mean(y^2) + eps) * (1 + w).
    """
    y = np.sum(E[np.asarray(group)] * (1 + P), axis=0)                # (g, D) -> (D,)
    return y / np.sqrt(np.mean(y * y) + eps) * (1 + emb_norm)
