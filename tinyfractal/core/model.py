"""The transformer, written plainly for one model: the readable reference path.

`forward(params, cfg, ids)` runs the whole model, and, given `view(params, cfg, level, j)` and
`cfg.sub(level)`, any sub-model: the same code at every scale. Training uses the level-batched
fast path in `fast.py`; a test proves the two agree.
"""
import math

import numpy as onp
import autograd.numpy as np

from tinyfractal.core.tree import map_roles, nodes, slot_offset, view


UNIFORM_INIT = ("Wq", "Wk", "Wv", "Wo", "Wgate", "bgate", "Wup", "bup", "Wdown", "bdown")


def init_params(cfg, seed=0):
    """Fresh float32 parameters, as the original: weights and biases uniform in +-1/sqrt(fan_in),
    E standard normal, norm gains zero (so each norm starts as the identity gain 1 + 0).

    fan_in is the root's (D, H*hd or F), so a level-l node's own block starts s^(l/2) times smaller
    than a standalone model of its shape would. With cfg.nested_init every entry starts as its
    deepest owner would alone: each level's blocks are scaled by sqrt(s) once more than their parent's,
    so a node's block is uniform in +-1/sqrt(its own fan_in), the same law as its standalone twin.
    """
    rng = onp.random.default_rng(seed)
    D, H, K, hd, F, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size

    def uniform(shape, fan_in):
        bound = 1.0 / onp.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(onp.float32)

    def zeros(n):
        return onp.zeros(n, dtype=onp.float32)

    params = {"E": rng.standard_normal((V, D)).astype(onp.float32),
              "emb_norm": zeros(D), "final_norm": zeros(D), "out_norm": zeros(D), "layers": []}
    for _ in range(cfg.layers):
        params["layers"].append({
            "attn_norm": zeros(D),
            "Wq": uniform((D, H, hd), D), "Wk": uniform((D, K, hd), D), "Wv": uniform((D, K, hd), D),
            "Wo": uniform((H, hd, D), H * hd),
            "mlp_norm": zeros(D),
            "Wgate": uniform((D, F), D), "bgate": uniform((F,), D),
            "Wup": uniform((D, F), D), "bup": uniform((F,), D),
            "Wdown": uniform((F, D), F), "bdown": uniform((D,), F),
        })
    if cfg.nested_init:
        for level in range(1, cfg.levels):
            for j in range(cfg.n_models(level)):
                for layer in view(params, cfg, level, j)["layers"]:     # views: scales the shared arrays
                    for name in UNIFORM_INIT:
                        layer[name] *= onp.float32(math.sqrt(cfg.split))
    if cfg.coupling != "none":   # one learnable scale per (receiving level, layer); see coupling.py
        params["coupling_scale"] = onp.full((cfg.levels, cfg.layers), cfg.coupling_scale_init, dtype=onp.float32)
    if cfg.logit_scale == "learned":   # one row per level; node (l, j) reads row l, columns R (output_gain)
        params["logit_gain"] = zeros((cfg.levels, D))
    if cfg.node_gains:
        params["node_gain"] = zeros((cfg.levels, D))
    if cfg.tokenizer == "bytes":   # a gain per byte slot on input and output, for every level above the leaves
        slots = slot_offset(cfg, cfg.levels - 1)
        params["P"], params["Q"] = zeros((slots, D)), zeros((slots, D))
    return params


def param_shapes(cfg):
    """The shape every array must have for this config (used to check checkpoints).

    Derived from `init_params`, so a variant that adds arrays there is checked too.
    """
    return map_roles(lambda a, roles: tuple(a.shape), init_params(cfg, 0))


def count_params(params):
    """Number of scalars in a params dict (views count their own entries)."""
    total = [0]
    map_roles(lambda a, roles: total.__setitem__(0, total[0] + int(onp.size(a))), params)
    return total[0]


def dense(W, shape=None):
    """W (optionally reshaped) as a fresh contiguous array.

    A sub-model's weights are strided views, and BLAS may sum a strided operand in another order than a
    contiguous copy, changing the last bit. Adding 0.0 copies exactly, so a node run through its views
    gives bit for bit the logits of a standalone model built from copies.
    """
    return (W if shape is None else np.reshape(W, shape)) + 0.0


