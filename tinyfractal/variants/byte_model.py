"""Byte-level FractalFormer: the smallest models read bytes, the upper levels read "concepts" (docs/design.md).

With `tokenizer="bytes"` the vocabulary is the 256 byte values of UTF-8 text, so every string works.
A model at level l of an L-level tree reads the bytes in groups of g_l = split^(L-1-l): the leaves
read single bytes, each level up reads groups split times longer.

  concept of a group b_0..b_(g-1):  rmsnorm(sum_m E[b_m] * (1 + P_l[m]), emb_norm)
  slot m of the next group:         logits_m = (rmsnorm(x, final_norm) * (1 + Q_l[m]) * output_gain)
                                               . rmsnorm_rows(E, out_norm)^T   (output_gain: model.py)

P_l and Q_l are (g_l, d) gains per slot, zero at the start. P makes the order inside a group matter
(without it "tac " and "cat " would be the same concept); Q lets each slot read its own byte out of
the one state. Levels with g = 1 (the leaves) have no slot gains: a leaf IS the base model on bytes.
P and Q of all levels are stacked in one (slots, D) array each; tree.py's role "G" gives model (l, j)
the rows of its own level and of the levels below it, so its view is a byte model of L-l levels.

Context: every level has cfg.context positions, so level l sees context * g_l bytes (the original's
hope: a longer context from the fractal structure of language) at the same attention cost.
Training data: the bytes as rows of g_0 (one top-level group per row), so `data.batch_at` cuts
windows of context+1 groups; level l reads the last (context+1) * g_l bytes of each window.
Losses are nats per byte (mean over slots and positions); `bits` turns them into bits per byte.
"""
import math

import numpy as onp
import autograd.numpy as np

from tinyfractal.core import fast, flops, formulas, model
from tinyfractal.core.model import scale_output
from tinyfractal.core.tree import group_size, level_view, view
from tinyfractal.text.byte_tokenizer import DECODE_NOTE, ByteTokenizer  # noqa: F401  (DECODE_NOTE: for lessons)
from tinyfractal.validate import check_ids
from tinyfractal.variants.interface import FEATURES
from tinyfractal.variants.base import Base

PAD_BYTE = ord("\n")   # left padding of a prompt to whole groups: the start of a line, as in the corpus


def context_bytes(cfg, level):
    """How many bytes a model at this level sees: cfg.context positions of g_l bytes."""
    return cfg.context * group_size(cfg, level)


def bits(nats):
    """nats -> bits: divide by ln 2."""
    return nats / math.log(2)


def check_groups(cfg, groups, level=0, what="groups"):
    """groups must be (B, T, g_level) integer byte values in [0, 256) with 1 <= T <= context."""
    return check_ids(cfg, groups, what, group=group_size(cfg, level))


def slot_gain(params, name, g):
    """1 + (the first g rows of P or Q): the gains of this model's own level; 1 when g == 1. (g, d)"""
    return 1.0 if g == 1 else 1.0 + params[name][..., :g, :]


# The readable reference: one model, with the functions of model.py.

def concept_embedding(params, cfg, groups):
    """rmsnorm(sum_m E[b_m] * (1 + P[m]), emb_norm). groups (B,T,g) -> (B,T,D)."""
    groups = check_groups(cfg, groups)
    B, T, g = groups.shape
    summed = np.sum(params["E"][groups] * slot_gain(params, "P", g), axis=2)      # (B,T,g,D) -> (B,T,D)
    return formulas.rmsnorm(summed, params["emb_norm"], cfg.eps)


def slot_logits(x, params, cfg, g):
    """One distribution per slot of the next group. x (B,T,D) -> (B,T,g,V)."""
    B, T, D = x.shape
    h = formulas.rmsnorm(x, params["final_norm"], cfg.eps)[:, :, None, :] * slot_gain(params, "Q", g)  # (B,T,g,D)
    h = scale_output(h, params, cfg)
    out_emb = model.output_table(params["E"], params["out_norm"], cfg.eps)                             # (V,D)
    return np.reshape(np.dot(np.reshape(h, (B * T * g, D)), np.transpose(out_emb)), (B, T, g, -1))


def forward(params, cfg, groups, rng=None):
    """Logits of one byte model. groups (B,T,g_0) byte ids -> (B,T,g_0,V): the next group's bytes."""
    x = concept_embedding(params, cfg, groups)                                  # (B,T,D)
    for p in params["layers"]:
        x = model.layer(x, p, cfg, rng)
    return slot_logits(x, params, cfg, groups.shape[2])


def cross_entropy(logits, targets):
    """Mean over slots and positions, in nats per byte. logits (B,T,g,V), targets (B,T,g)."""
    return fast.cross_entropy_per_model(logits[None], targets)[0]


# The level-batched fast path: every op carries the leading N axis of level_view, as in fast.py.

