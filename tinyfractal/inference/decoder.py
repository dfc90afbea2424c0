"""The one KV-cached decoder, for every variant: a node, or several models of one level at once.

Without a cache, every new token re-runs the whole window: T tokens cost O(T²) matmul rows. With a
cache, each layer keeps the keys and values it already computed, so a new token costs one row per
matmul plus one attention read of the cache.

  prefill:   run a window of tokens once and store each layer's K and V     -> logits of every position
  extend:    run Tn new tokens against the cache, append their K and V     -> logits of the new positions
  rollback:  forget the cache from a position on (speculative decoding refuses a draft)
  expand / adopt:  branch a one-row cache into R rows, then keep one of them (verify R drafts at once)

A `Decoder` decodes models `indices` of one level. What a node needs besides its own weights is the
variant's business: `variant.members` names every node that must run with it (a coupled node needs its
subtree or its ancestors), and the variant's hooks embed the input, couple the levels after each layer
and read the output (a byte model reads groups of bytes and writes a distribution per slot). The math is
`core/formulas.py`, in plain NumPy.

Two rewrites make decoding cheap without changing the math: the gains (1 + g) of a norm are folded into
the rows of the matrix that reads it, (x·(1+g))·W = x·((1+g)[:, None]·W), and q, k and v (and the gate
and up halves of the MLP) share one matmul. `flops` counts every matmul's 2·M·K·N as it runs;
`latency_flops` adds, per pass, the FLOPs of ONE of its token rows: the cost model of hardware that
reads every weight once per pass however many rows it carries (memory-bound decoding).

Positions. A cache slot's index is the token's position in the window, and RoPE rotates q and k by
that position, as `forward` does for the window `ids[-context:]`. When the window is full, decoding
slides: it recomputes the cache from the last `keep` tokens (default `context`, which reproduces the
full-recompute reference exactly).
"""
import numpy as onp

from tinyfractal.core import formulas
from tinyfractal.core.model import output_gain
from tinyfractal.core.tree import level_view, map_roles, view
from tinyfractal.variants import variant_of


def unit(x, eps):
    """rmsnorm without its gain (folded into the next matrix): formulas.rmsnorm with g = 0."""
    return formulas.rmsnorm(x, 0.0, eps, onp)


class LevelWeights:
    """N models of one level as contiguous float32 stacks, ready for batched matmuls.

    `level_view` gives strided views, which BLAS would copy on every call, so they are copied once here.
    """

    def __init__(self, params, cfg, level, indices):
        sub = cfg.sub(level)
        if len(indices) == 1:                        # one node: its plain views, with a leading axis of 1
            stacked, pick = map_roles(lambda a, roles: a[None], view(params, cfg, level, indices[0])), [0]
        else:
            stacked, pick = level_view(params, cfg, level), list(indices)
        pick = onp.asarray(pick)

        def take(a):
            return onp.ascontiguousarray(onp.asarray(a)[pick], dtype=onp.float32)

        def fold(g, W):
            """(1 + g) of a norm multiplied into the rows of the matrix that reads its output: (N,A,C)."""
            return onp.ascontiguousarray((1 + take(g))[:, :, None] * W, dtype=onp.float32)

        N, d, H, K, h = len(indices), sub.hidden, sub.heads, sub.kv_heads, sub.head_dim
        self.level, self.indices, self.N, self.d, self.H, self.K, self.h = level, list(indices), N, d, H, K, h
        self.stacked = {k: take(v) for k, v in stacked.items() if k != "layers"}   # E, norms, variant arrays
        gain = lambda name: self.stacked[name][:, None, :]                      # (N,1,d)
        self.embed_rows = formulas.rmsnorm(self.stacked["E"], gain("emb_norm"), sub.eps, onp)    # (N,V,d)
        self.out_table = formulas.rmsnorm(self.stacked["E"], gain("out_norm"), sub.eps, onp)     # (N,V,d), tied
        self.out_T = fold(stacked["final_norm"], onp.transpose(self.out_table, (0, 2, 1)))        # (N,d,V)
        out_gain = output_gain(stacked, sub)      # the node's own output factor (model.output_gain), folded too
        self.out_gain = onp.full((N, 1, 1), out_gain, dtype=onp.float32) if isinstance(out_gain, float) \
            else take(out_gain)[:, None, :]                                                     # (N,1,d|1)
        if not isinstance(out_gain, float) or out_gain != 1.0:
            self.out_T = onp.ascontiguousarray(self.out_T * onp.transpose(self.out_gain, (0, 2, 1)), dtype=onp.float32)
        self.layers = []
        for p in stacked["layers"]:
            Wqkv = onp.concatenate([take(p[n]).reshape(N, d, -1) for n in ("Wq", "Wk", "Wv")], axis=2)
            self.layers.append({
                "Wqkv": fold(p["attn_norm"], Wqkv),                               # (N,d,(H+2K)h)
                "Wo": take(p["Wo"]).reshape(N, H * h, d),
                "Wgu": fold(p["mlp_norm"], onp.concatenate([take(p["Wgate"]), take(p["Wup"])], axis=2)),
                "bgu": onp.concatenate([take(p["bgate"]), take(p["bup"])], axis=1)[:, None, :],
                "Wdown": take(p["Wdown"]), "bdown": take(p["bdown"])[:, None, :],
            })


