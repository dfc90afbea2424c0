"""The engine functions that the checks compare students' answers with.

This is the one file of the exercises that names the engine's internal modules, so that when a module
moves only these imports change. Every name here is the engine's own code, never a second copy.
"""
from tinyfractal import (Config, Tokenizer, children, count_params, extract, forward, index_mask, init_params,
                         merge, node_losses, nodes, tree_loss, view)
from tinyfractal.variants.byte_model import concept_embedding, context_bytes
from tinyfractal.api import needed_nodes
from tinyfractal.variants.coupled import concat_children, split_to_children
from tinyfractal.training.merge import parent_config, trainable_mask
from tinyfractal.core.formulas import rmsnorm, rope, rope_tables, tied_logits
from tinyfractal.core.model import attention, mlp, output_gain
from tinyfractal.core.formulas import cross_entropy
from tinyfractal.paths import CORPUS
from tinyfractal.inference.speculative import accept_greedy, accept_sampled, resolve_drafters
from tinyfractal.text.bpe import _merge_list as merge_list
from tinyfractal.text.bpe import train as train_bpe
from tinyfractal.core.tree import flatten, group_size, node_slices, slot_offset
from tinyfractal.fractal import fgn, hurst_rs, integral_process, self_similarity, token_bits, token_lengths
from tinyfractal.training.train import TrainConfig, clip_threshold, level_weights_at, node_key
from tinyfractal.training.data import batch_at

__all__ = ["Config", "Tokenizer", "children", "count_params", "extract", "forward", "index_mask", "init_params",
           "merge", "node_losses", "nodes", "tree_loss", "view", "concept_embedding", "context_bytes",
           "concat_children", "needed_nodes", "split_to_children", "parent_config", "trainable_mask",
           "attention", "mlp", "rmsnorm", "rope", "rope_tables", "tied_logits", "CORPUS", "accept_greedy", "accept_sampled",
           "resolve_drafters", "merge_list", "train_bpe", "flatten", "group_size", "node_slices", "slot_offset", "fgn", "hurst_rs",
           "integral_process", "self_similarity", "token_bits", "batch_at", "output_gain", "cross_entropy",
           "token_lengths", "summarize", "TrainConfig", "clip_threshold", "level_weights_at", "node_key"]


def summarize(*args, **kwargs):
    """tools/study.py's summarize (the nesting tax per node and level), imported when first used: the
    study module draws with matplotlib, which `python -m tinyfractal.exercises` should not wait for."""
    from tinyfractal.tools.study import summarize as study_summarize
    return study_summarize(*args, **kwargs)
