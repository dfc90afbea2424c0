"""tinyfractal: a small NumPy + autograd engine for FractalFormer, a transformer of nested transformers."""
from tinyfractal.config import Config
from tinyfractal.core.tree import nodes, parent, children, index_mask
from tinyfractal.core.model import count_params
from tinyfractal.api import (init_params, view, level_view, forward, forward_node, forward_level, node_losses,
                             tree_loss, tree_loss_reference)
from tinyfractal.inference.sample import generate
from tinyfractal.training.checkpoint import save, load
from tinyfractal.text.bpe import Tokenizer
from tinyfractal.training.merge import merge, extract
from tinyfractal.training.grow import grow
from tinyfractal.tools.trace import trace_node
from tinyfractal.inference.speculative import speculative_generate
from tinyfractal.inference.ensemble import ensemble_logits
from tinyfractal.variants import variant_of

__all__ = ["Config", "nodes", "parent", "children", "view", "level_view", "index_mask", "init_params",
           "count_params", "forward", "forward_node", "forward_level", "node_losses", "tree_loss",
           "tree_loss_reference", "generate", "save", "load", "Tokenizer", "merge", "extract", "grow", "trace_node",
           "speculative_generate", "ensemble_logits", "variant_of"]
