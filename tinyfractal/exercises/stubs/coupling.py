"""Exercises for lesson 5, coupling: when the levels of the tree talk (handout: lessons/coupling.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check coupling

A level's states are one array (N, B, T, d): N models of the level, B sequences, T positions, width d.
Models j*s .. j*s + s - 1 of a level are the children of model j of the level above (s = split).
"""
import numpy as np


def upstream_received(children_states, split):
    """What the parents of an upstream-coupled level receive: each parent gets its children's states
    side by side, child r on coordinates [r*d, (r+1)*d). (split*N, B, T, d) -> (N, B, T, split*d)."""
    raise NotImplementedError


def downstream_received(parent_states, split):
    """What the children receive under downstream coupling: child k gets the slice of its parent's
    state that lies on its own coordinates. (N, B, T, split*d) -> (split*N, B, T, d)."""
    raise NotImplementedError


def needed_nodes(cfg, level, index):
    """The nodes that must run to get the logits of node (level, index) under cfg.coupling ("none",
    "upstream" or "downstream"), sorted by (level, index): a list of (level, index) pairs."""
    raise NotImplementedError
