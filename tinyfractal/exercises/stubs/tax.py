"""Exercises for lesson 9, the nesting tax (handout: lessons/tax.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check tax

`cfg` is a tinyfractal.Config: cfg.levels, cfg.split, cfg.n_models(level) (= split**level models at
that level), cfg.width(level) (d_l = hidden / split**level) and cfg.n_nodes. A "node" is one model of
the tree, (level, j). Write these with NumPy and the standard library: the checks compare them with
the engine's own code (tinyfractal/tools/study.py, tinyfractal/training/train.py), so do not call it.
"""
import math

import numpy as np


def tax_per_level(tree_val, alone_val):
    """The nesting tax of each level: the mean over the level's nodes of (the node's val loss in the
    tree - the val loss of its standalone twin).

    tree_val: {(level, j): val loss in nats/token} for every node of the tree;
    alone_val: [val loss of the twin of level 0, of level 1, ...] (one twin per level: every node of a
    level has the same shape). Returns [tax of level 0, tax of level 1, ...], floats.
    """
    raise NotImplementedError


def bits_per_char(nats_per_token, targets, decode):
    """Convert a mean loss in nats per token into bits per character, on the text it was measured on.

    targets: (B, T) token ids, the tokens the loss was measured on; decode(row) -> str turns one row of
    ids into its text. Bits are nats / ln 2; characters per token are the characters of the decoded
    rows divided by the number of tokens. Returns a float.
    """
    raise NotImplementedError


def first_loss_bound(vocab_size, d, logit_scale):
    """The largest first-step loss a fresh node of width d can have (gains at 0), in nats.

    Each logit is rmsnorm(x) . rmsnorm(E[v]) times the node's output gain, and both normalised vectors
    have length sqrt(d). logit_scale is 'none' (gain 1), 'sqrt' (gain 1/sqrt(d)) or 'learned'
    (gain (1 + g)/sqrt(d), with g = 0 at the start). Cross-entropy is at most ln V plus the gap between
    the largest and the smallest logit. Raise ValueError for any other logit_scale.
    """
    raise NotImplementedError


def loss_weights(cfg, scheme):
    """The weight of ONE node's loss at each level, for TrainConfig(loss_weights=scheme), normalised so
    that the weights of all the nodes of the tree add up to 1.

    Before normalising, a node weighs: 'nodes' 1 (the plain mean over nodes); 'width' its width d_l (so
    every level weighs the same in total); 'params' its parameter count (the entries of its view,
    count_params(view(params, cfg, level, j)): lesson 1's node_params, including the node's rows
    [l:] of the per-node tables logit_gain (if cfg.logit_scale == 'learned') and node_gain (if
    cfg.node_gains), d_l entries per row). Raise ValueError for another scheme. Returns [w_0, w_1, ...],
    one float per level.
    """
    raise NotImplementedError


def tree_clip_threshold(grad_clip, cfg, weights):
    """The gradient-clipping threshold of TrainConfig(clip_mode='tree'), given the weight of one node at
    each level (weights[level], as loss_weights returns them).

    The tree's gradient is sum over nodes of w_node * g_node. If the nodes' gradients were orthogonal
    and each of norm grad_clip, how long would that sum be? That is the threshold: the tree is clipped
    when its nodes would each be clipped on their own, as a standalone model is. Returns a float.
    """
    raise NotImplementedError
