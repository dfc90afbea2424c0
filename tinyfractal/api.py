"""The public entry points that run a model: each asks the config's variant and calls it.

Every function here gives the right answer for every variant (base, upstream, downstream, bytes) or
raises a ValueError that names the variant; none of them branches on a config field itself.
The loss over the tree is written here once: a weighted mean of the nodes' losses.
"""
import numbers

import autograd.numpy as np

from tinyfractal.core import formulas
from tinyfractal.core.model import check_params
from tinyfractal.core.tree import nodes
from tinyfractal.variants import variant_of


def forward(params, cfg, ids, rng=None):
    """Logits of the model `params` of config `cfg`. ids (B,T) -> (B,T,V); byte groups (B,T,g) -> (B,T,g,V).

    With `view(params, cfg, level, j)` and `cfg.sub(level)` this runs node (level, j): the same code at
    every scale. (A downstream node needs its ancestors, which a view lacks: use `forward_node`.)
    """
    v = variant_of(cfg)
    check_params(params, cfg)
    return v.forward(params, cfg, v.check_ids(cfg, ids), rng)


def forward_node(params, cfg, level, index, ids):
    """Logits of node (level, index) of the whole tree `params`, by the readable reference path.

    ids are what that node reads: (B,T) tokens, or (B,T,g_level) byte groups for byte models.
    """
    v = variant_of(cfg)
    level, index = cfg.check_node(level, index)
    check_params(params, cfg)
    return v.forward_node(params, cfg, level, index, v.check_ids(cfg.sub(level), ids))


def forward_level(params, cfg, level, ids, rng=None):
    """Logits of every model of one level, level-batched: (N,B,T,V) (byte groups: (N,B,T,g,V))."""
    v = variant_of(cfg)
    level = cfg.check_level(level)
    check_params(params, cfg)
    return v.level_logits(params, cfg, level, v.check_ids(cfg.sub(level), ids), rng)


def node_losses(params, cfg, ids, targets, rng=None):
    """Per level, every model's mean loss (fast path): [(1,), (s,), (s^2,), ...]."""
    v = variant_of(cfg)
    ids = v.check_ids(cfg, ids)
    return v.node_losses(params, cfg, ids, v.check_targets(cfg, ids, targets), rng)


def level_weight_table(cfg, level_weights=None):
    """Weight of each node's loss, so that the tree loss is a weighted mean over nodes (default: all equal)."""
    w = [1.0] * cfg.levels if level_weights is None else list(level_weights)
    if len(w) != cfg.levels or not all(isinstance(v, numbers.Real) and 0 <= v < float("inf") for v in w) \
            or sum(w) == 0:
        raise ValueError(f"level_weights must be {cfg.levels} finite non-negative numbers, not all zero; "
                         f"got {level_weights!r}")
    total = sum(float(w[level]) * cfg.n_models(level) for level in range(cfg.levels))
    return [float(v) / total for v in w]


def tree_loss(params, cfg, ids, targets, level_weights=None, rng=None):
    """Mean next-token loss over every node of the tree (weighted per level if asked): what training minimises."""
    weights = level_weight_table(cfg, level_weights)
    losses = node_losses(params, cfg, ids, targets, rng)
    return sum(weights[level] * np.sum(losses[level]) for level in range(cfg.levels))


def tree_loss_reference(params, cfg, ids, targets, level_weights=None):
    """The same loss node by node with the reference forward: readable, slow, the definition."""
    v = variant_of(cfg)
    weights = level_weight_table(cfg, level_weights)
    ids = v.check_ids(cfg, ids)
    targets = v.check_targets(cfg, ids, targets)
    loss = 0.0
    for level, j in nodes(cfg):
        inputs, wanted = v.level_batch(cfg, level, ids, targets)
        loss = loss + weights[level] * formulas.cross_entropy(v.forward_node(params, cfg, level, j, inputs), wanted)
    return loss
