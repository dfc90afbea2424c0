"""tinyfractal: a small NumPy + autograd engine for FractalFormer, a transformer of nested transformers."""
from .config import Config
from .tree import nodes, parent, children, view, level_view, index_mask
from .model import init_params, forward, count_params, tree_loss_reference
from .fast import forward_level
from .train import tree_loss, node_losses
from .sample import generate
from .checkpoint import save, load
from .tokenizer import Tokenizer
from .merge import merge, extract
from .grow import grow
from .trace import trace_node
from .speculative import speculative_generate
from .ensemble import ensemble_logits

__all__ = ["Config", "nodes", "parent", "children", "view", "level_view", "index_mask", "init_params",
           "forward", "count_params", "tree_loss_reference", "forward_level", "tree_loss", "node_losses", "generate",
           "save", "load", "Tokenizer", "merge", "extract", "grow", "trace_node",
           "speculative_generate", "ensemble_logits"]
