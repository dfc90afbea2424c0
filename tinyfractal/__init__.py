"""tinyfractal: a small NumPy + autograd engine for FractalFormer, a transformer of nested transformers."""
from tinyfractal.config import Config
from tinyfractal.core.tree import nodes, parent, children, view, level_view, index_mask
from tinyfractal.core.model import init_params, forward, count_params, tree_loss_reference
from tinyfractal.core.fast import forward_level
from tinyfractal.training.train import tree_loss, node_losses
from tinyfractal.inference.sample import generate
from tinyfractal.training.checkpoint import save, load
from tinyfractal.text.bpe import Tokenizer
from tinyfractal.training.merge import merge, extract
from tinyfractal.training.grow import grow
from tinyfractal.tools.trace import trace_node
from tinyfractal.inference.speculative import speculative_generate
from tinyfractal.inference.ensemble import ensemble_logits

__all__ = ["Config", "nodes", "parent", "children", "view", "level_view", "index_mask", "init_params",
           "forward", "count_params", "tree_loss_reference", "forward_level", "tree_loss", "node_losses", "generate",
           "save", "load", "Tokenizer", "merge", "extract", "grow", "trace_node",
           "speculative_generate", "ensemble_logits"]
