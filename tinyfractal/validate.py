"""Input checks for the public API: token ids, integer arguments, and the memory a step needs.

Each check is one call at the top of an entry point (the variants' id checks, training and evaluation).
It raises a ValueError naming what was wrong and what is allowed, so nothing reaches NumPy that would
wrap around (a negative id indexes the last embedding row) or fail deep inside (an IndexError from
E[ids]). The check that parameters are arrays of the config (`check_params`) needs the config's variant,
so it sits above the variants, in api.py; this module imports only core/tree.py, so the variants
themselves can use it.
"""
import numbers
import os

import numpy as onp


def _plain(v):
    return v.item() if isinstance(v, onp.generic) else v


def check_ids(cfg, ids, name="ids", group=None):
    """Token ids as an integer array, after checking them against the config; else a ValueError.

    Allowed: integers (any NumPy integer dtype, or nested lists of ints) in [0, vocab_size), of shape
    (B, T) with B >= 1 and 1 <= T <= context, or (B, T, group) for byte models, whose models read
    groups of `group` bytes per position (variants/byte_model.py). Floats are refused even when
    whole, since a float id is almost always a mix-up; the message names the offending value and
    where it is, so a negative id never silently indexes the last embedding row.
    """
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be an array of integer token ids, got a {type(ids).__name__}; "
                         f"encode text with the tokenizer first")
    try:
        a = onp.asarray(ids)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a rectangular array of integer token ids ({e})") from None
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer token ids, got an array of dtype {a.dtype}"
                         + (" (convert with .astype(int) if the values are whole numbers)" if a.dtype.kind == "f" else ""))
    want = "(B, T)" if group is None else f"(B, T, {group})"
    if a.ndim != (2 if group is None else 3) or group is not None and a.shape[2] != group:
        raise ValueError(f"{name} must have shape {want} = (batch, time{'' if group is None else ', bytes per group'}), "
                         f"got shape {a.shape}")
    if a.shape[0] < 1 or not 1 <= a.shape[1] <= cfg.context:
        raise ValueError(f"{name} has shape {a.shape}: need B >= 1 and 1 <= T <= context = {cfg.context}")
    V = cfg.vocab_size
    for bad, what in ((a < 0, "negative"), (a >= V, f">= vocab_size {V}")):
        if bad.any():
            at = tuple(int(i) for i in onp.argwhere(bad)[0])
            raise ValueError(f"{name} holds token id {_plain(a[at])} at {at} ({what}); ids must be in [0, {V})")
    return a


def check_index(value, name):
    """An integer (Python or NumPy, not bool) as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_plain(value)!r}")
    return int(value)


# Memory of one training step.

FLOAT = 4   # bytes per float32


def activation_floats(cfg, batch_size, training=True):
    """A lower bound on the float32 numbers one step keeps alive, from the config and batch size.

    Counted per token (B*T of them) and per level l (N = split^l models, whose widths add up to the
    full D, hd and F, so every level costs the same except where N multiplies):
      per layer:  2D (the normed inputs of attention and MLP) + (H + 2K)*hd (q, k, v)
                  + H*hd (the attention output) + 2F (the MLP's gate and up)
                  + N*H*T/2 (the causal half of the attention weights, kept for the backward)
      per level:  2*N*V (the logits and their softmax)
    Training keeps all of it for the backward pass; evaluation (training=False) holds at most one
    layer and one level at a time. Every term is an array the fast path really stores (fast.py, ops.py),
    and intermediates, gradients and temporaries come on top, so the true peak is higher.
    """
    from tinyfractal.core.tree import group_size
    D, H, K, hd, F, V, T = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden,
                            cfg.vocab_size, cfg.context)
    tokens = batch_size * T
    if cfg.tokenizer == "bytes":   # one distribution per slot of each group: g_l logits rows per position
        logits = [2 * cfg.n_models(l) * V * group_size(cfg, l) for l in range(cfg.levels)]
    else:
        logits = [2 * cfg.n_models(l) * V for l in range(cfg.levels)]
    layer = [2 * D + (H + 2 * K) * hd + H * hd + 2 * F + cfg.n_models(l) * H * T // 2 for l in range(cfg.levels)]
    if training:
        return tokens * sum(cfg.layers * layer[l] + logits[l] for l in range(cfg.levels))
    return tokens * max(max(layer), max(logits))


def memory_limit():
    """Bytes this process can ever get: physical memory, or a lower cgroup limit; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:   # 'max' or a huge number means no limit
            limits.append(int(text))
    return min(limits) if limits else None


def parameter_count(cfg):
    """Numbers in the shared arrays of this config, from the shapes init_params builds (model.py)."""
    D, H, K, hd, F, V, L = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size, cfg.layers
    per_layer = 2 * D + D * H * hd + 2 * D * K * hd + H * hd * D + 2 * D * F + 2 * F + F * D + D
    total = V * D + 3 * D + L * per_layer
    total += cfg.levels * D * ((cfg.logit_scale == "learned") + bool(cfg.node_gains))   # the per-node tables
    if cfg.coupling != "none":
        total += cfg.levels * L
    if cfg.tokenizer == "bytes":
        slots = sum(cfg.split ** (cfg.levels - 1 - k) for k in range(cfg.levels - 1))
        total += 2 * slots * D
    return total


def step_bytes(cfg, batch_size, training=True):
    """Lower bound on the bytes of one step: activations (activation_floats) plus, when training, the
    parameters, their gradients and AdamW's two moments (4 copies of the shared arrays)."""
    arrays = 4 * parameter_count(cfg) if training else parameter_count(cfg)
    return FLOAT * (activation_floats(cfg, batch_size, training) + arrays)


def check_memory(cfg, batch_size, training=True, limit=None):
    """Refuse a batch whose step cannot fit in this machine's memory, before anything is allocated.

    The estimate is a lower bound (step_bytes), so a refused batch is certainly too big; a batch that
    passes may still need more than is free at the moment.
    """
    batch_size = check_index(batch_size, "batch_size")
    need = step_bytes(cfg, batch_size, training)
    limit = memory_limit() if limit is None else limit
    if limit is not None and need > limit:
        fits = max(0, int(batch_size * limit / need))
        raise ValueError(f"batch_size={batch_size} needs at least {_gib(need)} for one "
                         f"{'training' if training else 'evaluation'} step of this model (context={cfg.context}, "
                         f"hidden={cfg.hidden}, vocab_size={cfg.vocab_size}, {cfg.levels} levels), but this machine "
                         f"has {_gib(limit)}; use a batch_size below {max(1, fits)}")
    return need


def _gib(n):
    return f"{n / 2 ** 30:.3g} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.3g} MiB"
