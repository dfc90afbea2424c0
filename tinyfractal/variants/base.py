"""The base FractalFormer: every node of the tree is an independent transformer cut out of the arrays.

The reference forward is `core/model.py` run on `view(params, cfg, level, j)`; the level-batched fast
path is `core/fast.py`; decoding is the generic decoder with no coupling. The token checks and decoder
hooks here are shared by the coupled variants, which subclass this one.
"""
import numpy as onp

from tinyfractal.core import fast, flops, model
from tinyfractal.core.tree import view
from tinyfractal.validate import check_ids
from tinyfractal.variants.interface import FEATURES, Variant, unsupported


def check_token_ids(cfg, ids, what="ids"):
    """ids must be a (B,T) array of integer token ids in [0, vocab_size) with 1 <= T <= context."""
    return check_ids(cfg, ids, what)


class Base(Variant):
    name = "base"
    features = FEATURES

    # what the model reads

    def tokenizer(self, cfg):
        from tinyfractal.text.bpe import Tokenizer
        return Tokenizer.default()

    def check_ids(self, cfg, ids, what="ids"):
        return check_token_ids(cfg, ids, what)

    def check_targets(self, cfg, ids, targets):
        targets = check_token_ids(cfg, targets, "targets")
        if targets.shape != ids.shape:
            raise ValueError(f"targets have shape {targets.shape} but ids have {ids.shape}; they must match")
        return targets

    def level_batch(self, cfg, level, ids, targets):
        """The inputs and targets a model of `level` reads from a training batch: the same for token models."""
        return ids, targets

    # the forward passes

    def forward(self, params, cfg, ids, rng=None):
        return model.forward(params, cfg, ids, rng)

    def forward_node(self, params, cfg, level, index, ids):
        return model.forward(view(params, cfg, level, index), cfg.sub(level), ids)

    def level_logits(self, params, cfg, level, ids, rng=None):
        return fast.forward_level(params, cfg, level, ids, rng)

    def node_losses(self, params, cfg, ids, targets, rng=None):
        return fast.node_losses(params, cfg, ids, targets, rng)

    def node_flops(self, cfg, level, T):
        return flops.model_flops(cfg, level, T)

    # decoding (inference/decoder.py calls these)

    def members(self, cfg, level, indices):
        """The nodes that run to decode models `indices` of `level`: just those."""
        return {level: list(indices)}

    def decoder_state(self, params, cfg, dec):
        return None

    def check_decoder_ids(self, dec, ids):
        """(B,Tn) ids for every decoded model, or (N,B,Tn) one row per model; integers in [0, V)."""
        a = onp.asarray(ids)
        if a.ndim == 3:
            if a.shape[0] != dec.N:
                raise ValueError(f"per-model ids must have shape (N={dec.N}, B, Tn), got {a.shape}")
            if len(dec.members) > 1:
                raise unsupported(self, "feeding each decoded model its own tokens",
                                  "its models share the nodes they need, which can read only one sequence")
            check_token_ids(dec.cfg, a.reshape(-1, a.shape[-1]))
        else:
            check_token_ids(dec.cfg, a)
        return a

    def positions(self, cfg, ids):
        return ids.shape[-1]

    def batch_of(self, ids):
        return ids.shape[-2]

    def decoder_embed(self, dec, w, ids):
        """Normed embedding rows of the models of one member level. -> (N,B,Tn,d)."""
        if ids.ndim == 2:
            return w.embed_rows[:, ids]
        return w.embed_rows[onp.arange(w.N)[:, None, None], ids]

    def decoder_couple(self, dec, layer, out, delta):
        return out

    def decoder_output(self, dec, w, u):
        """Tied logits from the unit-normed final state (final_norm's gain is folded in). (N,M,d) -> (N,M,V)."""
        return dec.linear(u, w.out_T)

    # sampling (inference/sample.py)

    def prompt_ids(self, cfg, tokenizer, prompt, level=0):
        """Token ids of a prompt; an empty prompt starts from a newline."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return list(tokenizer.encode(prompt if prompt else "\n"))

    def new_positions(self, cfg, level, max_new):
        """Positions to generate for max_new new tokens: one each."""
        return max_new

    def choose(self, logits, pick):
        """The next position from its logits: one token, `pick(logits (V,))`."""
        return pick(logits)

    def text_of(self, tokenizer, new, max_new=None):
        return tokenizer.decode(new)
