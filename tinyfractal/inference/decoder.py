"""KV-cached decoding for any node of the tree, or for several models of one level at once.

Without a cache, every new token re-runs the whole window: T tokens cost O(T^2) matmul rows. With
a cache, each layer keeps the keys and values it already computed, so a new token costs one row per
matmul plus one attention read of the cache.

  prefill:  run the prompt once and store each layer's K and V         ids (B,T)   -> logits (N,B,T,V)
  extend:   run Tn new tokens against the cache, append their K and V  ids (B,Tn)  -> logits (N,B,Tn,V)

`Models` holds N models of one level (a single node is N = 1), so the same code decodes one model
or every drafter of a level in one batched computation; the cache is (N, B, K, T, h) per layer.

Positions. A cache slot's index is the token's position in the window, and RoPE rotates q and k by
that position, exactly as `model.forward` does for the window `ids[-context:]`. When the window is
full, decoding slides: it recomputes the cache from the last `keep` tokens (default `context`, which
reproduces the full-recompute reference exactly; a smaller `keep` amortises the recompute over
`context - keep` cheap steps, at the price of a shorter memory just after each slide).
"""
import numpy as onp

from tinyfractal.core.model import output_gain, rmsnorm, rope_tables
from tinyfractal.core.tree import level_view, map_roles, view


def unit(x, eps):
    """rmsnorm without its gain: x / sqrt(mean(x^2) + eps) over the last axis, in plain NumPy.

    The gains (1 + g) are folded into the rows of the weight matrix that reads the result:
    (x * gain) @ W = x @ (gain[:, None] * W), so decoding never multiplies by them.
    """
    ms = onp.add.reduce(x * x, axis=-1, keepdims=True)
    return x / onp.sqrt(ms * onp.float32(1.0 / x.shape[-1]) + eps)


HALF, GELU_A, GELU_B = onp.float32(0.5), onp.float32(0.7978845608028654), onp.float32(0.7978845608028654 * 0.044715)


def gelu(x):
    """tanh approximation of GELU (as model.gelu): x/2 (1 + tanh(a x + b x^3)), in plain NumPy."""
    half = x * HALF
    return half + half * onp.tanh(x * (GELU_A + GELU_B * x * x))


def rope_matrices(T, h, theta):
    """RoPE at position t as one matrix: x @ R[t] rotates each pair (m, m + h/2) by t * theta^(-2m/h). (T,h,h)."""
    cos, sin = rope_tables(T, h, theta)
    half = h // 2
    R = onp.zeros((T, h, h), onp.float32)
    m = onp.arange(half)
    R[:, m, m], R[:, m + half, m + half] = cos, cos
    R[:, m + half, m], R[:, m, m + half] = -sin, sin
    return R


def check_base(cfg):
    """The cache runs the base FractalFormer; coupled and byte models decode in their own modules."""
    if getattr(cfg, "coupling", "none") != "none":
        raise ValueError(f"coupling={cfg.coupling!r}: a coupled node needs its relatives' states, so it decodes "
                         f"with coupling.generate; the cache here runs base models (coupling='none')")
    if getattr(cfg, "tokenizer", "bpe") != "bpe":
        raise ValueError(f"tokenizer={cfg.tokenizer!r}: byte models decode with concepts.generate; "
                         f"the cache here runs token models (tokenizer='bpe')")