def forward_stacked(stacked, cfg, groups, rng=None):
    """Logits of N byte models stacked on a leading axis. groups (B,T,g) -> (N,B,T,g,V)."""
    groups = check_groups(cfg, groups)
    B, T, g = groups.shape
    N, V, d = stacked["E"].shape
    e = np.reshape(fast.embed(stacked, groups.reshape(B, T * g)), (N, B, T, g, d))
    gain_in = slot_gain(stacked, "P", g)
    gain_in = gain_in[:, None, None] if g > 1 else gain_in                      # (N,1,1,g,d)
    x = fast.norm(np.sum(e * gain_in, axis=3), stacked["emb_norm"], cfg.eps)    # (N,B,T,d)
    for p in stacked["layers"]:
        x = fast.block(x, p, cfg, rng)
    gain_out = slot_gain(stacked, "Q", g)
    gain_out = gain_out[:, None, None] if g > 1 else gain_out
    h = scale_output(fast.norm(x, stacked["final_norm"], cfg.eps)[:, :, :, None, :] * gain_out, stacked, cfg)
    out_emb = fast.norm(stacked["E"], stacked["out_norm"], cfg.eps)             # (N,V,d)
    return fast.matmul_rows(h, np.transpose(out_emb, (0, 2, 1)))                # (N,B,T,g,V)


def forward_level(params, cfg, level, groups, rng=None):
    """Logits of every model of one level. groups (B,T,g_level) -> (N,B,T,g_level,V)."""
    cfg.check_level(level)
    return forward_stacked(level_view(params, cfg, level), cfg.sub(level), groups, rng)


# Losses over the tree. ids and targets come from data.batch_at on rows of g_0 bytes: (B, T, g_0) each.

def level_batch(ids, targets, cfg, level):
    """The inputs and targets of one level: the last (T+1)*g_l bytes of each window. -> (B,T,g_l) each."""
    ids, targets = onp.asarray(ids), onp.asarray(targets)
    g0 = group_size(cfg, 0)
    if ids.ndim != 3 or ids.shape[2] != g0 or targets.shape != ids.shape:
        raise ValueError(f"byte batches are (B, T, g_0={g0}) rows of bytes (see concepts.group_rows), "
                         f"ids and targets alike; got {ids.shape} and {targets.shape}")
    B, T, _ = ids.shape
    window = onp.concatenate([ids, targets[:, -1:]], axis=1).reshape(B, (T + 1) * g0)
    g = group_size(cfg, level)
    window = window[:, -(T + 1) * g:]
    return window[:, :-g].reshape(B, T, g), window[:, g:].reshape(B, T, g)


def node_losses(params, cfg, ids, targets, rng=None):
    """Per-level arrays of per-model losses in nats per byte: [(1,), (s,), (s^2,), ...]."""
    out = []
    for level in range(cfg.levels):
        inputs, wanted = level_batch(ids, targets, cfg, level)
        out.append(fast.cross_entropy_per_model(forward_level(params, cfg, level, inputs, rng), wanted))
    return out


def slot_losses(params, cfg, ids, targets):
    """Per level, every model's loss at each slot of the next group, nats: [(1, g_0), (s, g_1), ...].

    Slot 0 is the very next byte; slot m is m bytes further ahead, read from the same state.
    """
    out = []
    for level in range(cfg.levels):
        inputs, wanted = level_batch(ids, targets, cfg, level)
        logits = forward_level(params, cfg, level, inputs)                      # (N,B,T,g,V)
        out.append(onp.stack([fast.cross_entropy_per_model(logits[:, :, :, m], wanted[:, :, m])
                              for m in range(inputs.shape[2])], axis=1))
    return out


# Data.

def group_rows(byte_ids, cfg):
    """(n,) bytes -> (n // g_0, g_0): one top-level group per row (a tail shorter than g_0 is dropped)."""
    g = group_size(cfg, 0)
    byte_ids = onp.asarray(byte_ids, dtype=onp.int32)
    n = len(byte_ids) // g * g
    return byte_ids[:n].reshape(-1, g)


def load_split(cfg, path=None):
    """The corpus as bytes, split 90/10 as data.train_val_split, each part as rows of g_0 bytes."""
    from tinyfractal.training.data import load_tokens, train_val_split
    byte_ids = load_tokens(ByteTokenizer()) if path is None else load_tokens(ByteTokenizer(), path)
    train, val = train_val_split(byte_ids)
    return group_rows(train, cfg), group_rows(val, cfg)


def node_flops(cfg, level, T):
    """Forward matmul FLOPs of one model at this level for T positions: its layers, and g output slots each."""
    return flops.model_flops(cfg, level, T, logits=False) + flops.output_flops(cfg, level, T, slots=group_size(cfg, level))


def flops_per_byte(cfg, level):
    """Forward matmul FLOPs per byte of one model at this level, over a full context."""
    return node_flops(cfg, level, cfg.context) / context_bytes(cfg, level)




