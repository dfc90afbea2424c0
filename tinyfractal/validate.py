"""Input checks for the public API: token ids, parameter shapes, and the memory a step needs.

Each check is one call at the top of an entry point (the variants' id checks, `view`, training and
evaluation). It raises a ValueError naming what was
wrong and what is allowed, so nothing reaches NumPy that would wrap around (a negative id indexes the
last embedding row), fail deep inside (an IndexError from E[ids]), or quietly compute another model
(arrays of another config cut into wrong blocks by `view`).
"""
import functools
import math
import numbers
import os

import numpy as onp
from autograd.tracer import getval


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


@functools.lru_cache(maxsize=64)
def expected_shapes(cfg):
    """{flat name: shape} of every array a full parameter set of this config holds (core.model.param_shapes)."""
    from tinyfractal.core.model import param_shapes
    from tinyfractal.core.tree import flatten
    return {k: tuple(v) for k, v in flatten(param_shapes(cfg)).items()}


def check_params(params, cfg, allow_extra=False):
    """Raise ValueError unless params is a full parameter set of this config (names and shapes).

    `view` cuts blocks by the config's sizes, so the arrays of another config would give a wrong model
    without any error (a view of a wider model's arrays has exactly the shapes of a narrower one's
    node); this is checked first. With `allow_extra`, arrays this config does not use (such as a
    coupled model's coupling_scale, read by a base config) may come along unchecked, since the model
    of this config never reads them; more layers, or unknown arrays inside a layer, never may.
    """
    params = getval(params)   # under autograd the dict is boxed; only shapes are read, so no op is recorded
    if not isinstance(params, dict) or not isinstance(getval(params.get("layers")), (list, tuple)):
        raise ValueError(f"params must be a dict of arrays with a 'layers' list (from init_params or load), "
                         f"got {type(params).__name__}")
    n_layers = len(getval(params["layers"]))
    if n_layers != cfg.layers:
        raise ValueError(f"params have {n_layers} layers but the config has layers={cfg.layers}; are these the "
                         f"params of another config?")
    want = expected_shapes(cfg)
    have = {k: v for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(getval(params["layers"])):
        layer = getval(layer)
        if not isinstance(layer, dict):
            raise ValueError(f"params['layers'][{i}] must be a dict of arrays, got {type(layer).__name__}")
        have.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if allow_extra:
        extra = [k for k in extra if k.startswith("layers.")]   # more layers, or unknown ones, are another model
    if missing or extra:
        raise ValueError(f"params do not match the config (layers={cfg.layers}, coupling={cfg.coupling!r}, "
                         f"tokenizer={cfg.tokenizer!r}): missing {missing[:6]}, unexpected {extra[:6]}")
    for k, shape in want.items():
        got = tuple(getattr(have[k], "shape", ()))
        if got != shape:
            raise ValueError(f"params do not match the config: {k} has shape {got}, the config (hidden="
                             f"{cfg.hidden}, heads={cfg.heads}, head_dim={cfg.head_dim}, vocab_size="
                             f"{cfg.vocab_size}, ...) needs {shape}; are these the params of another config?")


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


def step_bytes(cfg, batch_size, training=True):
    """Lower bound on the bytes of one step: activations (activation_floats) plus, when training, the
    parameters, their gradients and AdamW's two moments (4 copies of the shared arrays)."""
    from .config import parameter_count
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
