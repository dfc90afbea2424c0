"""The public entry points that run a model: each asks the config's variant and calls it.

Every function here gives the right answer for every variant (base, upstream, downstream, bytes) or
raises a ValueError that names the variant; none of them branches on a config field itself.
The loss over the tree is written here once: a weighted mean of the nodes' losses.
"""
import functools
import numbers

import autograd.numpy as np
from autograd.tracer import getval

from tinyfractal.core import formulas, tree
from tinyfractal.core.model import base_param_shapes, base_params
from tinyfractal.core.tree import flatten, nodes
from tinyfractal.variants import variant_of


def init_params(cfg, seed=0):
    """Fresh float32 parameters of config `cfg`: the base transformer's arrays (`model.base_params`: uniform
    weights and biases in +-1/sqrt(fan_in), E standard normal, norm gains zero) plus the arrays the
    config's variant adds (its `extra_params`, e.g. the coupling scale or the byte-slot gains)."""
    params = base_params(cfg, seed)
    params.update(variant_of(cfg).extra_params(cfg))
    return params


def param_shapes(cfg):
    """The shape every array must have for this config (checkpoints and `check_params` compare to it)."""
    shapes = base_param_shapes(cfg)
    shapes.update({k: tuple(a.shape) for k, a in variant_of(cfg).extra_params(cfg).items()})
    return shapes


@functools.lru_cache(maxsize=64)
def expected_shapes(cfg):
    """{flat name: shape} of every array a full parameter set of this config holds (param_shapes)."""
    return {k: tuple(v) for k, v in flatten(param_shapes(cfg)).items()}


def check_params(params, cfg, allow_extra=False):
    """Raise ValueError unless params is a full parameter set of this config (names and shapes).

    `view` cuts blocks by the config's sizes, so the arrays of another config would give a wrong model
    without any error (a view of a wider model's arrays has exactly the shapes of a narrower one's
    node); this is checked first. With `allow_extra`, arrays this config does not use (such as a
    coupled model's coupling_scale, read by a base config) may come along unchecked, since the model
    of this config never reads them; more layers, or unknown arrays inside a layer, never may.
    """
    params = getval(params)   # under autograd the dict is boxed; only shapes are read, so no op is recorded
    if not isinstance(params, dict) or not isinstance(getval(params.get("layers")), (list, tuple)):
        raise ValueError(f"params must be a dict of arrays with a 'layers' list (from init_params or load), "
                         f"got {type(params).__name__}")
    n_layers = len(getval(params["layers"]))
    if n_layers != cfg.layers:
        raise ValueError(f"params have {n_layers} layers but the config has layers={cfg.layers}; are these the "
                         f"params of another config?")
    want = expected_shapes(cfg)
    have = {k: v for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(getval(params["layers"])):
        layer = getval(layer)
        if not isinstance(layer, dict):
            raise ValueError(f"params['layers'][{i}] must be a dict of arrays, got {type(layer).__name__}")
        have.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if allow_extra:
        extra = [k for k in extra if k.startswith("layers.")]   # more layers, or unknown ones, are another model
    if missing or extra:
        raise ValueError(f"params do not match the config (layers={cfg.layers}, coupling={cfg.coupling!r}, "
                         f"tokenizer={cfg.tokenizer!r}): missing {missing[:6]}, unexpected {extra[:6]}")
    for k, shape in want.items():
        got = tuple(getattr(have[k], "shape", ()))
        if got != shape:
            raise ValueError(f"params do not match the config: {k} has shape {got}, the config (hidden="
                             f"{cfg.hidden}, heads={cfg.heads}, head_dim={cfg.head_dim}, vocab_size="
                             f"{cfg.vocab_size}, ...) needs {shape}; are these the params of another config?")


def view(params, cfg, level, index):
    """The parameters of model (level, index) as views of the shared arrays (core/tree.py), after checking
    that `params` are arrays of this config: params of another config would be cut into wrong blocks."""
    check_params(params, cfg, allow_extra=True)
    return tree.view(params, cfg, level, index)


def level_view(params, cfg, level):
    """All models of one level stacked on a leading axis, as views (core/tree.py), after the same check."""
    check_params(params, cfg, allow_extra=True)
    return tree.level_view(params, cfg, level)


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


def needed_nodes(cfg, level, index):
    """The nodes that must run to get node (level, index)'s logits, level by level: the node alone (base,
    bytes), its subtree (upstream) or its chain of ancestors (downstream)."""
    level, index = cfg.check_node(level, index)
    return [(m, j) for m, idx in variant_of(cfg).members(cfg, level, [index]).items() for j in idx]


def node_run_flops(cfg, level, index, T):
    """Forward matmul FLOPs to get node (level, index)'s logits for T positions, running every node it needs
    (the same for every index of a level)."""
    level, index = cfg.check_node(level, index)
    return variant_of(cfg).node_flops(cfg, level, T)


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
