"""Reference solutions to the exercises of lesson 5, coupling: when the levels of the tree talk (handout: lessons/coupling.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check coupling --solutions

A level's states are one array (N, B, T, d): N models of the level, B sequences, T positions, width d.
Models j*s .. j*s + s - 1 of a level are the children of model j of the level above (s = split).
"""
import numpy as np


def upstream_received(children_states, split):
    """What the parents of an upstream-coupled level receive: each parent gets its children's states
    side by side, child r on coordinates [r*d, (r+1)*d). (split*N, B, T, d) -> (N, B, T, split*d)."""
    Nc, B, T, d = children_states.shape
    N = Nc // split
    out = np.empty((N, B, T, split * d), dtype=children_states.dtype)
    for j in range(N):
        for r in range(split):
            out[j, :, :, r * d:(r + 1) * d] = children_states[j * split + r]
    return out


def downstream_received(parent_states, split):
    """What the children receive under downstream coupling: child k gets the slice of its parent's
    state that lies on its own coordinates. (N, B, T, split*d) -> (split*N, B, T, d)."""
    N, B, T, D = parent_states.shape
    d = D // split
    return np.stack([parent_states[k // split, :, :, (k % split) * d:(k % split + 1) * d]
                     for k in range(N * split)])


def needed_nodes(cfg, level, index):
    """The nodes that must run to get the logits of node (level, index) under cfg.coupling ("none",
    "upstream" or "downstream"), sorted by (level, index): a list of (level, index) pairs."""
    s = cfg.split
    if cfg.coupling == "upstream":                      # the whole subtree below the node
        return [(m, j) for m in range(level, cfg.levels)
                for j in range(index * s ** (m - level), (index + 1) * s ** (m - level))]
    if cfg.coupling == "downstream":                    # the chain of ancestors, and the node
        return [(m, index // s ** (level - m)) for m in range(level + 1)]
    return [(level, index)]