def rmsnorm(x, g, eps):
    """rmsnorm: x / sqrt(mean(x^2) + eps) * (1 + g), over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + g)


def rope_tables(T, h, theta, start=0):
    """cos and sin of angle pos * theta^(-2m/h), for pos in [start, start+T) and m < h/2: (T, h/2) each."""
    m = onp.arange(h // 2, dtype=onp.float64)
    pos = onp.arange(start, start + T, dtype=onp.float64)
    angles = pos[:, None] * theta ** (-2.0 * m / h)[None, :]
    return onp.cos(angles).astype(onp.float32), onp.sin(angles).astype(onp.float32)


def rope(x, cos, sin):
    """Rotate pairs (m, m + h/2) of the last axis by their angle. (.., T, H, h) -> same."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def gelu(x):
    """tanh approximation of GELU."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def softmax(x):
    """softmax over the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def dropout(x, rate, rng):
    """Inverted dropout; identity when no rng is given (evaluation) or rate is 0."""
    if rng is None or rate == 0:
        return x
    keep = (rng.random(x.shape) >= rate).astype(onp.float32) / onp.float32(1.0 - rate)
    return x * keep


def attention(x, p, cfg, start=0, trace=None):
    """Causal multi-query attention with RoPE. (B,T,D) -> (B,T,D).

    `trace`, if given, is called as trace(op, weights, input, output) after each step (see trace.py).
    """
    B, T, D = x.shape
    H, K, h = p["Wq"].shape[1], p["Wk"].shape[1], p["Wq"].shape[2]
    q = np.reshape(np.dot(np.reshape(x, (B * T, D)), dense(p["Wq"], (D, H * h))), (B, T, H, h))
    k = np.reshape(np.dot(np.reshape(x, (B * T, D)), dense(p["Wk"], (D, K * h))), (B, T, K, h))
    v = np.reshape(np.dot(np.reshape(x, (B * T, D)), dense(p["Wv"], (D, K * h))), (B, T, K, h))
    if trace is not None:
        trace("q, k, v = x Wq, x Wk, x Wv", {n: p[n] for n in ("Wq", "Wk", "Wv")}, x, (q, k, v))
    cos, sin = rope_tables(T, h, cfg.rope_theta, start)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)          # (B,T,H,h)
    if trace is not None:
        trace(f"rope on q, k; repeat k, v to {H} heads", {}, None, (q, k, v))
    q, k, v = (np.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))               # (B,H,T,h)
    scores = np.matmul(q, np.transpose(k, (0, 1, 3, 2))) / float(onp.sqrt(h))  # (B,H,T,T); float keeps x's dtype
    causal = onp.tril(onp.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, onp.float32(-1e30))
    probs = softmax(scores)                                                    # (B,H,T,T)
    out = np.matmul(probs, v)                                                  # (B,H,T,h)
    out = np.reshape(np.transpose(out, (0, 2, 1, 3)), (B * T, H * h))
    y = np.reshape(np.dot(out, dense(p["Wo"], (H * h, D))), (B, T, D))
    if trace is not None:
        trace("softmax(q k^T / sqrt(h), causal)", {}, (q, k), probs)
        trace("attn out = (probs v) Wo", {"Wo": p["Wo"]}, out, y)
    return y


def mlp(x, p, trace=None):
    """GeGLU MLP: (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown. (B,T,D) -> (B,T,D)."""
    B, T, D = x.shape
    x2 = np.reshape(x, (B * T, D))
    hidden = gelu(np.dot(x2, dense(p["Wgate"])) + p["bgate"]) * (np.dot(x2, dense(p["Wup"])) + p["bup"])
    y = np.reshape(np.dot(hidden, dense(p["Wdown"])) + p["bdown"], (B, T, D))
    if trace is not None:
        trace("hidden = gelu(x Wgate + bgate) * (x Wup + bup)",
              {n: p[n] for n in ("Wgate", "bgate", "Wup", "bup")}, x, hidden)
        trace("mlp out = hidden Wdown + bdown", {n: p[n] for n in ("Wdown", "bdown")}, hidden, y)
    return y


def forward(params, cfg, ids, rng=None, trace=None):
    """Logits of one model. ids (B,T) ints -> (B,T,V) float32.

    `rng` (a numpy Generator) turns dropout on, for training; without it the pass is deterministic.
    `trace`, if given, is called as trace(op, weights, input, output) after each op: `weights` maps
    names to the arrays the op read (views of the shared arrays). trace.py prints it.
    """
    ids = onp.asarray(ids)
    x = rmsnorm(params["E"][ids], params["emb_norm"], cfg.eps)                 # (B,T,D)
    if trace is not None:
        trace("x = rmsnorm(E[ids], emb_norm)", {n: params[n] for n in ("E", "emb_norm")}, ids, x)
    for p in params["layers"]:
        h = rmsnorm(x, p["attn_norm"], cfg.eps)
        if trace is not None:
            trace("rmsnorm(x, attn_norm)", {"attn_norm": p["attn_norm"]}, x, h)
        x = x + dropout(attention(h, p, cfg, trace=trace), cfg.dropout, rng)
        h = rmsnorm(x, p["mlp_norm"], cfg.eps)
        if trace is not None:
            trace("rmsnorm(x, mlp_norm)", {"mlp_norm": p["mlp_norm"]}, x, h)
        x = x + dropout(mlp(h, p, trace=trace), cfg.dropout, rng)
    out_emb = rmsnorm(params["E"], params["out_norm"], cfg.eps)               # (V,D), tied output
    B, T, D = x.shape
    x = scale_output(rmsnorm(x, params["final_norm"], cfg.eps), params, cfg)
    logits = np.reshape(np.dot(np.reshape(x, (B * T, D)), np.transpose(out_emb)), (B, T, -1))
    if trace is not None:
        trace("tied output: rmsnorm(E, out_norm)", {n: params[n] for n in ("E", "out_norm")}, params["E"], out_emb)
        gains = {n: params[n] for n in ("final_norm", "logit_gain", "node_gain") if n in params}
        op = "logits = rmsnorm(x, final_norm) out_emb^T" if len(gains) == 1 and cfg.logit_scale == "none" else \
            "logits = (rmsnorm(x, final_norm) * output_gain) out_emb^T"
        trace(op, gains, x, logits)
    return logits


