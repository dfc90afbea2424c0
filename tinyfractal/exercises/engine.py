"""The engine functions that the checks compare students' answers with.

This is the one file of the exercises that names the engine's internal modules, so that when a module
moves only these imports change. Every name here is the engine's own code, never a second copy.
"""
from tinyfractal import (Config, Tokenizer, children, count_params, extract, forward, index_mask, init_params,
                         merge, node_losses, nodes, tree_loss, view)
from tinyfractal.concepts import concept_embedding, context_bytes
from tinyfractal.coupling import concat_children, needed_nodes, split_to_children
from tinyfractal.merge import parent_config, trainable_mask
from tinyfractal.model import attention, mlp, rmsnorm, rope, rope_tables
from tinyfractal.paths import CORPUS
from tinyfractal.speculative import accept_greedy, accept_sampled, resolve_drafters
from tinyfractal.tokenizer import _merge_list as merge_list
from tinyfractal.tokenizer import train as train_bpe
from tinyfractal.tree import flatten, group_size, node_slices, slot_offset

__all__ = ["Config", "Tokenizer", "children", "count_params", "extract", "forward", "index_mask", "init_params",
           "merge", "node_losses", "nodes", "tree_loss", "view", "concept_embedding", "context_bytes",
           "concat_children", "needed_nodes", "split_to_children", "parent_config", "trainable_mask",
           "attention", "mlp", "rmsnorm", "rope", "rope_tables", "CORPUS", "accept_greedy", "accept_sampled",
           "resolve_drafters", "merge_list", "train_bpe", "flatten", "group_size", "node_slices", "slot_offset"]
