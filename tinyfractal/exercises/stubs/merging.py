"""Exercises for lesson 4, merging: growing a model instead of training it whole
(handout: lessons/merging.md).

Replace each `raise NotImplementedError` with your code, then check your work:

    python -m tinyfractal.exercises check merging

You may use the public API here (import tinyfractal as tf: tf.Config, tf.view, tf.init_params,
tf.count_params), but not tf.merge or tf.extract: those are what you write.
"""
import numpy as np

import tinyfractal as tf


def parent_config(child_cfg, split):
    """The config of the model that `split` models of config child_cfg merge into (their parent).
    Use child_cfg.override(...)."""
    raise NotImplementedError


def merge2(child0, child1, child_cfg):
    """Merge two models of config child_cfg (split 2) into one: child r becomes node (1, r) of the
    result, with every array exactly as it was, and all other entries (the new off-diagonal blocks)
    zero. Returns the merged params dict (float32 arrays)."""
    raise NotImplementedError


def new_entries(child_cfg, split):
    """How many entries of the merged model belong to none of the children: the new blocks that
    training after a merge updates."""
    raise NotImplementedError


def extract(params, cfg, level, index):
    """Model (level, index) as a standalone model: a params dict of fresh contiguous COPIES, so that
    changing it never changes `params`."""
    raise NotImplementedError