class Bytes(Base):
    """The byte variant: the generic machinery with concept embeddings in and one distribution per slot out."""
    name = "bytes"
    features = tuple(f for f in FEATURES if f not in ("speculative", "grow", "trace"))
    why_not = {
        "speculative": "its levels read groups of different sizes, so a drafter's positions are not the verifier's",
        "grow": "growing trains BPE leaves on chunks of the corpus; byte models are not wired into it",
        "trace": "the shape trace follows the token model's ops; a byte model sums slots into concepts first",
    }
    extra_roles = {"P": ("G", "R"), "Q": ("G", "R")}

    def validate(self, cfg):
        if cfg.vocab_size != 256:
            raise ValueError(f"the bytes variant reads the 256 byte values, so vocab_size must be 256, got {cfg.vocab_size}")
        if cfg.coupling != "none":
            raise ValueError(f"the bytes variant runs uncoupled models, so coupling must be 'none', got {cfg.coupling!r}")

    def extra_params(self, cfg):
        """A gain per byte slot on input and output, for every level above the leaves: (slots, D) each."""
        from tinyfractal.core.tree import slot_offset
        slots = slot_offset(cfg, cfg.levels - 1)
        return {"P": onp.zeros((slots, cfg.hidden), onp.float32), "Q": onp.zeros((slots, cfg.hidden), onp.float32)}

    def tokenizer(self, cfg):
        return ByteTokenizer()

    def training_rows(self, cfg, tokens):
        return group_rows(tokens, cfg)

    def check_ids(self, cfg, ids, what="groups", level=0):
        return check_groups(cfg, ids, level, what)

    def check_targets(self, cfg, ids, targets):
        targets = check_groups(cfg, targets, 0, "targets")
        if targets.shape != ids.shape:
            raise ValueError(f"targets have shape {targets.shape} but groups have {ids.shape}; they must match")
        return targets

    def level_batch(self, cfg, level, ids, targets):
        return level_batch(ids, targets, cfg, level)

    def forward(self, params, cfg, ids, rng=None):
        return forward(params, cfg, ids, rng)

    def forward_node(self, params, cfg, level, index, ids):
        """Node (level, index) on its level's own groups (B,T,g_level)."""
        return forward(view(params, cfg, level, index), cfg.sub(level), ids)

    def level_logits(self, params, cfg, level, ids, rng=None):
        return forward_level(params, cfg, level, ids, rng)

    def node_losses(self, params, cfg, ids, targets, rng=None):
        return node_losses(params, cfg, ids, targets, rng)

    def node_flops(self, cfg, level, T):
        return node_flops(cfg, level, T)

    # decoding: a position is a group of g bytes

    def check_decoder_ids(self, dec, ids):
        a = onp.asarray(ids)
        if a.ndim == 4:
            if a.shape[0] != dec.N:
                raise ValueError(f"per-model groups must have shape (N={dec.N}, B, Tn, g), got {a.shape}")
            check_groups(dec.cfg, a.reshape((-1,) + a.shape[2:]), dec.level)
        else:
            check_groups(dec.cfg, a, dec.level)
        return a

    def positions(self, cfg, ids):
        return ids.shape[-2]

    def batch_of(self, ids):
        return ids.shape[-3]

    def decoder_embed(self, dec, w, ids):
        """Concept embeddings: rmsnorm(sum_m E[b_m] * (1 + P[m]), emb_norm). -> (N,B,Tn,d)."""
        E, g = w.stacked["E"], ids.shape[-1]
        rows = E[:, ids] if ids.ndim == 3 else E[onp.arange(w.N)[:, None, None, None], ids]   # (N,B,Tn,g,d)
        if g > 1:
            rows = rows * (1 + w.stacked["P"][:, None, None, :g])
        return formulas.rmsnorm(rows.sum(axis=3), w.stacked["emb_norm"][:, None, None, :], dec.cfg.eps, onp)

    def decoder_output(self, dec, w, u):
        """One distribution per slot: (u * (1+final_norm) * out_gain * (1+Q[m])) . out_table^T. (N,M,d) -> (N,M,g,V)."""
        g = group_size(dec.cfg, dec.level)
        gain = (1 + w.stacked["final_norm"][:, None, :]) * w.out_gain                    # (N,1,d)
        if g > 1:
            gain = gain * (1 + w.stacked["Q"][:, :g])                                    # (N,g,d)
        N, M, d = u.shape
        h = (u[:, :, None, :] * gain[:, None]).reshape(N, M * gain.shape[1], d)
        out = dec.matmul(h, onp.transpose(w.out_table, (0, 2, 1)))
        return out.reshape(N, M, gain.shape[1], -1)

    # sampling

    def prompt_ids(self, cfg, tokenizer, prompt, level=0):
        """The prompt's bytes (an empty prompt is a newline), padded on the left with PAD_BYTE to whole groups."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        g = group_size(cfg, level)
        ids = tokenizer.encode(prompt if prompt else "\n")
        ids = [PAD_BYTE] * (-len(ids) % g) + ids
        return [tuple(ids[i:i + g]) for i in range(0, len(ids), g)]

    def new_positions(self, cfg, level, max_new):
        """Groups to generate for max_new new bytes."""
        g = group_size(cfg, level)
        return -(-max_new // g)

    def choose(self, logits, pick):
        """The next group: each slot picked from its own distribution. logits (g,V) -> tuple of g bytes."""
        return tuple(pick(row) for row in logits)

    def text_of(self, tokenizer, new, max_new=None):
        flat = [b for group in new for b in group]
        return tokenizer.decode(flat[:max_new])
