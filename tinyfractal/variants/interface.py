"""The interface every variant implements (`Variant`), and the error for what a variant cannot do.

The registry that maps a config to its variant is variants/__init__.py; the variants themselves
(base.py, coupled.py, byte_model.py) subclass `Variant` from here.
"""
from tinyfractal.core import flops


def unsupported(variant, what, why):
    """The ValueError for something a variant cannot do: it names the variant, the request and the reason."""
    return ValueError(f"{what} is not supported for the {variant.name} variant: {why}")


class Variant:
    """What every variant answers. Generic code calls only these.

    Shapes: ids are (B,T) token ids for token variants and (B,T,g_0) byte groups for bytes; N models of one
    level; V vocabulary.
    """
    name = "?"
    extra_roles = {}       # names of the arrays this variant adds to the params, and their axis roles (tree.py)

    def validate(self, cfg):
        """Raise ValueError for a config this variant cannot run (after the generic checks passed)."""

    def extra_params(self, cfg):
        """The arrays this variant adds to `init_params`: {name: float32 array}."""
        return {}

    def tokenizer(self, cfg):
        """The tokenizer whose ids this variant reads."""
        raise NotImplementedError

    def training_rows(self, cfg, tokens):
        """The token array as the rows `data.batch_at` cuts windows from."""
        return tokens

    def check_ids(self, cfg, ids):
        """Raise ValueError unless ids are a batch this variant can read; returns them as an array."""
        raise NotImplementedError

    def forward(self, params, cfg, ids, rng=None):
        """Logits of the model `params` of config `cfg` (its root): the public `forward`."""
        raise NotImplementedError

    def forward_node(self, params, cfg, level, index, ids):
        """Logits of node (level, index) of the whole tree `params`, by the readable reference path."""
        raise NotImplementedError

    def level_logits(self, params, cfg, level, ids, rng=None):
        """Logits of every model of one level, level-batched: (N, B, T, ..., V)."""
        raise NotImplementedError

    def node_losses(self, params, cfg, ids, targets, rng=None):
        """Per level, every model's mean loss, level-batched (the fast path training uses): [(1,), (s,), ...]."""
        raise NotImplementedError

    def decoder(self, params, cfg, level, indices):
        """A KV-cached decoder for models `indices` of `level` (inference/decoder.py)."""
        raise NotImplementedError

    def node_flops(self, cfg, level, T):
        """Forward matmul FLOPs to get one node's logits for one sequence of T positions, running every
        node it needs (core/flops.py)."""
        raise NotImplementedError

    def own_flops(self, cfg, level, T):
        """Forward FLOPs one model of `level` adds to a pass of the whole tree (its layers, output, coupling)."""
        return self.node_flops(cfg, level, T)

    def train_step_flops(self, cfg, batch):
        """FLOPs of one training step on the whole tree: 3x every model's forward."""
        return flops.train_step_flops(cfg, batch, lambda m: self.own_flops(cfg, m, cfg.context))

    def supports(self, feature):
        """True if this variant can do `feature` (one of FEATURES); `require` raises otherwise."""
        return feature in self.features

    features = ()
    why_not = {}           # feature -> the reason this variant cannot do it

    def require(self, feature, what=None):
        if not self.supports(feature):
            raise unsupported(self, what or feature, self.why_not.get(feature, "not implemented"))


FEATURES = ("speculative", "ensemble", "merge", "grow", "trace")
