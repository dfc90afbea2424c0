"""What the model costs, in matmul FLOPs (2 per multiply-add), counted once for every tool.

bench, infer_bench, grow, the byte and coupling lessons and the variants' `node_flops` all count here.
Attention scores and their product with v are counted over the full T x T square, as the fast path
computes them; `attention_flops(..., causal=True)` counts only the T(T+1)/2 pairs a causal mask keeps.
A training step is counted as 3x its forward (the backward costs about twice the forward).
"""


def projection_flops(cfg, level, T):
    """q, k, v and o of one layer of one model at `level`, for T positions."""
    d, h, H, K = cfg.width(level), cfg.head_width(level), cfg.heads, cfg.kv_heads
    return 2 * T * d * (H + 2 * K) * h + 2 * T * H * h * d


def attention_flops(cfg, level, T, causal=False):
    """q·kᵀ and probs·v of one layer of one model, over T x T pairs (or the causal half)."""
    pairs = T * (T + 1) // 2 if causal else T * T
    return 2 * 2 * cfg.heads * cfg.head_width(level) * pairs


def mlp_flops(cfg, level, T):
    """Gate, up and down of one layer of one model."""
    return 2 * T * cfg.width(level) * 3 * cfg.mlp_width(level)


def output_flops(cfg, level, T, slots=1):
    """The tied output: T positions (times `slots` distributions each, for byte groups) against V rows."""
    return 2 * T * slots * cfg.width(level) * cfg.vocab_size


def model_flops(cfg, level, T, logits=True):
    """Forward FLOPs of one model of `level` reading one sequence of T positions."""
    per_layer = projection_flops(cfg, level, T) + attention_flops(cfg, level, T) + mlp_flops(cfg, level, T)
    return cfg.layers * per_layer + (output_flops(cfg, level, T) if logits else 0)


def coupling_add_flops(cfg, level, T):
    """The adds one receiving model of `level` makes over all layers: scale · x, then + (2 per coordinate)."""
    return cfg.layers * 2 * T * cfg.width(level)


def train_step_flops(cfg, batch, node_flops, levels=None):
    """3x the forward FLOPs of every model of `levels` (default all) for one batch.

    node_flops(level) is one model's forward for one sequence: the variant's own count.
    """
    levels = range(cfg.levels) if levels is None else levels
    return 3 * batch * sum(cfg.n_models(m) * node_flops(m) for m in levels)


def step_flops_by_kind(cfg, batch):
    """FLOPs of one base training step by kind (backward = 2x forward), for the benchmark's table.

    Also 'total (attention causal half)': QK and PV counting only the unmasked pairs.
    """
    T, L = cfg.context, cfg.layers
    out = dict.fromkeys(["projections q k v o", "mlp gate up down", "attention QK PV", "output logits"], 0)
    causal = 0
    for level in range(cfg.levels):
        n = 3 * batch * cfg.n_models(level)
        out["projections q k v o"] += n * L * projection_flops(cfg, level, T)
        out["mlp gate up down"] += n * L * mlp_flops(cfg, level, T)
        out["attention QK PV"] += n * L * attention_flops(cfg, level, T)
        causal += n * L * attention_flops(cfg, level, T, causal=True)
        out["output logits"] += n * output_flops(cfg, level, T)
    total = sum(out.values())
    return {**out, "total": total, "total (attention causal half)": total - out["attention QK PV"] + causal}
