"""Model merging: place trained models on the diagonal blocks of a larger FractalFormer, and back.

`merge` is the write-side twin of `tree.view`: child r of the merged model *is* view (1, r), so
writing each child through its view puts every array exactly where the index maps of docs/design.md
section 1 say, and moves the child's own descendants one level down unchanged. What is left over,
the off-diagonal blocks of the projection and MLP matrices and, when the per-node output options are
on, the parent's own row of `logit_gain` and `node_gain` (row 0, which starts at 0), is all that is
new; `trainable_mask` marks exactly those entries so training can leave the children bit for bit as
they were.
"""
import dataclasses

import numpy as onp

from tinyfractal.core import fast
from tinyfractal.config import Config
from tinyfractal.api import init_params, param_shapes
from tinyfractal.variants import variant_of
from tinyfractal.core.tree import flatten, index_mask, map_roles, view

OFF_DIAGONAL = ("zero", "random")


def parent_config(child_cfg, split):
    """The config one level up: split x the width and head dim, one more level, all else the same."""
    if not isinstance(split, int) or isinstance(split, bool) or split < 2:
        raise ValueError(f"split must be an integer >= 2, got {split!r}")
    if child_cfg.split != split:
        raise ValueError(f"child_cfg has split={child_cfg.split} but the merge uses split={split}; one tree has "
                         f"one split (use child_cfg.override(split={split}) for standalone children)")
    return dataclasses.replace(child_cfg, hidden=split * child_cfg.hidden, head_dim=split * child_cfg.head_dim,
                               levels=child_cfg.levels + 1)


def _check_children(children, child_cfg, split):
    """ValueError naming the first way the children do not fit child_cfg or each other."""
    if not isinstance(children, (list, tuple)) or len(children) != split:
        got = len(children) if isinstance(children, (list, tuple)) else type(children).__name__
        raise ValueError(f"merge needs exactly split={split} children, got {got}")
    cfgs = list(child_cfg) if isinstance(child_cfg, (list, tuple)) else [child_cfg] * split
    if len(cfgs) != split or not all(isinstance(c, Config) for c in cfgs):
        raise ValueError(f"child_cfg must be one Config or a list of {split} Configs")
    for r, c in enumerate(cfgs[1:], start=1):
        diff = [f"{f.name} {getattr(c, f.name)!r} vs {getattr(cfgs[0], f.name)!r}"
                for f in dataclasses.fields(Config) if getattr(c, f.name) != getattr(cfgs[0], f.name)]
        if diff:
            raise ValueError(f"child {r}'s config differs from child 0's: {', '.join(diff)}")
    variant_of(cfgs[0]).require("merge", "merging models (merge)")
    want = flatten(param_shapes(cfgs[0]))
    dtypes = set()
    for r, child in enumerate(children):
        if not isinstance(child, dict) or "layers" not in child:
            raise ValueError(f"child {r} is not a params dict (got {type(child).__name__})")
        flat = flatten(child)
        if len(child["layers"]) != cfgs[0].layers:
            raise ValueError(f"child {r} has {len(child['layers'])} layers, child_cfg has layers={cfgs[0].layers}")
        missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
        if missing or extra:
            raise ValueError(f"child {r}'s arrays do not match child_cfg: missing {missing}, unexpected {extra}")
        for name, shape in want.items():
            if tuple(onp.shape(flat[name])) != shape:
                raise ValueError(f"child {r}: array {name} has shape {tuple(onp.shape(flat[name]))}, "
                                 f"child_cfg needs {shape}")
            dtypes.add(onp.asarray(flat[name]).dtype)
    if len(dtypes) != 1 or next(iter(dtypes)) not in (onp.float32, onp.float64):
        raise ValueError(f"the children's arrays must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    return cfgs[0], next(iter(dtypes))


def merge(children, child_cfg, split, off_diagonal="zero", scale=0.1, seed=0):
    """Merge `split` models of config child_cfg into one FractalFormer: child r becomes node (1, r).

    Returns (params, parent_cfg), with parent_cfg.sub(1) == child_cfg. The children may themselves be
    FractalFormers (levels >= 1); their nodes (l, j) become (l+1, r*split**l + j), unchanged.
    New entries (off-diagonal blocks of Wq/Wk/Wv/Wo/Wgate/Wup/Wdown) are zero, or with
    off_diagonal="random" uniform in +-scale/sqrt(fan_in), a `scale` fraction of the usual init.
    """
    if off_diagonal not in OFF_DIAGONAL:
        raise ValueError(f"off_diagonal must be one of {OFF_DIAGONAL}, got {off_diagonal!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
        raise ValueError(f"scale must be a number >= 0, got {scale!r}")
    child_cfg, dtype = _check_children(children, child_cfg, split)
    cfg = parent_config(child_cfg, split)
    if off_diagonal == "zero":
        params = map_roles(lambda a, roles: onp.zeros(a.shape, dtype), init_params(cfg, seed))
    else:
        params = map_roles(lambda a, roles: (a * a.dtype.type(scale)).astype(dtype), init_params(cfg, seed))
    for r, child in enumerate(children):
        def write(block, roles, source):
            block[...] = source
        map_roles(write, view(params, cfg, 1, r), child)
    for r, child in enumerate(children):
        placed, given = flatten(view(params, cfg, 1, r)), flatten(child)
        clash = [name for name in given if not onp.array_equal(placed[name], given[name])]
        if clash:   # only possible for arrays whose rows siblings share (roles "L", "G")
            raise ValueError(f"child {r}'s arrays {clash} share entries with a sibling and their values differ")
    return params, cfg


def extract(params, cfg, level, index):
    """A standalone deep copy of model (level, index): the params of a model of config cfg.sub(level)."""
    return map_roles(lambda a, roles: onp.array(a, copy=True, order="C"), view(params, cfg, level, index))


def trainable_mask(params, cfg, frozen_level=1):
    """Flat name -> bool array: True exactly outside the union of the index sets of the models at
    `frozen_level` (after a merge: the new off-diagonal blocks and the new root's row of the per-node
    tables; norm gains, biases and E are all frozen)."""
    cfg.check_level(frozen_level)
    covered = map_roles(lambda a, roles: onp.zeros(onp.shape(a), dtype=bool), params)
    for j in range(cfg.n_models(frozen_level)):
        covered = map_roles(lambda c, roles, m: c | m, covered, index_mask(params, cfg, frozen_level, j))
    return {name: ~c for name, c in flatten(covered).items()}


def root_loss(params, cfg, ids, targets, rng=None):
    """Cross-entropy of the root model (0, 0) alone: the tree loss with level_weights [1, 0, 0, ...]."""
    return fast.cross_entropy_per_model(fast.forward_level(params, cfg, 0, ids, rng), targets)[0]
