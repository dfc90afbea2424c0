"""Self-speculative decoding: a FractalFormer's own sub-models draft, a bigger node verifies.

The drafters are descendants of the verifier, so they cost no extra weights: they are slices of the
same arrays. One round:
  1. every drafter proposes k tokens greedily (or by sampling), from its own KV cache; all the
     drafters of one level run as one batched computation;
  2. the verifier scores every distinct draft in ONE batched pass over k+1 positions
     (the pending token, then the k drafted ones);
  3. it keeps the draft with the longest accepted prefix, plus its own next token there, and every
     cache rolls back to the accepted length.
Greedy verification keeps a drafted token only if it is the verifier's argmax, so the output is the
verifier's own greedy output, token for token. With sampling (one drafter) a drafted token t is kept
with probability min(1, p(t)/q(t)); on rejection the token is drawn from normalize(max(0, p - q)).
This leaves the verifier's distribution p exactly as it was (Leviathan et al. 2023; Chen et al. 2023).
Several drafters under sampling take turns at the first position, each against what the previous
refusals left of p (the recursive rule of SpecInfer, Miao et al. 2024).

Speculation saves sequential verifier passes, not arithmetic: the verifier still scores every token
it keeps (and the refused ones), so its matmul FLOPs never fall below plain decoding's.
"""
from dataclasses import dataclass, field

import numpy as onp

from tinyfractal.inference import decoder as infer
from tinyfractal.inference.sample import check_sampling, filtered_probs, prompt_ids


def is_descendant(cfg, node, ancestor):
    """Is `node` strictly below `ancestor` in the tree? (l, j) is under (a, i) iff l > a and j // s^(l-a) = i."""
    (level, index), (alevel, aindex) = node, ancestor
    return level > alevel and index // cfg.split ** (level - alevel) == aindex


def resolve_drafters(cfg, verifier, drafters):
    """The drafter nodes, sorted: None = every descendant of the verifier one level down; an int = every
    descendant at that level; or a list of (level, index) nodes, each a descendant of the verifier."""
    vlevel, vindex = check_node_pair(cfg, verifier, "verifier")
    if vlevel == cfg.levels - 1:
        raise ValueError(f"the verifier {verifier} is a leaf (level {vlevel}); it has no sub-models to draft with")
    if drafters is None:
        drafters = vlevel + 1
    if isinstance(drafters, int) and not isinstance(drafters, bool):
        if not vlevel < drafters < cfg.levels:
            raise ValueError(f"drafter level {drafters} must be deeper than the verifier's level {vlevel}: "
                             f"one of {list(range(vlevel + 1, cfg.levels))}")
        span = cfg.split ** (drafters - vlevel)
        return [(drafters, vindex * span + r) for r in range(span)]
    if not isinstance(drafters, (list, tuple)) or not drafters:
        raise ValueError(f"drafters must be None, a level (int) or a non-empty list of (level, index) nodes; "
                         f"got {drafters!r}")
    out = []
    for node in drafters:
        node = check_node_pair(cfg, node, "drafter")
        if not is_descendant(cfg, node, (vlevel, vindex)):
            raise ValueError(f"drafter {node} is not a descendant of the verifier {(vlevel, vindex)}; "
                             f"drafters must be sub-models of the verifier")
        if node in out:
            raise ValueError(f"drafter {node} is listed twice")
        out.append(node)
    return sorted(out)


