"""Reference solutions to the exercises of lesson 4, merging: growing a model instead of training it whole
(handout: lessons/merging.md).

A teacher may delete this folder (tinyfractal/exercises/solutions). Checked with:

    python -m tinyfractal.exercises check merging --solutions

You may use the public API here (import tinyfractal as tf: tf.Config, tf.view, tf.init_params,
tf.count_params), but not tf.merge or tf.extract: those are what you write.
"""
import numpy as np

import tinyfractal as tf


def parent_config(child_cfg, split):
    """The config of the model that `split` models of config child_cfg merge into (their parent).
    Use child_cfg.override(...)."""
    return child_cfg.override(hidden=split * child_cfg.hidden, head_dim=split * child_cfg.head_dim,
                              levels=child_cfg.levels + 1, split=split)


def merge2(child0, child1, child_cfg):
    """Merge two models of config child_cfg (split 2) into one: child r becomes node (1, r) of the
    result, with every array exactly as it was, and all other entries (the new off-diagonal blocks)
    zero. Returns the merged params dict (float32 arrays)."""
    cfg = parent_config(child_cfg, 2)
    params = {key: [{name: np.zeros_like(a) for name, a in layer.items()} for layer in value]
              if key == "layers" else np.zeros_like(value) for key, value in tf.init_params(cfg).items()}
    for r, child in enumerate((child0, child1)):
        place = tf.view(params, cfg, 1, r)              # views: writing into them writes into params
        for key, value in child.items():
            if key == "layers":
                for mine, theirs in zip(place["layers"], value):
                    for name in mine:
                        mine[name][...] = theirs[name]
            else:
                place[key][...] = value
    return params


def new_entries(child_cfg, split):
    """How many entries of the merged model belong to none of the children: the new blocks that
    training after a merge updates."""
    parent = tf.count_params(tf.init_params(parent_config(child_cfg, split)))
    child = tf.count_params(tf.init_params(child_cfg))
    return parent - split * child                        # the children's blocks never overlap


def extract(params, cfg, level, index):
    """Model (level, index) as a standalone model: a params dict of fresh contiguous COPIES, so that
    changing it never changes `params`."""
    def copy(d):
        return {k: [copy(layer) for layer in v] if k == "layers" else np.array(v, copy=True, order="C")
                for k, v in d.items()}
    return copy(tf.view(params, cfg, level, index))
