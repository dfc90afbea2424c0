"""Byte-level FractalFormer: the smallest models read bytes, the upper levels read "concepts" (SPEC §4).

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

from tinyfractal.core import fast
from tinyfractal.core.model import attention, dropout, level_weight_table, mlp, rmsnorm, scale_output
from tinyfractal.core.tree import group_size, level_view, nodes, view

PAD_BYTE = ord("\n")   # left padding of a prompt to whole groups: the start of a line, as in the corpus
DECODE_NOTE = ("bytes are decoded as UTF-8 with errors='replace': a byte sequence that is not valid UTF-8 "
               "shows as U+FFFD (\ufffd) instead of failing")


class ByteTokenizer:
    """Text <-> UTF-8 bytes. 256 ids, no unknown characters, and `decode` never fails."""
    vocab_size = 256

    def encode(self, text):
        """str -> list of byte values 0..255."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {text[e.start]!r} at {e.start}, which UTF-8 cannot "
                             f"encode; only real characters can be encoded") from None

    def encode_array(self, text):
        """str -> (n_bytes,) int32."""
        return onp.asarray(self.encode(text), dtype=onp.int32)

    def decode(self, ids):
        """Byte values -> str; invalid UTF-8 becomes U+FFFD (errors='replace'), so this never fails."""
        ids = [int(i) for i in onp.asarray(ids, dtype=onp.int64).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte ids must be in 0..255, got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")


def check_bytes(cfg):
    """Raise ValueError unless cfg is a byte model this module can run."""
    if cfg.tokenizer != "bytes":
        raise ValueError(f"this is a byte-model function but the config has tokenizer={cfg.tokenizer!r}; "
                         f"use tokenizer='bytes' (with vocab_size=256)")
    if cfg.coupling != "none":
        raise ValueError(f"byte models run uncoupled; got coupling={cfg.coupling!r}, allowed: 'none'")


def context_bytes(cfg, level):
    """How many bytes a model at this level sees: cfg.context positions of g_l bytes."""
    return cfg.context * group_size(cfg, level)


def bits(nats):
    """nats -> bits: divide by ln 2."""
    return nats / math.log(2)


def check_groups(cfg, groups):
    """groups must be (B, T, g) byte values with g = g_0 of this config and T <= context."""
    groups = onp.asarray(groups)
    g = group_size(cfg, 0)
    if groups.ndim != 3 or groups.shape[2] != g or not 1 <= groups.shape[1] <= cfg.context:
        raise ValueError(f"a level-0 model of this config reads groups of shape (B, T, {g}) with "
                         f"1 <= T <= context={cfg.context}; got shape {groups.shape}")
    if groups.size and (groups.min() < 0 or groups.max() > 255):
        raise ValueError(f"byte ids must be in 0..255, got values {groups.min()}..{groups.max()}")
    return groups


def slot_gain(params, name, g):
    """1 + (the first g rows of P or Q): the gains of this model's own level; 1 when g == 1. (g, d)"""
    return 1.0 if g == 1 else 1.0 + params[name][..., :g, :]


# The readable reference: one model, with the functions of model.py.

def concept_embedding(params, cfg, groups):
    """rmsnorm(sum_m E[b_m] * (1 + P[m]), emb_norm). groups (B,T,g) -> (B,T,D)."""
    groups = check_groups(cfg, groups)
    B, T, g = groups.shape
    summed = np.sum(params["E"][groups] * slot_gain(params, "P", g), axis=2)      # (B,T,g,D) -> (B,T,D)
    return rmsnorm(summed, params["emb_norm"], cfg.eps)


def slot_logits(x, params, cfg, g):
    """One distribution per slot of the next group. x (B,T,D) -> (B,T,g,V)."""
    B, T, D = x.shape
    h = rmsnorm(x, params["final_norm"], cfg.eps)[:, :, None, :] * slot_gain(params, "Q", g)   # (B,T,g,D)
    h = scale_output(h, params, cfg)
    out_emb = rmsnorm(params["E"], params["out_norm"], cfg.eps)                                # (V,D)
    return np.reshape(np.dot(np.reshape(h, (B * T * g, D)), np.transpose(out_emb)), (B, T, g, -1))


def forward(params, cfg, groups, rng=None):
    """Logits of one byte model. groups (B,T,g_0) byte ids -> (B,T,g_0,V): the next group's bytes."""
    check_bytes(cfg)
    x = concept_embedding(params, cfg, groups)                                  # (B,T,D)
    for p in params["layers"]:
        x = x + dropout(attention(rmsnorm(x, p["attn_norm"], cfg.eps), p, cfg), cfg.dropout, rng)
        x = x + dropout(mlp(rmsnorm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)
    return slot_logits(x, params, cfg, groups.shape[2])


def cross_entropy(logits, targets):
    """Mean over slots and positions, in nats per byte. logits (B,T,g,V), targets (B,T,g)."""
    return fast.cross_entropy_per_model(logits[None], targets)[0]


# The level-batched fast path: every op carries the leading N axis of level_view, as in fast.py.

def forward_stacked(P, cfg, groups, rng=None):
    """Logits of N byte models stacked on a leading axis. groups (B,T,g) -> (N,B,T,g,V)."""
    check_bytes(cfg)
    groups = check_groups(cfg, groups)
    B, T, g = groups.shape
    N, V, d = P["E"].shape
    e = np.reshape(fast.embed(P, groups.reshape(B, T * g)), (N, B, T, g, d))
    gain_in = slot_gain(P, "P", g)
    gain_in = gain_in[:, None, None] if g > 1 else gain_in                      # (N,1,1,g,d)
    x = fast.norm(np.sum(e * gain_in, axis=3), P["emb_norm"], cfg.eps)          # (N,B,T,d)
    for p in P["layers"]:
        x = fast.block(x, p, cfg, rng)
    gain_out = slot_gain(P, "Q", g)
    gain_out = gain_out[:, None, None] if g > 1 else gain_out
    h = scale_output(fast.norm(x, P["final_norm"], cfg.eps)[:, :, :, None, :] * gain_out, P, cfg)   # (N,B,T,g,d)
    out_emb = fast.norm(P["E"], P["out_norm"], cfg.eps)                         # (N,V,d)
    return fast.matmul_rows(h, np.transpose(out_emb, (0, 2, 1)))                # (N,B,T,g,V)


def forward_level(params, cfg, level, groups, rng=None):
    """Logits of every model of one level. groups (B,T,g_level) -> (N,B,T,g_level,V)."""
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


def tree_loss(params, cfg, ids, targets, level_weights=None, rng=None):
    """Mean over every node of its loss in nats per byte (weighted per level if asked)."""
    weights = level_weight_table(cfg, level_weights)
    losses = node_losses(params, cfg, ids, targets, rng)
    return sum(weights[level] * np.sum(losses[level]) for level in range(cfg.levels))


def tree_loss_reference(params, cfg, ids, targets, level_weights=None):
    """The tree loss node by node with the reference forward. Readable, slow."""
    weights = level_weight_table(cfg, level_weights)
    loss = 0.0
    for level, j in nodes(cfg):
        inputs, wanted = level_batch(ids, targets, cfg, level)
        loss = loss + weights[level] * cross_entropy(forward(view(params, cfg, level, j), cfg.sub(level), inputs),
                                                     wanted)
    return loss


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
    check_bytes(cfg)
    byte_ids = load_tokens(ByteTokenizer()) if path is None else load_tokens(ByteTokenizer(), path)
    train, val = train_val_split(byte_ids)
    return group_rows(train, cfg), group_rows(val, cfg)


def flops_per_byte(cfg, level):
    """Forward matmul FLOPs per byte of one model at this level, counted as coupling.model_flops counts
    (2 per multiply-add, attention over the full T x T square as computed), plus g output slots per position."""
    from tinyfractal.variants.coupled import model_flops
    T, g = cfg.context, group_size(cfg, level)
    return (model_flops(cfg, level, T, logits=False) + T * 2 * g * cfg.width(level) * cfg.vocab_size) / (T * g)


# Generation.

def generate(params, cfg, prompt, level=0, index=0, max_new_bytes=200, temperature=1.0, top_k=None,
             top_p=None, seed=0):
    """Text from byte model (level, index): the prompt followed by max_new_bytes sampled bytes.

    The prompt (an empty one starts from a newline) is padded on the left with PAD_BYTE to whole
    groups of g_l bytes. Each step runs the model on the last `context` groups and samples the next
    group's g_l bytes slot by slot, each slot with its own temperature / top-k / top-p filtered
    distribution. The slots come from the same state, so given the past they are drawn independently.
    The new bytes are decoded with errors='replace' (DECODE_NOTE): the text is always valid.
    """
    from tinyfractal.inference.sample import check_sampling, sample_token
    check_bytes(cfg)
    cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_bytes)
    tok = ByteTokenizer()
    p, sub, g = view(params, cfg, level, index), cfg.sub(level), group_size(cfg, level)
    ids = tok.encode(prompt if prompt else "\n")
    ids = [PAD_BYTE] * (-len(ids) % g) + ids
    rng = onp.random.default_rng(seed)
    new = []
    while len(new) < max_new_bytes:
        window = onp.asarray(ids[-cfg.context * g:]).reshape(1, -1, g)
        logits = forward(p, sub, window)[0, -1]                                 # (g, V)
        group = [sample_token(logits[m], rng, temperature, top_k, top_p) for m in range(g)]
        ids += group
        new += group
    return prompt + tok.decode(new[:max_new_bytes])