def parse_drafters(cfg, verifier, text):
    """Drafters written for the command line: parts joined by '+', each a level ('2': every descendant
    of the verifier there) or a node ('2.1'). '2' -> level 2; '2.0+2.3' -> two nodes; '1+2' -> two levels."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"drafters must be written like '2', '2.1', '2.0+2.3' or '1+2'; got {text!r}")
    nodes = []
    for part in text.split("+"):
        try:
            numbers = [int(v) for v in part.strip().split(".")]
        except ValueError:
            numbers = []
        if len(numbers) == 1:
            nodes += resolve_drafters(cfg, verifier, numbers[0])
        elif len(numbers) == 2:
            nodes.append(tuple(numbers))
        else:
            raise ValueError(f"drafter {part!r} is neither a level (like '2') nor a node (like '2.1')")
    return resolve_drafters(cfg, verifier, nodes)


def check_node_pair(cfg, node, what):
    if not isinstance(node, (tuple, list)) or len(node) != 2:
        raise ValueError(f"the {what} must be a (level, index) pair, got {node!r}")
    level, index = node
    cfg.check_node(level, index)
    return int(level), int(index)


def check_k(k):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"draft length k must be an integer >= 1, got {k!r}")


@dataclass
class SpecStats:
    """What a speculative run did. FLOPs are matmul FLOPs, counted as the matmuls run."""
    new_tokens: int = 0
    rounds: int = 0            # verifier passes that checked drafts
    plain_steps: int = 0       # verifier passes with nothing to check (window full, or last token)
    drafted: int = 0           # draft positions offered for checking (k per round, or fewer at the end)
    accepted: int = 0          # drafted tokens the verifier kept
    first_accepted: int = 0    # rounds whose first drafted token was kept
    verifier_calls: int = 0    # every verifier forward: prefills, checks, plain steps
    drafter_calls: int = 0     # every batched drafter forward (a level's drafters count once)
    verifier_flops: int = 0
    drafter_flops: int = 0
    latency_flops: float = 0.0  # sum over passes of one row's FLOPs (see infer.Models)
    accepted_by: dict = field(default_factory=dict)   # drafter node -> rounds its draft was chosen

    @property
    def acceptance_rate(self):
        """Accepted drafted tokens / drafted positions (along the chosen draft)."""
        return self.accepted / max(1, self.drafted)

    @property
    def mean_accepted(self):
        """Drafted tokens kept per round (the verifier's own token not counted)."""
        return self.accepted / max(1, self.rounds)

    @property
    def verifier_calls_per_token(self):
        return self.verifier_calls / max(1, self.new_tokens)

    @property
    def flops(self):
        return self.verifier_flops + self.drafter_flops

    def as_dict(self):
        out = {k: v for k, v in self.__dict__.items() if k != "accepted_by"}
        out["accepted_by"] = {f"{l}.{j}": n for (l, j), n in sorted(self.accepted_by.items())}
        for name in ("acceptance_rate", "mean_accepted", "verifier_calls_per_token", "flops"):
            out[name] = getattr(self, name)
        return out


def accept_greedy(verifier_tokens, drafts):
    """Greedy check of R drafts at once. verifier_tokens (R,k+1) argmaxes, drafts (R,k) ->
    (row, accepted, next token): the row with the longest prefix equal to the verifier's choices."""
    match = onp.cumprod(drafts == verifier_tokens[:, :-1], axis=1)
    lengths = match.sum(axis=1)
    row = int(onp.argmax(lengths))
    a = int(lengths[row])
    return row, a, int(verifier_tokens[row, a])


def accept_sampled(p, q, draft, rng):
    """The standard accept/reject rule. p (k+1,V) verifier, q (k,V) drafter, draft (k,) drawn from q.

    Token i is kept with probability min(1, p_i(t)/q_i(t)); the first rejected one is replaced by a
    draw from normalize(max(0, p_i - q_i)); if all are kept, a bonus token comes from p_k.
    Returns (accepted count, next token).
    """
    for i, t in enumerate(draft):
        if rng.random() * q[i, t] < p[i, t]:
            continue
        residual = onp.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        return i, int(rng.choice(len(residual), p=residual))
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


def accept_sampled_multi(p, q, drafts, rng):
    """Several drafters, sampled: recursive rejection at the first position (SpecInfer, Miao et al. 2024).

    p (R,k+1,V) the verifier along each draft, q (R,k,V) each drafter's own distributions, drafts (R,k),
    drawn independently. Draft r's first token is kept with probability min(1, P(t)/q_r(t)), where P
    starts as the verifier's p and, after each refusal, becomes normalize(max(0, P - q_r)); if every
    draft is refused, the token is drawn from the last P. A kept draft continues with the standard
    rule. Every draft's first position has the same context, so p[r, 0] is the same for every r.
    Returns (row, accepted count, next token).
    """
    P = p[0, 0]
    for r in range(len(drafts)):
        t = drafts[r, 0]
        if rng.random() * q[r, 0, t] < P[t]:
            a, nxt = accept_sampled(p[r, 1:], q[r, 1:], drafts[r, 1:], rng)
            return r, 1 + a, nxt
        residual = onp.maximum(P - q[r, 0], 0.0)
        total = residual.sum()
        P = residual / total if total > 0 else P
    return 0, 0, int(rng.choice(len(P), p=P))


class Group:
    """The drafters of one level, batched: one Models and one cache (its length says how far they have read)."""

    def __init__(self, params, cfg, level, indices):
        self.nodes = [(level, j) for j in indices]
        self.models = infer.Models(params, cfg, level, indices)
        self.cache = self.models.new_cache(1)


def speculative_ids(params, cfg, ids, max_new_tokens=200, verifier=(0, 0), drafters=None, k=4,
                    temperature=0.0, top_k=None, top_p=None, seed=0, keep=None, on_round=None):
    """Continue the token list `ids` by speculative decoding. Returns (new token ids, SpecStats).

    temperature 0 is greedy verification; temperature > 0 uses the accept/reject rule (one drafter)
    or its recursive form (several drafters). `on_round(info)` sees every round.
    """
    infer.check_base(cfg)
    check_k(k)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    verifier = check_node_pair(cfg, verifier, "verifier")
    nodes = resolve_drafters(cfg, verifier, drafters)
    sampled = temperature > 0
    context = cfg.context
    keep = infer.check_keep(keep, context)
    rng = onp.random.default_rng(seed)
    levels = sorted({level for level, _ in nodes})
    groups = [Group(params, cfg, level, [j for l, j in nodes if l == level]) for level in levels]
    V = infer.Models(params, cfg, verifier[0], [verifier[1]])
    stats = SpecStats(accepted_by={n: 0 for n in nodes})
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("speculative decoding needs at least one prompt token")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {min(ids)}..{max(ids)}")
    n_prompt = len(ids)

    def pick(logits):
        return filtered_probs(logits, temperature, top_k, top_p)

    def draw(probs):
        return int(rng.choice(len(probs), p=probs)) if sampled else int(onp.argmax(probs))

    start = max(0, len(ids) - context)                          # the first window, as in plain decoding
    vcache = V.new_cache(1)
    while len(ids) - n_prompt < max_new_tokens:
        L = len(ids) - 1 - start                                # window slot of the pending token ids[-1]
        if L == context:                                        # full: slide, as plain decoding does
            start = len(ids) - keep
            L = keep - 1
            for cache in [vcache] + [g.cache for g in groups]:
                cache.rollback(0)
        remaining = max_new_tokens - (len(ids) - n_prompt)
        k_eff = min(k, context - 1 - L, remaining - 1)
        pending = ids[-1]
        if k_eff < 1:                                           # nothing to check: one plain step
            logits = infer.extend(V, vcache, onp.asarray(ids[start + vcache.length:])[None])
            stats.plain_steps += 1
            ids.append(draw(pick(logits[0, 0, -1])))
            continue
        if vcache.length < L:                                   # the verifier caches all but the pending token
            infer.extend(V, vcache, onp.asarray(ids[start + vcache.length:-1])[None])

        rows, owners, qs = [], [], []
        for g in groups:
            chunk = onp.asarray(ids[start + g.cache.length:])[None]       # catch up to the pending token
            out = infer.extend(g.models, g.cache, chunk)[:, 0, -1]       # (N,V)
            drafts = onp.zeros((g.models.N, k_eff), dtype=onp.int64)
            q = onp.zeros((g.models.N, k_eff, out.shape[-1]))
            for i in range(k_eff):
                if sampled:                                              # each drafter draws from its own q
                    q[:, i] = [pick(row) for row in out]
                    drafts[:, i] = [draw(row) for row in q[:, i]]
                else:
                    drafts[:, i] = onp.argmax(out, axis=-1)
                if i + 1 < k_eff:
                    out = infer.extend(g.models, g.cache, drafts[:, i:i + 1, None])[:, 0, -1]
            g.drafts = drafts
            rows += [tuple(row) for row in drafts]
            owners += g.nodes
            qs.append(q)
        # Greedy checks each distinct draft once; sampling needs every draw, repeats included.
        check = rows if sampled else list(dict.fromkeys(rows))
        draft_arr = onp.asarray(check, dtype=onp.int64).reshape(len(check), k_eff)
        tokens = onp.concatenate([onp.full((len(check), 1), pending), draft_arr], axis=1)
        branch = vcache.expand(len(check))
        vlogits = infer.extend(V, branch, tokens)[0]                      # (R,k_eff+1,V)
        stats.rounds += 1
        if sampled:
            p = onp.asarray([[pick(pos) for pos in row] for row in vlogits])  # (R,k_eff+1,V)
            q = onp.concatenate(qs)                                           # (R,k_eff,V)
            if len(check) == 1:
                row, (a, nxt) = 0, accept_sampled(p[0], q[0], draft_arr[0], rng)
            else:
                row, a, nxt = accept_sampled_multi(p, q, draft_arr, rng)
            chosen = owners[row]
        else:
            row, a, nxt = accept_greedy(onp.argmax(vlogits, axis=-1), draft_arr)
            chosen = owners[rows.index(check[row])]
        vcache.adopt(branch, row, L + a + 1)
        new = [int(t) for t in draft_arr[row, :a]] + [nxt]
        stats.accepted_by[chosen] += 1
        stats.drafted += k_eff
        stats.accepted += a
        stats.first_accepted += a > 0
        for g in groups:
            fed = g.drafts[:, :k_eff - 1]                                  # what each drafter fed after pending
            agree = onp.cumprod(fed[:, :len(new)] == onp.asarray(new[:fed.shape[1]]), axis=1).sum(axis=1)
            g.cache.rollback(L + 1 + int(agree.min()))
        if on_round:
            on_round({"drafts": draft_arr, "owners": [[o for o, r in zip(owners, rows) if r == d] for d in check],
                      "row": row, "accepted": a, "token": nxt, "window_start": start, "known": len(ids)})
        ids.extend(new)
    stats.new_tokens = len(ids) - n_prompt
    stats.verifier_calls, stats.drafter_calls = V.calls, sum(g.models.calls for g in groups)
    stats.verifier_flops = V.flops
    stats.drafter_flops = sum(g.models.flops for g in groups)
    stats.latency_flops = V.latency_flops + sum(g.models.latency_flops for g in groups)
    return ids[n_prompt:], stats


def speculative_generate(params, cfg, tokenizer, prompt, verifier=(0, 0), drafters=None, k=4,
                         max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, seed=0, keep=None,
                         on_round=None):
    """Text from `verifier` (default the whole model), drafted by its sub-models.

    drafters: None (the verifier's children), a level (all its descendants there) or a list of nodes.
    Returns (prompt + new text, SpecStats).
    """
    new, stats = speculative_ids(params, cfg, prompt_ids(tokenizer, prompt), max_new_tokens, verifier,
                                 drafters, k, temperature, top_k, top_p, seed, keep, on_round)
    return prompt + tokenizer.decode(new), stats