class Models:
    """N models of one level, as contiguous float32 arrays ready for batched matmuls.

    `tree.level_view` gives strided views; BLAS would copy a strided operand on every call, so the
    weights are copied once here. q, k and v share one matmul, and so do the gate and up halves of
    the MLP. `flops` counts every matmul's 2*M*K*N as it runs: a deterministic cost measure.
    `calls` counts forward passes, and `latency_flops` adds, per pass, the FLOPs of ONE of its token
    rows: the cost model of hardware that reads every weight once per pass, however many rows it
    carries (memory-bound decoding), under which a batched check of k drafts costs one step.
    """

    def __init__(self, params, cfg, level, indices):
        check_base(cfg)
        cfg.check_level(level)
        indices = [int(j) for j in indices]
        for j in indices:
            cfg.check_node(level, j)
        if not indices:
            raise ValueError("a model set needs at least one model index")
        self.cfg, self.sub, self.level, self.indices = cfg, cfg.sub(level), level, indices
        self.eps = onp.float32(cfg.eps)
        sub = self.sub
        if len(indices) == 1:                         # one node: its plain views, with a leading axis of 1
            P, pick = map_roles(lambda a, roles: a[None], view(params, cfg, level, indices[0])), onp.zeros(1, int)
        else:
            P, pick = level_view(params, cfg, level), onp.asarray(indices)

        def take(a):
            return onp.ascontiguousarray(onp.asarray(a)[pick], dtype=onp.float32)

        def fold(g, W):
            """(1 + g) of a norm, multiplied into the rows of the matrix that reads it: (N,A,C)."""
            return onp.ascontiguousarray((1 + take(g))[:, :, None] * W, dtype=onp.float32)

        N, d, H, K, h = len(indices), sub.hidden, sub.heads, sub.kv_heads, sub.head_dim
        self.N, self.d, self.H, self.K, self.h = N, d, H, K, h
        E = take(P["E"])                                                          # (N,V,d)
        self.embed_table = rmsnorm(E, take(P["emb_norm"])[:, None, :], sub.eps)   # (N,V,d): rows already normed
        out_emb = rmsnorm(E, take(P["out_norm"])[:, None, :], sub.eps)            # (N,V,d), tied output
        self.out_T = fold(P["final_norm"], onp.transpose(out_emb, (0, 2, 1)))    # (N,d,V)
        gain = output_gain(P, sub)                # the node's own output factor (model.output_gain), folded too
        if not isinstance(gain, float) or gain != 1.0:
            gain = onp.float32(gain) if isinstance(gain, float) else take(gain)[:, :, None]   # (N,d|1,1)
            self.out_T = onp.ascontiguousarray(self.out_T * gain, dtype=onp.float32)
        self.layers = []
        for p in P["layers"]:
            # q carries the 1/sqrt(h) of the attention scores (RoPE is linear, so it may come first)
            Wq = take(p["Wq"]).reshape(N, d, H * h) / onp.float32(onp.sqrt(h))
            Wqkv = onp.concatenate([Wq, take(p["Wk"]).reshape(N, d, K * h), take(p["Wv"]).reshape(N, d, K * h)],
                                   axis=2)                                        # (N,d,(H+2K)h)
            self.layers.append({
                "Wqkv": fold(p["attn_norm"], Wqkv),
                "Wo": take(p["Wo"]).reshape(N, H * h, d),
                "Wgu": fold(p["mlp_norm"], onp.concatenate([take(p["Wgate"]), take(p["Wup"])], axis=2)),
                "bgu": onp.concatenate([take(p["bgate"]), take(p["bup"])], axis=1)[:, None, :],
                "Wdown": take(p["Wdown"]), "bdown": take(p["bdown"])[:, None, :],
            })
        self.rope = rope_matrices(sub.context, h, sub.rope_theta)                # (context,h,h)
        self.flops, self.calls, self.latency_flops = 0, 0, 0.0
        self._bias = {}

    def matmul(self, a, b):
        """np.matmul that adds its multiply-adds (x2) to `flops`."""
        out = onp.matmul(a, b)
        self.flops += 2 * out.size * a.shape[-1]
        return out

    def linear(self, x, W):
        """(N,M,A) @ (N,A,C) -> (N,M,C): the M token rows of each model through its weight."""
        if 1 < x.shape[1] <= 3:  # measured: BLAS sgemm on 2-3 rows is slower than 2-3 vector products
            return self.matmul(x[:, :, None, :], W[:, None])[:, :, 0]
        return self.matmul(x, W)

    def new_cache(self, batch=1):
        return Cache(self, batch)

    def causal_bias(self, Tn):
        """(G*Tn, Tn): 0 where new query t (row g*Tn + t) may see new key u <= t, else -1e30. Kept per Tn."""
        if Tn not in self._bias:
            G = self.H // self.K
            hidden = onp.arange(Tn)[None, :] > onp.arange(Tn)[:, None]
            self._bias[Tn] = onp.tile(onp.where(hidden, onp.float32(-1e30), onp.float32(0)), (G, 1))
        return self._bias[Tn]


