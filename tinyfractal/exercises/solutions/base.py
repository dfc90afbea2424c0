"""Reference solutions to the exercises of lesson 1, the base model: a tree of models in one set of arrays (handout: lessons/base.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check base --solutions

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
    return sum(split ** level for level in range(levels))


def children(cfg, level, index):
    """The children of model (level, index), in order: a list of (level + 1, j) pairs ([] for a leaf)."""
    if level == cfg.levels - 1:
        return []
    return [(level + 1, cfg.split * index + r) for r in range(cfg.split)]


def node_slice(cfg, level, index, role):
    """The block of model (level, index) along one axis of role "R", "M" or "C": a slice(start, stop)."""
    full = {"R": cfg.hidden, "M": cfg.mlp_hidden, "C": cfg.head_dim}[role]
    size = full // cfg.split ** level
    return slice(index * size, (index + 1) * size)


def view_array(name, a, cfg, level, index):
    """Model (level, index)'s part of the full array `a` named `name`, as a NumPy VIEW (not a copy).

    name is one of: E, emb_norm, final_norm, out_norm, attn_norm, mlp_norm, Wq, Wk, Wv, Wo, Wgate,
    Wup, bgate, bup, Wdown, bdown. Which axis of each has which role is the role table.
    """
    roles = {"E": (None, "R"), "emb_norm": ("R",), "final_norm": ("R",), "out_norm": ("R",),
             "attn_norm": ("R",), "mlp_norm": ("R",),
             "Wq": ("R", None, "C"), "Wk": ("R", None, "C"), "Wv": ("R", None, "C"), "Wo": (None, "C", "R"),
             "Wgate": ("R", "M"), "Wup": ("R", "M"), "bgate": ("M",), "bup": ("M",),
             "Wdown": ("M", "R"), "bdown": ("R",)}[name]
    return a[tuple(node_slice(cfg, level, index, r) if r else slice(None) for r in roles)]


def node_params(cfg, level):
    """How many numbers ONE model at this level owns (what count_params(view(...)) says).

    With the default output (logit_scale='learned', node_gains=True) the tree also holds two tables of
    shape (levels, hidden), logit_gain and node_gain; a node's view holds rows level.. of its own columns.
    """
    s = cfg.split ** level
    D, F, hd = cfg.hidden // s, cfg.mlp_hidden // s, cfg.head_dim // s
    H, K, V = cfg.heads, cfg.kv_heads, cfg.vocab_size
    per_layer = 2 * D + D * H * hd + 2 * D * K * hd + H * hd * D + 2 * D * F + 2 * F + F * D + D
    tables = (cfg.logit_scale == "learned") + bool(cfg.node_gains)
    return V * D + 3 * D + tables * (cfg.levels - level) * D + cfg.layers * per_layer


def tree_loss(losses, cfg):
    """The tree loss from the per-node losses: `losses` is a list with one array per level, entry j of
    losses[level] the loss of model (level, j) (what tinyfractal.node_losses returns). Return a float:
    the plain tree loss, tinyfractal.tree_loss with no level weights: every node counts the same. (Training
    by default weighs the nodes, loss_weights='sqrtwidth>nodes', ending at these equal weights: lesson 1,
    section 4.)"""
    every_node = np.concatenate([np.ravel(level_losses) for level_losses in losses])
    return float(np.mean(every_node))


def deepest_owner(cfg, row, col):
    """Entry (row, col) of a layer's Wgate (D x F): the deepest model whose block holds it, as a
    (level, index) pair. The root owns every entry; (row, col) is in model (l, j)'s block when row is
    in its R block and col in its M block."""
    for level in reversed(range(cfg.levels)):
        for index in range(cfg.split ** level):
            R, M = node_slice(cfg, level, index, "R"), node_slice(cfg, level, index, "M")
            if R.start <= row < R.stop and M.start <= col < M.stop:
                return (level, index)
    return (0, 0)
