"""Coupled trees: residual connections between the levels (SPEC.md section 4).

In the base model every node runs alone. Here the nodes talk after every layer i:

  upstream    each parent (l, j) adds  scale[l, i] * concat(states of its children, in order).
              The children's widths add up to the parent's, and their slices tile the parent's
              slice, so child r lands on coordinates [r*d_(l+1), (r+1)*d_(l+1)) of the parent.
              Leaves receive nothing. Running node (l, j) means running its whole subtree.
  downstream  each child (l, k) adds  scale[l, i] * (slice R of its parent (l-1, k//s)'s state),
              the parent's coordinates [r*d_l, (r+1)*d_l) with r = k mod s. The root receives
              nothing. Running node (l, k) means running its chain of ancestors.

What is sent is, by default, the sender's state after layer i's attention and MLP and before this
layer's coupling. Options (Config fields):
  coupling_cumulative  send the state after its own coupling, so one layer carries a signal across
                       several levels (upstream works bottom-up, downstream top-down);
  coupling_sublayer    send only the layer's attention + MLP outputs, not the whole state;
  coupling_scale_init  the learnable scale `coupling_scale` (levels, layers), indexed by the receiving
                       level, starts here: 0 gives exactly the base model at step 0.

Two paths compute the same thing, and a test proves it:
  `forward_tree` / `forward_node`   level-batched: the states of level l are one (N_l,B,T,d_l) array,
                                    so the children's concatenation is a reshape + transpose;
  `forward_nodes_reference`         node by node with model.py's blocks: readable, slow.
Generation (`generate`) runs the needed nodes with KV caches (as infer.py does for one node).
"""
import numpy as onp
import autograd.numpy as np

from tinyfractal.core import fast
from tinyfractal.core.model import (attention, cross_entropy, dropout, gelu, level_weight_table, mlp, rmsnorm, rope,
                                    rope_tables, scale_output)
from tinyfractal.inference.decoder import check_keep
from tinyfractal.core.tree import children, level_view, map_roles, nodes, parent, view


# The nodes one node needs

def needed_nodes(cfg, level, index):
    """The nodes that must run to get node (level, index)'s logits, level by level.

    none: the node alone; upstream: its subtree; downstream: its ancestors and itself.
    """
    return [(m, j) for m, (lo, hi) in sorted(node_ranges(cfg, level, index).items()) for j in range(lo, hi)]


