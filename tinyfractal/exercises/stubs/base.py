"""Exercises for lesson 1, the base model: a tree of models in one set of arrays (handout: lessons/base.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check base

`cfg` is a tinyfractal.Config: cfg.levels, cfg.split, cfg.hidden (D), cfg.head_dim (hd),
cfg.mlp_hidden (F), cfg.heads (H), cfg.kv_heads (K), cfg.vocab_size (V), cfg.layers.
Model (level, index) owns, at width d = D/split^level, the residual coordinates
R = [index*d, (index+1)*d), and likewise M for the MLP (f = F/split^level) and C inside each head
(h = hd/split^level). The role table is in docs/design.md. Do not call tinyfractal.view or
tinyfractal.tree here: the point is to write them yourself.
"""
import numpy as np


def n_nodes(levels, split):
    """How many models a tree of `levels` levels and this split holds: 1 + split + split^2 + ..."""
    raise NotImplementedError


def children(cfg, level, index):
    """The children of model (level, index), in order: a list of (level + 1, j) pairs ([] for a leaf)."""
    raise NotImplementedError


def node_slice(cfg, level, index, role):
    """The block of model (level, index) along one axis of role "R", "M" or "C": a slice(start, stop)."""
    raise NotImplementedError


def view_array(name, a, cfg, level, index):
    """Model (level, index)'s part of the full array `a` named `name`, as a NumPy VIEW (not a copy).

    name is one of: E, emb_norm, final_norm, out_norm, attn_norm, mlp_norm, Wq, Wk, Wv, Wo, Wgate,
    Wup, bgate, bup, Wdown, bdown. Which axis of each has which role is the role table.
    """
    raise NotImplementedError


def node_params(cfg, level):
    """How many numbers ONE model at this level owns (what count_params(view(...)) says).

    With the default output (logit_scale='learned', node_gains=True) the tree also holds two tables of
    shape (levels, hidden), logit_gain and node_gain; a node's view holds rows level.. of its own columns.
    """
    raise NotImplementedError


def tree_loss(losses, cfg):
    """The tree loss from the per-node losses: `losses` is a list with one array per level, entry j of
    losses[level] the loss of model (level, j) (what tinyfractal.node_losses returns). Return a float:
    the plain tree loss, tinyfractal.tree_loss with no level weights: every node counts the same. (Training
    by default weighs the nodes, loss_weights='sqrtwidth>nodes', ending at these equal weights: lesson 1,
    section 4.)"""
    raise NotImplementedError


def deepest_owner(cfg, row, col):
    """Entry (row, col) of a layer's Wgate (D x F): the deepest model whose block holds it, as a
    (level, index) pair. The root owns every entry; (row, col) is in model (l, j)'s block when row is
    in its R block and col in its M block."""
    raise NotImplementedError