class Decoder:
    """KV-cached decoding of models `indices` of `level`, with every node they need (variant.members)."""

    def __init__(self, params, cfg, level, indices):
        cfg.check_level(level)
        indices = [int(j) for j in indices]
        if not indices:
            raise ValueError("a decoder needs at least one model index")
        for j in indices:
            cfg.check_node(level, j)
        if len(set(indices)) != len(indices):
            raise ValueError(f"model indices must be distinct, got {indices}")
        self.variant = variant_of(cfg)
        self.cfg, self.level, self.indices, self.N = cfg, level, indices, len(indices)
        self.members = self.variant.members(cfg, level, indices)       # {level m: [indices]}, ascending m
        self.weights = {m: LevelWeights(params, cfg, m, idx) for m, idx in self.members.items()}
        self.extra = self.variant.decoder_state(params, cfg, self)     # e.g. the coupling scale
        self.eps = onp.float32(cfg.eps)
        self.flops, self.calls, self.latency_flops = 0, 0, 0.0

    @property
    def target(self):
        """The weights of the level whose logits come out."""
        return self.weights[self.level]

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


class Cache:
    """Keys and values of every layer of every member level: k[m][i] is (N_m, B, context, K, h_m).

    Slots [0, length) are filled; all member levels read the same positions.
    """

    def __init__(self, dec, batch=1):
        cfg = dec.cfg
        self.k, self.v = {}, {}
        for m, w in dec.weights.items():
            shape = (w.N, batch, cfg.context, w.K, w.h)
            self.k[m] = [onp.zeros(shape, onp.float32) for _ in w.layers]
            self.v[m] = [onp.zeros(shape, onp.float32) for _ in w.layers]
        self.length = 0

    @property
    def batch(self):
        return next(iter(self.k.values()))[0].shape[1]

    def expand(self, rows):
        """A copy whose single batch row is repeated `rows` times: one branch per draft to verify."""
        if self.batch != 1:
            raise ValueError(f"only a cache with batch 1 can be expanded, this one has batch {self.batch}")
        out = object.__new__(Cache)
        L = self.length

        def grow(a):
            b = onp.empty(a.shape[:1] + (rows,) + a.shape[2:], onp.float32)
            b[:, :, :L] = a[:, :, :L]
            return b
        out.k = {m: [grow(a) for a in arrays] for m, arrays in self.k.items()}
        out.v = {m: [grow(a) for a in arrays] for m, arrays in self.v.items()}
        out.length = L
        return out

    def adopt(self, branch, row, length):
        """Keep one branch of an expanded copy: its slots [self.length, length) from batch row `row`."""
        L = self.length
        if not L <= length <= branch.length:
            raise ValueError(f"can adopt up to the branch's length {branch.length}, from {L}; asked {length}")
        for m in self.k:
            for mine, theirs in ((self.k[m], branch.k[m]), (self.v[m], branch.v[m])):
                for a, b in zip(mine, theirs):
                    a[:, 0, L:length] = b[:, row, L:length]
        self.length = length

    def rollback(self, length):
        """Forget every slot from `length` on (the next extend overwrites them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a cache of length {self.length} back to {length}")
        self.length = length


def attend_cached(dec, w, cache_k, cache_v, qkv, L, Tn):
    """One layer's attention for Tn new positions of N models: store their k, v; attend over [0, L+Tn).

    qkv (N,B,Tn,H+2K,h) -> rows (N,B*Tn,H*h).
    """
    N, B = qkv.shape[:2]
    H, K, h = w.H, w.K, w.h
    cos, sin = formulas.rope_tables(Tn, h, dec.cfg.rope_theta, L)
    q = formulas.rope(qkv[:, :, :, :H], cos, sin, onp)                         # (N,B,Tn,H,h)
    cache_k[:, :, L:L + Tn] = formulas.rope(qkv[:, :, :, H:H + K], cos, sin, onp)
    cache_v[:, :, L:L + Tn] = qkv[:, :, :, H + K:]
    k, v = cache_k[:, :, :L + Tn], cache_v[:, :, :L + Tn]                        # (N,B,L+Tn,K,h)
    probs = formulas.attention_weights(q, k, onp)                              # (N,B,H,Tn,L+Tn)
    out = formulas.weighted_values(probs, v, onp)                              # (N,B,Tn,H,h)
    dec.flops += 2 * 2 * N * B * H * Tn * (L + Tn) * h                         # q·kᵀ and probs·v
    return out.reshape(N, B * Tn, H * h)


def layer_cached(dec, w, x, i, cache, L, Tn):
    """Layer i of one member level for Tn new positions. x (N,B*Tn,d) -> (state after it, attention + MLP outputs)."""
    p = w.layers[i]
    N = x.shape[0]
    B = x.shape[1] // Tn
    qkv = dec.linear(unit(x, dec.eps), p["Wqkv"]).reshape(N, B, Tn, w.H + 2 * w.K, w.h)
    a = dec.linear(attend_cached(dec, w, cache.k[w.level][i], cache.v[w.level][i], qkv, L, Tn), p["Wo"])
    y = x + a
    gu = dec.linear(unit(y, dec.eps), p["Wgu"]) + p["bgu"]
    f = gu.shape[-1] // 2
    b = dec.linear(formulas.geglu(gu[..., :f], gu[..., f:], onp), p["Wdown"]) + p["bdown"]
    return y + b, a + b


def extend(dec, cache, ids):
    """Run Tn new positions after the cached ones and append their K and V.

    ids: (B,Tn) shared by the decoded models, or (N,B,Tn) one row per model (token variants; byte
    models take (B,Tn,g) or (N,B,Tn,g) groups). -> logits (N,B,Tn,V) (byte models: (N,B,Tn,g,V)).
    The new positions take window slots [length, length + Tn); they must fit in the context.
    """
    ids = dec.variant.check_decoder_ids(dec, ids)
    Tn, L = dec.variant.positions(dec.cfg, ids), cache.length
    if L + Tn > dec.cfg.context:
        raise ValueError(f"{Tn} new positions after {L} cached ones exceed the context of {dec.cfg.context}; "
                         f"slide the window first")
    flops_before = dec.flops
    x = {m: dec.variant.decoder_embed(dec, w, ids) for m, w in dec.weights.items()}     # (N_m,B,Tn,d_m)
    B = next(iter(x.values())).shape[1]
    if B != cache.batch:
        raise ValueError(f"the cache holds {cache.batch} rows but {B} were given")
    x = {m: a.reshape(a.shape[0], B * Tn, a.shape[-1]) for m, a in x.items()}          # token rows (N,M,d)
    for i in range(dec.cfg.layers):
        out, delta = {}, {}
        for m, w in dec.weights.items():
            out[m], delta[m] = layer_cached(dec, w, x[m], i, cache, L, Tn)
        x = dec.variant.decoder_couple(dec, i, out, delta)
    cache.length = L + Tn
    logits = dec.variant.decoder_output(dec, dec.target, unit(x[dec.level], dec.eps))    # (N,M,...,V)
    dec.calls += 1
    dec.latency_flops += (dec.flops - flops_before) / (B * Tn)
    return logits.reshape((dec.N, B, Tn) + logits.shape[2:])


def prefill(dec, ids, cache=None):
    """A fresh (or emptied) cache filled with a window. ids as `extend` -> (logits, cache)."""
    ids = onp.asarray(ids)
    cache = cache or dec.new_cache(dec.variant.batch_of(ids))
    cache.rollback(0)
    return extend(dec, cache, ids), cache


def check_keep(keep, context):
    """The number of positions a full window slides back to: an integer in [1, context] (None = context)."""
    if keep is None:
        return context
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= context:
        raise ValueError(f"keep must be an integer in [1, context={context}], got {keep!r}")
    return keep


def decode(dec, ids, max_new, choose, keep=None, on_logits=None):
    """Append max_new positions to the list `ids` with a cache; returns the new ones.

    A position is a token id (or, for byte models, a group of g bytes: a tuple). `choose(logits)` picks the
    next position from its logits ((V,), or (g,V) for bytes). `on_logits(window_start, logits)` sees every
    distribution, for tests. The first window is ids[-context:]; a full window slides.
    """
    if dec.N != 1:
        raise ValueError(f"decode runs one model; this decoder holds {dec.N}")
    if not ids:
        raise ValueError("decoding needs at least one prompt token")
    context = dec.cfg.context
    keep = check_keep(keep, context)
    start = max(0, len(ids) - context)
    logits, cache = prefill(dec, onp.asarray(ids[start:])[None])
    new = []
    for n in range(max_new):
        last = logits[0, 0, -1]
        if on_logits:
            on_logits(start, last)
        item = choose(last)
        ids.append(item)
        new.append(item)
        if n + 1 == max_new:
            break
        if cache.length == context:
            start = len(ids) - keep
            logits, cache = prefill(dec, onp.asarray(ids[start:])[None], cache)
        else:
            logits = extend(dec, cache, onp.asarray([item])[None])
    return new


def node_decoder(params, cfg, level, index):
    """A decoder for one node (level, index)."""
    cfg.check_node(level, index)
    return Decoder(params, cfg, level, [index])


def greedy_ids(params, cfg, ids, max_new_tokens, level=0, index=0, keep=None):
    """Greedy continuation of a list of token ids by node (level, index), with the cache."""
    ids = list(ids)
    return decode(node_decoder(params, cfg, level, index), ids, max_new_tokens,
                  lambda logits: int(onp.argmax(logits)), keep)