def node_ranges(cfg, level, index):
    """needed_nodes as {level m: (lo, hi)}: the models [lo, hi) of level m (always a contiguous run)."""
    cfg.check_node(level, index)
    s = cfg.split
    if cfg.coupling == "upstream":
        return {m: (index * s ** (m - level), (index + 1) * s ** (m - level)) for m in range(level, cfg.levels)}
    if cfg.coupling == "downstream":
        return {m: (index // s ** (level - m), index // s ** (level - m) + 1) for m in range(level + 1)}
    return {level: (index, index + 1)}


def tree_ranges(cfg):
    """Every model of every level: {m: (0, s^m)}."""
    return {m: (0, cfg.n_models(m)) for m in range(cfg.levels)}


def coupling_scale(params, cfg):
    """The (levels, layers) scale of a coupled model, or None for the base model."""
    if cfg.coupling == "none":
        return None
    scale = params.get("coupling_scale")
    if scale is None or tuple(np.shape(scale)) != (cfg.levels, cfg.layers):
        got = None if scale is None else tuple(np.shape(scale))
        raise ValueError(f"coupling={cfg.coupling!r} needs params['coupling_scale'] of shape "
                         f"({cfg.levels}, {cfg.layers}) (levels, layers), got {got}; "
                         f"init_params(cfg) makes one")
    return scale


# Moving states between levels, for whole levels at once

def concat_children(x, s):
    """Each parent's children's states side by side. (s*N,B,T,d) -> (N,B,T,s*d)."""
    Nc, B, T, d = x.shape
    x = np.reshape(x, (Nc // s, s, B, T, d))                                   # (N,s,B,T,d)
    return np.reshape(np.transpose(x, (0, 2, 3, 1, 4)), (Nc // s, B, T, s * d))


def split_to_children(x, s):
    """Each parent's state cut into s slices, one per child, in order. (N,B,T,s*d) -> (s*N,B,T,d)."""
    N, B, T, D = x.shape
    x = np.reshape(x, (N, B, T, s, D // s))                                    # (N,B,T,s,d)
    return np.reshape(np.transpose(x, (0, 3, 1, 2, 4)), (N * s, B, T, D // s))


def received(cfg, sent, ranges, level):
    """What the models [lo, hi) of `level` receive from the level that sends to them, or None.

    sent: {level: (N,B,T,d)} states (or sublayer outputs) of the models in `ranges`.
    """
    s, (lo, hi) = cfg.split, ranges[level]
    if cfg.coupling == "upstream" and level + 1 in ranges:
        clo, chi = ranges[level + 1]
        if (clo, chi) != (s * lo, s * hi):
            raise ValueError(f"upstream: level {level} models [{lo},{hi}) need all their children "
                             f"[{s * lo},{s * hi}) at level {level + 1}, got [{clo},{chi})")
        return concat_children(sent[level + 1], s)
    if cfg.coupling == "downstream" and level - 1 in ranges:
        plo, phi = ranges[level - 1]
        if not (s * plo <= lo and hi <= s * phi):
            raise ValueError(f"downstream: level {level} models [{lo},{hi}) need their parents "
                             f"[{lo // s},{(hi - 1) // s + 1}) at level {level - 1}, got [{plo},{phi})")
        pieces = split_to_children(sent[level - 1], s)                         # children s*plo ...
        if (lo, hi) == (s * plo, s * phi):
            return pieces
        return pieces[lo - s * plo:hi - s * plo]
    return None


def couple(cfg, layer, scale, out, delta, ranges):
    """One layer's coupling for whole levels. out, delta: {level: (N,B,T,d)} -> new states {level: ...}.

    out[m] is level m's state after this layer's attention and MLP, delta[m] those two outputs alone.
    Senders are processed before receivers, so with `coupling_cumulative` what a level sends already
    includes what it received in this layer.
    """
    if cfg.coupling == "none":
        return out
    sent, new = {}, dict(out)
    for m in sorted(ranges, reverse=cfg.coupling == "upstream"):
        own = delta[m] if cfg.coupling_sublayer else out[m]
        got = received(cfg, sent, ranges, m)
        if got is not None:
            add = scale[m, layer] * got
            new[m] = out[m] + add
            if cfg.coupling_cumulative:
                own = own + add if cfg.coupling_sublayer else new[m]
        sent[m] = own
    return new


# The level-batched path (training, evaluation, running one node)

def stacked_params(params, cfg, ranges):
    """{level m: the models [lo, hi) of level m, stacked on a leading axis} (views of the arrays)."""
    out = {}
    for m, (lo, hi) in ranges.items():
        P = level_view(params, cfg, m)
        out[m] = P if (lo, hi) == (0, cfg.n_models(m)) else map_roles(lambda a, roles: a[lo:hi], P)
    return out


def layer_stacked(x, p, cfg, rng=None, sublayer=False):
    """One layer for N models: (N,B,T,d) -> (state after it, its attention + MLP outputs or None)."""
    if not sublayer:
        return fast.block(x, p, cfg, rng), None
    a = dropout(fast.attention(fast.norm(x, p["attn_norm"], cfg.eps), p, cfg), cfg.dropout, rng)
    x = x + a
    b = dropout(fast.mlp(fast.norm(x, p["mlp_norm"], cfg.eps), p), cfg.dropout, rng)
    return x + b, a + b


def run_states(params, cfg, ids, ranges, rng=None):
    """Final residual states of the models in `ranges`, coupled: ({level: (N,B,T,d)}, stacked params)."""
    ids = onp.asarray(ids)
    scale = coupling_scale(params, cfg)
    P = stacked_params(params, cfg, ranges)
    subs = {m: cfg.sub(m) for m in ranges}
    x = {m: fast.norm(fast.embed(P[m], ids), P[m]["emb_norm"], cfg.eps) for m in ranges}
    for i in range(cfg.layers):
        out, delta = {}, {}
        for m in ranges:
            out[m], delta[m] = layer_stacked(x[m], P[m]["layers"][i], subs[m], rng, cfg.coupling_sublayer)
        x = couple(cfg, i, scale, out, delta, ranges)
    return x, P


def forward_tree(params, cfg, ids, rng=None):
    """Logits of every node, the whole tree at once: [(1,B,T,V), (s,B,T,V), (s^2,B,T,V), ...]."""
    x, P = run_states(params, cfg, ids, tree_ranges(cfg), rng)
    return [fast.output_logits(x[m], P[m], cfg.sub(m)) for m in range(cfg.levels)]


def forward_node(params, cfg, level, index, ids, rng=None):
    """Logits of node (level, index), running only the nodes it needs. ids (B,T) -> (B,T,V)."""
    x, P = run_states(params, cfg, ids, node_ranges(cfg, level, index), rng)
    return fast.output_logits(x[level], P[level], cfg.sub(level))[0]         # the level runs this node only


def node_losses(params, cfg, ids, targets, rng=None):
    """Per-level arrays of per-model losses, coupled: [(1,), (s,), (s^2,), ...] (as fast.node_losses)."""
    return [fast.cross_entropy_per_model(logits, targets) for logits in forward_tree(params, cfg, ids, rng)]


def tree_loss(params, cfg, ids, targets, level_weights=None, rng=None):
    """Mean next-token cross-entropy over every node of the coupled tree (weighted per level if asked)."""
    weights = level_weight_table(cfg, level_weights)
    losses = node_losses(params, cfg, ids, targets, rng)
    return sum(weights[m] * np.sum(losses[m]) for m in range(cfg.levels))


# The reference path: node by node, with model.py's blocks

def _logits(x, p, cfg):
    """model.forward's tied output for one node; cfg is the node's own (cfg.sub(level)). (B,T,d) -> (B,T,V)."""
    B, T, d = x.shape
    out_emb = rmsnorm(p["E"], p["out_norm"], cfg.eps)                          # (V,d)
    x = scale_output(rmsnorm(x, p["final_norm"], cfg.eps), p, cfg)
    return np.reshape(np.dot(np.reshape(x, (B * T, d)), np.transpose(out_emb)), (B, T, -1))


def forward_nodes_reference(params, cfg, ids, run=None):
    """{node: logits (B,T,V)} for the nodes in `run` (default: all), each node its own model, coupled
    node by node after every layer. `run` must hold every node the coupling sends from (needed_nodes)."""
    run = sorted(nodes(cfg) if run is None else set(run))
    ids, eps, s = onp.asarray(ids), cfg.eps, cfg.split
    scale = coupling_scale(params, cfg)
    p = {n: view(params, cfg, *n) for n in run}
    x = {n: rmsnorm(p[n]["E"][ids], p[n]["emb_norm"], eps) for n in run}     # (B,T,d_l)
    for i in range(cfg.layers):
        out, delta = {}, {}
        for n in run:
            w, sub = p[n]["layers"][i], cfg.sub(n[0])
            a = attention(rmsnorm(x[n], w["attn_norm"], eps), w, sub)
            y = x[n] + a
            b = mlp(rmsnorm(y, w["mlp_norm"], eps), w)
            out[n], delta[n] = y + b, a + b
        x = dict(out)
        if cfg.coupling == "none":
            continue
        upstream = cfg.coupling == "upstream"
        sent = {}
        for n in sorted(run, key=lambda n: n[0], reverse=upstream):           # senders first
            own = delta[n] if cfg.coupling_sublayer else out[n]
            got = None
            if upstream and children(cfg, *n):
                got = np.concatenate([sent[c] for c in children(cfg, *n)], axis=-1)
            elif not upstream and n[0] > 0:
                d, r = cfg.width(n[0]), n[1] % s
                got = sent[parent(cfg, *n)][..., r * d:(r + 1) * d]
            if got is not None:
                x[n] = out[n] + scale[n[0], i] * got
                if cfg.coupling_cumulative:
                    own = own + scale[n[0], i] * got
            sent[n] = own
    return {n: _logits(x[n], p[n], cfg.sub(n[0])) for n in run}


def forward_node_reference(params, cfg, level, index, ids):
    """Logits of node (level, index) by the reference path, running needed_nodes. (B,T) -> (B,T,V)."""
    return forward_nodes_reference(params, cfg, ids, needed_nodes(cfg, level, index))[(level, index)]


def tree_loss_reference(params, cfg, ids, targets, level_weights=None):
    """The coupled tree loss node by node (readable, slow)."""
    weights = level_weight_table(cfg, level_weights)
    logits = forward_nodes_reference(params, cfg, ids)
    return sum(weights[l] * cross_entropy(logits[(l, j)], targets) for l, j in nodes(cfg))


# Generation: the needed nodes with KV caches

class Runner:
    """The models node (level, index) needs, as contiguous float32 copies stacked per level, plus a
    matmul FLOP counter. Decoding keeps a KV cache per level (`new_caches`)."""

    def __init__(self, params, cfg, level, index):
        self.cfg, self.level, self.index = cfg, level, index
        self.ranges = node_ranges(cfg, level, index)
        scale = coupling_scale(params, cfg)
        self.scale = None if scale is None else onp.asarray(scale, dtype=onp.float32)
        # level_view gives strided views, which BLAS would copy on every call: copy once here.
        self.P = {m: map_roles(lambda a, roles: onp.ascontiguousarray(a, dtype=onp.float32), P)
                  for m, P in stacked_params(params, cfg, self.ranges).items()}
        self.flops = 0

    def linear(self, x, W):
        """(N,B,T,A) @ (N,A,...) -> (N,B,T,C) as one batched 2-D matmul per model, counting 2*M*K*N FLOPs."""
        N, B, T, A = x.shape
        out = onp.matmul(x.reshape(N, B * T, A), W.reshape(N, A, -1))
        self.flops += 2 * out.size * A
        return out.reshape(N, B, T, -1)

    def new_caches(self, batch=1):
        """{level: {'k': [per layer (N,B,context,K,h)], 'v': [...], 'length': 0}}."""
        caches = {}
        for m, (lo, hi) in self.ranges.items():
            shape = (hi - lo, batch, self.cfg.context, self.cfg.kv_heads, self.cfg.head_width(m))
            caches[m] = {"k": [onp.zeros(shape, onp.float32) for _ in range(self.cfg.layers)],
                         "v": [onp.zeros(shape, onp.float32) for _ in range(self.cfg.layers)], "length": 0}
        return caches


def _gain(g):
    """(N,d) gain -> (N,1,1,d), to broadcast over (N,B,T,d)."""
    return g[:, None, None, :]


def attention_cached(run, x, p, cfg, cache, layer, L):
    """Attention of Tn new tokens (positions L..L+Tn-1) over the cached keys and their own; stores their
    keys and values in the cache. (N,B,Tn,d) -> (N,B,Tn,d)."""
    N, B, Tn, d = x.shape
    H, K, h = p["Wq"].shape[2], p["Wk"].shape[2], p["Wq"].shape[3]
    G, S = H // K, L + Tn
    q = run.linear(x, p["Wq"]).reshape(N, B, Tn, H, h)
    k = run.linear(x, p["Wk"]).reshape(N, B, Tn, K, h)
    v = run.linear(x, p["Wv"]).reshape(N, B, Tn, K, h)
    cos, sin = rope_tables(Tn, h, cfg.rope_theta, L)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    cache["k"][layer][:, :, L:S], cache["v"][layer][:, :, L:S] = k, v
    keys = cache["k"][layer][:, :, :S].transpose(0, 1, 3, 4, 2)                  # (N,B,K,h,S)
    values = cache["v"][layer][:, :, :S].transpose(0, 1, 3, 2, 4)                # (N,B,K,S,h)
    # the G query heads sharing a kv head are stacked on the query axis: one matmul per kv head
    q = q.reshape(N, B, Tn, K, G, h).transpose(0, 1, 3, 4, 2, 5).reshape(N, B, K, G * Tn, h)
    scores = onp.matmul(q, keys) * onp.float32(1.0 / onp.sqrt(h))               # (N,B,K,G*Tn,S)
    run.flops += 2 * scores.size * h
    visible = onp.arange(S)[None, :] <= L + onp.arange(Tn)[:, None]             # (Tn,S) causal
    scores = onp.where(onp.tile(visible, (G, 1)), scores, onp.float32(-1e30))
    weights = onp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = onp.matmul(weights, values)                                           # (N,B,K,G*Tn,h)
    run.flops += 2 * out.size * S
    out = out.reshape(N, B, K, G, Tn, h).transpose(0, 1, 4, 2, 3, 5).reshape(N, B, Tn, H * h)
    return run.linear(out, p["Wo"])


def layer_cached(run, x, p, cfg, cache, layer, L):
    """One layer for new tokens with a KV cache: (N,B,Tn,d) -> (state after it, attention + MLP outputs)."""
    a = attention_cached(run, rmsnorm(x, _gain(p["attn_norm"]), cfg.eps), p, cfg, cache, layer, L)
    y = x + a
    h = rmsnorm(y, _gain(p["mlp_norm"]), cfg.eps)
    hidden = gelu(run.linear(h, p["Wgate"]) + p["bgate"][:, None, None, :]) * (
        run.linear(h, p["Wup"]) + p["bup"][:, None, None, :])
    b = run.linear(hidden, p["Wdown"]) + p["bdown"][:, None, None, :]
    return y + b, a + b


def extend(run, caches, ids):
    """Run Tn new tokens through every needed model, coupled, after the cached ones. ids (B,Tn) -> (B,Tn,V)."""
    ids, cfg = onp.asarray(ids), run.cfg
    L, Tn = caches[run.level]["length"], ids.shape[-1]
    if L + Tn > cfg.context:
        raise ValueError(f"{Tn} new tokens after {L} cached ones exceed the context of {cfg.context}")
    x = {m: rmsnorm(P["E"][:, ids], _gain(P["emb_norm"]), cfg.eps) for m, P in run.P.items()}   # (N,B,Tn,d)
    for i in range(cfg.layers):
        out, delta = {}, {}
        for m, P in run.P.items():
            out[m], delta[m] = layer_cached(run, x[m], P["layers"][i], cfg.sub(m), caches[m], i, L)
        x = couple(cfg, i, run.scale, out, delta, run.ranges)
    for cache in caches.values():
        cache["length"] = L + Tn
    P = run.P[run.level]                                                         # this node alone at its level
    out_emb = rmsnorm(P["E"], P["out_norm"][:, None, :], cfg.eps)               # (1,V,d)
    h = scale_output(rmsnorm(x[run.level], _gain(P["final_norm"]), cfg.eps), P, cfg.sub(run.level))
    return run.linear(h, out_emb.transpose(0, 2, 1))[0]


def prefill(run, ids, caches=None):
    """Fresh (or emptied) caches filled with a window of tokens. ids (B,T) -> (logits (B,T,V), caches)."""
    ids = onp.asarray(ids)
    caches = caches or run.new_caches(ids.shape[0])
    for cache in caches.values():
        cache["length"] = 0
    return extend(run, caches, ids), caches


def decode(run, ids, max_new_tokens, choose, keep=None, on_logits=None):
    """Append max_new_tokens tokens to the list `ids` with KV caches; returns the new tokens.

    choose(logits (V,)) picks a token; on_logits(window_start, logits) sees every distribution. The
    first window is ids[-context:]; a full window slides, rebuilding the caches from the last `keep`
    tokens (default context: exactly the window the recompute path sees).
    """
    context = run.cfg.context
    keep = check_keep(keep, context)
    start = max(0, len(ids) - context)
    logits, caches = prefill(run, onp.asarray(ids[start:])[None])
    new = []
    for n in range(max_new_tokens):
        last = logits[0, -1]
        if on_logits:
            on_logits(start, last)
        token = choose(last)
        ids.append(token)
        new.append(token)
        if n + 1 == max_new_tokens:
            break
        if caches[run.level]["length"] == context:
            start = len(ids) - keep
            logits, caches = prefill(run, onp.asarray(ids[start:])[None], caches)
        else:
            logits = extend(run, caches, [[token]])
    return new


def generate(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200, temperature=1.0,
             top_k=None, top_p=None, seed=0, keep=None):
    """Sample from node (level, index) of a coupled model with KV caches; returns prompt + new text.

    Same arguments and sampling as sample.generate, which sends coupled configs here.
    """
    from tinyfractal.inference.sample import check_sampling, prompt_ids, sample_token
    cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    ids = prompt_ids(tokenizer, prompt)
    rng = onp.random.default_rng(seed)
    new = decode(Runner(params, cfg, level, index), ids, max_new_tokens,
                 lambda logits: sample_token(logits, rng, temperature, top_k, top_p), keep)
    return prompt + tokenizer.decode(new)


def generate_reference(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200,
                       temperature=1.0, top_k=None, top_p=None, seed=0, on_logits=None):
    """The same sampling without caches: every token recomputes the window ids[-context:] with
    forward_node. The definition `generate` is tested against."""
    from tinyfractal.inference.sample import check_sampling, prompt_ids, sample_token
    cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    ids = prompt_ids(tokenizer, prompt)
    rng = onp.random.default_rng(seed)
    new = []
    for _ in range(max_new_tokens):
        start = max(0, len(ids) - cfg.context)
        logits = forward_node(params, cfg, level, index, onp.asarray(ids[start:])[None])[0, -1]
        if on_logits:
            on_logits(start, logits)
        token = sample_token(logits, rng, temperature, top_k, top_p)
        ids.append(token)
        new.append(token)
    return prompt + tokenizer.decode(new)


# What it costs

def model_flops(cfg, level, T, logits=True):
    """Matmul FLOPs (2 per multiply-add) for one model of `level` reading one sequence of T tokens.

    Attention scores and their product with v are counted over the full T x T square, as computed.
    """
    d, h, f, H, K = cfg.width(level), cfg.head_width(level), cfg.mlp_width(level), cfg.heads, cfg.kv_heads
    per_layer = 2 * T * d * (H + 2 * K) * h + 2 * 2 * H * h * T * T + 2 * T * H * h * d + 2 * T * d * 3 * f
    return cfg.layers * per_layer + (2 * T * d * cfg.vocab_size if logits else 0)


def coupling_flops(cfg, level, T):
    """FLOPs of the coupling adds one model of `level` receives over all layers (scale * x, then +)."""
    receives = (cfg.coupling == "upstream" and level < cfg.levels - 1) or (cfg.coupling == "downstream" and level > 0)
    return cfg.layers * 2 * T * cfg.width(level) if receives else 0


def node_run_flops(cfg, level, index, T):
    """Forward FLOPs to get node (level, index)'s logits for T tokens: every needed node's layers,
    the coupling adds, and one output projection (the node's own)."""
    return sum(model_flops(cfg, m, T, logits=(m == level)) + coupling_flops(cfg, m, T)
               for m, _ in needed_nodes(cfg, level, index))


def train_step_flops(cfg, B, T):
    """About 3x the forward FLOPs of every node (the backward pass costs about twice the forward)."""
    return 3 * B * sum(model_flops(cfg, m, T) + coupling_flops(cfg, m, T) for m, _ in nodes(cfg))