def output_gain(params, cfg):
    """The node's own factor on its normalised final state, just before the tied output matmul:

        logits = (rmsnorm(x, final_norm) * output_gain) . rmsnorm_rows(E, out_norm)^T

    1.0 (nothing) unless an option is on. `cfg` is the node's own config (width d = cfg.hidden):
      logit_scale="sqrt"     1/sqrt(d). Both factors of the dot product have RMS 1, so a logit is a sum of
                             d terms: about sqrt(d) for unrelated vectors, up to d for aligned ones (the
                             final state still holds its input token's embedding). A fresh node's first
                             loss is then about d nats, not ln V; over sqrt(d) every logit is at most
                             sqrt(d), so the first loss is at most ln V + 2 sqrt(d).
      logit_scale="learned"  (1 + mean of the node's row of logit_gain) / sqrt(d): a temperature per node.
      node_gains=True        times (1 + the node's row of node_gain): an output gain per coordinate that is
                             the node's own, where final_norm's slice is shared with every ancestor.
    Per-node rows: a node's params (a view) hold rows [l:] of the (levels, D) tables, its own row first.
    Returns a Python float, or an array of shape (..., d) or (..., 1) whose leading axes are the model
    axes of `params` (none for one node, (N,) for a stacked level); `scale_output` broadcasts it.
    """
    gain = 1.0
    if cfg.logit_scale != "none":
        gain = 1.0 / math.sqrt(cfg.hidden)
        if cfg.logit_scale == "learned":
            row = params["logit_gain"][..., 0, :]                                # (..., d)
            gain = (1.0 + np.sum(row, axis=-1, keepdims=True) * (1.0 / cfg.hidden)) * gain
    if cfg.node_gains:
        gain = (1.0 + params["node_gain"][..., 0, :]) * gain
    return gain


def scale_output(h, params, cfg):
    """h * output_gain(params, cfg), the gain's model axes lined up with h's leading axes. (..., d) -> same."""
    gain = output_gain(params, cfg)
    if isinstance(gain, float):
        return h if gain == 1.0 else h * gain
    lead = gain.shape[:-1]
    return h * np.reshape(gain, lead + (1,) * (h.ndim - len(lead) - 1) + gain.shape[-1:])


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in nats. logits (..., V), targets (...) ints."""
    V = logits.shape[-1]
    flat = np.reshape(logits, (-1, V))
    m = np.max(flat, axis=1, keepdims=True)
    logz = np.log(np.sum(np.exp(flat - m), axis=1)) + m[:, 0]
    picked = flat[onp.arange(flat.shape[0]), onp.asarray(targets).reshape(-1)]
    return np.mean(logz - picked)


def level_weight_table(cfg, level_weights=None):
    """Weight of each node's loss so that the tree loss is a weighted mean over nodes."""
    w = [1.0] * cfg.levels if level_weights is None else [float(v) for v in level_weights]
    if len(w) != cfg.levels or any(v < 0 for v in w) or sum(w) == 0:
        raise ValueError(f"level_weights must be {cfg.levels} non-negative numbers, not all zero; got {level_weights!r}")
    total = sum(w[level] * cfg.n_models(level) for level in range(cfg.levels))
    return [v / total for v in w]


def tree_loss_reference(params, cfg, ids, targets, level_weights=None):
    """The tree loss node by node: mean over every model (l, j) of its cross-entropy. Readable, slow."""
    weights = level_weight_table(cfg, level_weights)
    loss = 0.0
    for level, j in nodes(cfg):
        logits = forward(view(params, cfg, level, j), cfg.sub(level), ids)
        loss = loss + weights[level] * cross_entropy(logits, targets)
    return loss