class Cache:
    """Keys and values of every layer, (N,B,K,context,h) each; slots [0, length) are filled."""

    def __init__(self, models, batch=1):
        shape = (models.N, batch, models.K, models.sub.context, models.h)
        self.k = [onp.zeros(shape, onp.float32) for _ in models.layers]
        self.v = [onp.zeros(shape, onp.float32) for _ in models.layers]
        self.length = 0

    @property
    def batch(self):
        return self.k[0].shape[1]

    def expand(self, rows):
        """A copy whose single batch row is repeated `rows` times: one branch per draft to verify."""
        if self.batch != 1:
            raise ValueError(f"only a cache with batch 1 can be expanded, this one has batch {self.batch}")
        out = object.__new__(Cache)
        L = self.length
        out.k, out.v = [], []
        for k, v in zip(self.k, self.v):
            ek, ev = onp.empty(k.shape[:1] + (rows,) + k.shape[2:], onp.float32), onp.empty(
                v.shape[:1] + (rows,) + v.shape[2:], onp.float32)
            ek[:, :, :, :L], ev[:, :, :, :L] = k[:, :, :, :L], v[:, :, :, :L]
            out.k.append(ek)
            out.v.append(ev)
        out.length = L
        return out

    def adopt(self, branch, row, length):
        """Keep one branch of an expanded copy: its slots [self.length, length) from batch row `row`."""
        L = self.length
        if not L <= length <= branch.length:
            raise ValueError(f"can adopt up to the branch's length {branch.length}, from {L}; asked {length}")
        for k, v, bk, bv in zip(self.k, self.v, branch.k, branch.v):
            k[:, 0, :, L:length] = bk[:, row, :, L:length]
            v[:, 0, :, L:length] = bv[:, row, :, L:length]
        self.length = length

    def rollback(self, length):
        """Forget every slot from `length` on (the next extend overwrites them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a cache of length {self.length} back to {length}")
        self.length = length


def embed(m, ids):
    """Normed token rows of every model: ids (B,T) shared by all models, or (N,B,T) one per model -> (N,B,T,d)."""
    if ids.ndim == 2:
        return m.embed_table[:, ids]
    return m.embed_table[onp.arange(m.N)[:, None, None], ids]


def attend(m, q, cache, layer, L, Tn):
    """Queries of Tn new tokens against cache slots [0, L + Tn). q (N,B,Tn,H,h) -> rows (N,B*Tn,H*h).

    Multi-query attention without repeating k: the G = H/K query heads that share a kv head are
    stacked along the query axis, so one matmul per kv head serves them all.
    """
    N, B, _, H, h = q.shape
    K, G = m.K, m.H // m.K
    if Tn == 1:                                  # one token: grouping heads is a plain reshape
        q = q.reshape(N, B, K, G, h)
    else:
        q = q.reshape(N, B, Tn, K, G, h).transpose(0, 1, 3, 4, 2, 5).reshape(N, B, K, G * Tn, h)
    k = cache.k[layer][:, :, :, :L + Tn]                                        # (N,B,K,L+Tn,h)
    v = cache.v[layer][:, :, :, :L + Tn]
    scores = m.matmul(q, k.transpose(0, 1, 2, 4, 3))                            # (N,B,K,G*Tn,L+Tn), q pre-scaled
    if Tn > 1:                                   # the cached slots are all visible; the new ones causally
        scores[..., L:] += m.causal_bias(Tn)
    scores = onp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = scores / scores.sum(axis=-1, keepdims=True)
    out = m.matmul(weights, v)                                                   # (N,B,K,G*Tn,h)
    if Tn == 1:
        return out.reshape(N, B, H * h)
    return out.reshape(N, B, K, G, Tn, h).transpose(0, 1, 4, 2, 3, 5).reshape(N, B * Tn, H * h)


def extend(m, cache, ids):
    """Run new tokens after the cached ones and append their K and V. ids (B,Tn) or (N,B,Tn) -> (N,B,Tn,V).

    The new tokens take window positions [length, length + Tn); they must fit in the context.
    """
    ids = onp.asarray(ids)
    Tn, L = ids.shape[-1], cache.length
    if L + Tn > m.sub.context:
        raise ValueError(f"{Tn} new tokens after {L} cached ones exceed the context of {m.sub.context}; "
                         f"slide the window first")
    sub, N, H, K, h = m.sub, m.N, m.H, m.K, m.h
    flops_before = m.flops
    x = embed(m, ids)                                                           # (N,B,Tn,d)
    B = x.shape[1]
    if B != cache.batch:
        raise ValueError(f"the cache holds {cache.batch} rows but {B} were given")
    x = x.reshape(N, B * Tn, x.shape[-1])                                       # token rows (N,M,d)
    R = m.rope[L:L + Tn]                                                        # (Tn,h,h)
    for i, p in enumerate(m.layers):
        qkv = m.linear(unit(x, m.eps), p["Wqkv"]).reshape(N, B, Tn, H + 2 * K, h)
        qk = onp.matmul(qkv[:, :, :, :H + K], R)                                  # RoPE at positions L..L+Tn-1
        cache.k[i][:, :, :, L:L + Tn] = qk[:, :, :, H:].transpose(0, 1, 3, 2, 4)
        cache.v[i][:, :, :, L:L + Tn] = qkv[:, :, :, H + K:].transpose(0, 1, 3, 2, 4)
        x = x + m.linear(attend(m, qk[:, :, :, :H], cache, i, L, Tn), p["Wo"])
        gu = m.linear(unit(x, m.eps), p["Wgu"]) + p["bgu"]
        f = gu.shape[-1] // 2
        x = x + m.linear(gelu(gu[..., :f]) * gu[..., f:], p["Wdown"]) + p["bdown"]
    cache.length = L + Tn
    logits = m.linear(unit(x, m.eps), m.out_T)
    m.calls += 1
    m.latency_flops += (m.flops - flops_before) / (B * Tn)
    return logits.reshape(N, B, Tn, logits.shape[-1])


def prefill(m, ids, cache=None):
    """A fresh cache filled with a prompt window. ids (B,T) -> (logits (N,B,T,V), cache)."""
    ids = onp.asarray(ids)
    cache = cache or m.new_cache(ids.shape[-2])
    cache.rollback(0)
    return extend(m, cache, ids), cache


def check_keep(keep, context):
    """The number of tokens a full window slides back to: an integer in [1, context] (None = context)."""
    if keep is None:
        return context
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= context:
        raise ValueError(f"keep must be an integer in [1, context={context}], got {keep!r}")
    return keep


def decode(m, ids, max_new_tokens, choose, keep=None, on_logits=None):
    """Append max_new_tokens tokens to the list `ids` with a cache; returns the new tokens.

    `choose(logits (V,))` picks each token. `on_logits(window_start, logits (V,))` sees every
    next-token distribution, for tests. The first window is ids[-context:]; a full window slides.
    """
    if m.N != 1:
        raise ValueError(f"decode runs one model; this set has {m.N}")
    if not ids:
        raise ValueError("decoding needs at least one prompt token")
    context = m.sub.context
    keep = check_keep(keep, context)
    start = max(0, len(ids) - context)
    logits, cache = prefill(m, onp.asarray(ids[start:])[None])
    new = []
    for n in range(max_new_tokens):
        last = logits[0, 0, -1]
        if on_logits:
            on_logits(start, last)
        token = choose(last)
        ids.append(token)
        new.append(token)
        if n + 1 == max_new_tokens:
            break
        if cache.length == context:
            start = len(ids) - keep
            logits, cache = prefill(m, onp.asarray(ids[start:])[None], cache)
        else:
            logits = extend(m, cache, [[token]])
    return new


def node_models(params, cfg, level, index):
    """A one-model set for node (level, index)."""
    cfg.check_node(level, index)
    return Models(params, cfg, level, [index])


def greedy_ids(params, cfg, ids, max_new_tokens, level=0, index=0, keep=None):
    """Greedy continuation of a list of token ids by node (level, index), with the cache."""
    ids = list(ids)
    return decode(node_models(params, cfg, level, index), ids, max_new_tokens,
                  lambda logits: int(onp.argmax(logits)), keep)
