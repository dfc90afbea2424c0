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

from tinyfractal.inference import decoder
from tinyfractal.inference.sample import check_sampling, check_tokenizer, filtered_probs
from tinyfractal.variants import variant_of


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
    latency_flops: float = 0.0  # sum over passes of one row's FLOPs (see decoder.py)
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
    drawn independently. Draft r's first token is kept with probability min(1, left(t)/q_r(t)), where left
    starts as the verifier's p and, after each refusal, becomes normalize(max(0, left - q_r)); if every
    draft is refused, the token is drawn from the last left. A kept draft continues with the standard
    rule. Every draft's first position has the same context, so p[r, 0] is the same for every r.
    Returns (row, accepted count, next token).
    """
    left = p[0, 0]
    for r in range(len(drafts)):
        t = drafts[r, 0]
        if rng.random() * q[r, 0, t] < left[t]:
            a, nxt = accept_sampled(p[r, 1:], q[r, 1:], drafts[r, 1:], rng)
            return r, 1 + a, nxt
        residual = onp.maximum(left - q[r, 0], 0.0)
        total = residual.sum()
        left = residual / total if total > 0 else left
    return 0, 0, int(rng.choice(len(left), p=left))


class Group:
    """Drafters decoded together: one Decoder and one cache (its length says how far they have read).

    The drafters of one level share a group when each can be fed its own tokens (base models); a coupled
    drafter needs its relatives' states, which follow one sequence, so it gets a group of its own.
    """

    def __init__(self, params, cfg, level, indices):
        self.nodes = [(level, j) for j in indices]
        self.dec = decoder.Decoder(params, cfg, level, indices)
        self.cache = self.dec.new_cache(1)
        self.drafts, self.q = None, None


def drafter_groups(params, cfg, nodes):
    """The drafter nodes as Groups: one per level when each model can read its own tokens, else one per node."""
    by_level = {}
    for level, j in nodes:
        by_level.setdefault(level, []).append(j)
    groups = []
    for level, indices in sorted(by_level.items()):
        if len(variant_of(cfg).members(cfg, level, indices)) == 1:
            groups.append(Group(params, cfg, level, indices))
        else:
            groups += [Group(params, cfg, level, [j]) for j in indices]
    return groups


class Round:
    """What one round needs to know: the window, and how to turn logits into tokens."""

    def __init__(self, temperature, top_k, top_p, rng):
        self.sampled = temperature > 0
        self.temperature, self.top_k, self.top_p, self.rng = temperature, top_k, top_p, rng

    def pick(self, logits):
        return filtered_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs):
        return int(self.rng.choice(len(probs), p=probs)) if self.sampled else int(onp.argmax(probs))


def draft(group, ids, start, k, rnd):
    """Step 1: the group's drafters catch up to the pending token ids[-1], then propose k tokens each.

    Sets group.drafts (N,k) and, when sampling, group.q (N,k,V): the distributions the drafts were drawn from.
    """
    chunk = onp.asarray(ids[start + group.cache.length:])[None]
    out = decoder.extend(group.dec, group.cache, chunk)[:, 0, -1]                 # (N,V)
    drafts = onp.zeros((group.dec.N, k), dtype=onp.int64)
    q = onp.zeros((group.dec.N, k, out.shape[-1]))
    for i in range(k):
        if rnd.sampled:                                                          # each drafter draws from its own q
            q[:, i] = [rnd.pick(row) for row in out]
            drafts[:, i] = [rnd.draw(row) for row in q[:, i]]
        else:
            drafts[:, i] = onp.argmax(out, axis=-1)
        if i + 1 < k:
            feed = drafts[:, i:i + 1, None] if group.dec.N > 1 else drafts[:, i:i + 1]
            out = decoder.extend(group.dec, group.cache, feed)[:, 0, -1]
    group.drafts, group.q = drafts, q


def verify(verifier, vcache, groups, pending, L, rnd):
    """Step 2: the verifier scores every distinct draft in one batched pass and keeps the best one.

    Returns (accepted drafted tokens, the verifier's next token, the drafter node whose draft won,
    the drafts checked (R,k), their owners). The verifier cache grows by the kept positions.
    """
    rows = [tuple(row) for g in groups for row in g.drafts]
    owners = [node for g in groups for node in g.nodes]
    check = rows if rnd.sampled else list(dict.fromkeys(rows))   # greedy checks each distinct draft once
    k = len(rows[0])
    drafts = onp.asarray(check, dtype=onp.int64).reshape(len(check), k)
    tokens = onp.concatenate([onp.full((len(check), 1), pending), drafts], axis=1)
    branch = vcache.expand(len(check))
    vlogits = decoder.extend(verifier, branch, tokens)[0]                          # (R,k+1,V)
    if rnd.sampled:
        p = onp.asarray([[rnd.pick(pos) for pos in row] for row in vlogits])       # (R,k+1,V)
        q = onp.concatenate([g.q for g in groups])                                  # (R,k,V)
        if len(check) == 1:
            row, (a, nxt) = 0, accept_sampled(p[0], q[0], drafts[0], rnd.rng)
        else:
            row, a, nxt = accept_sampled_multi(p, q, drafts, rnd.rng)
        chosen = owners[row]
    else:
        row, a, nxt = accept_greedy(onp.argmax(vlogits, axis=-1), drafts)
        chosen = owners[rows.index(check[row])]
    vcache.adopt(branch, row, L + a + 1)
    new = [int(t) for t in drafts[row, :a]] + [nxt]
    return new, chosen, drafts, [[o for o, r in zip(owners, rows) if r == d] for d in check], row, a, nxt


def roll_back(groups, new, L):
    """Step 3: every drafter's cache keeps what it fed that agrees with the accepted tokens."""
    for g in groups:
        fed = g.drafts[:, :-1]                                                     # what each fed after pending
        agree = onp.cumprod(fed[:, :len(new)] == onp.asarray(new[:fed.shape[1]]), axis=1).sum(axis=1)
        g.cache.rollback(L + 1 + int(agree.min()))


def speculative_ids(params, cfg, ids, max_new_tokens=200, verifier=(0, 0), drafters=None, k=4,
                    temperature=0.0, top_k=None, top_p=None, seed=0, keep=None, on_round=None):
    """Continue the token list `ids` by speculative decoding. Returns (new token ids, SpecStats).

    temperature 0 is greedy verification; temperature > 0 uses the accept/reject rule (one drafter)
    or its recursive form (several drafters). `on_round(info)` sees every round.
    """
    variant_of(cfg).require("speculative", "speculative decoding")
    check_k(k)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    verifier = check_node_pair(cfg, verifier, "verifier")
    nodes = resolve_drafters(cfg, verifier, drafters)
    context = cfg.context
    keep = decoder.check_keep(keep, context)
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("speculative decoding needs at least one prompt token")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got {min(ids)}..{max(ids)}")
    rnd = Round(temperature, top_k, top_p, onp.random.default_rng(seed))
    groups = drafter_groups(params, cfg, nodes)
    vdec = decoder.Decoder(params, cfg, verifier[0], [verifier[1]])
    vcache = vdec.new_cache(1)
    stats = SpecStats(accepted_by={n: 0 for n in nodes})
    n_prompt = len(ids)
    start = max(0, len(ids) - context)                          # the first window, as in plain decoding
    while len(ids) - n_prompt < max_new_tokens:
        L = len(ids) - 1 - start                                # window slot of the pending token ids[-1]
        if L == context:                                        # full: slide, as plain decoding does
            start = len(ids) - keep
            L = keep - 1
            for cache in [vcache] + [g.cache for g in groups]:
                cache.rollback(0)
        k_eff = min(k, context - 1 - L, max_new_tokens - (len(ids) - n_prompt) - 1)
        if k_eff < 1:                                           # nothing to check: one plain step
            logits = decoder.extend(vdec, vcache, onp.asarray(ids[start + vcache.length:])[None])
            stats.plain_steps += 1
            ids.append(rnd.draw(rnd.pick(logits[0, 0, -1])))
            continue
        if vcache.length < L:                                   # the verifier caches all but the pending token
            decoder.extend(vdec, vcache, onp.asarray(ids[start + vcache.length:-1])[None])
        for g in groups:
            draft(g, ids, start, k_eff, rnd)
        new, chosen, checked, owners, row, a, nxt = verify(vdec, vcache, groups, ids[-1], L, rnd)
        roll_back(groups, new, L)
        stats.rounds += 1
        stats.accepted_by[chosen] += 1
        stats.drafted += k_eff
        stats.accepted += a
        stats.first_accepted += a > 0
        if on_round:
            on_round({"drafts": checked, "owners": owners, "row": row, "accepted": a, "token": nxt,
                      "window_start": start, "known": len(ids)})
        ids.extend(new)
    stats.new_tokens = len(ids) - n_prompt
    stats.verifier_calls, stats.drafter_calls = vdec.calls, sum(g.dec.calls for g in groups)
    stats.verifier_flops = vdec.flops
    stats.drafter_flops = sum(g.dec.flops for g in groups)
    stats.latency_flops = vdec.latency_flops + sum(g.dec.latency_flops for g in groups)
    return ids[n_prompt:], stats


def speculative_generate(params, cfg, tokenizer, prompt, verifier=(0, 0), drafters=None, k=4,
                         max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, seed=0, keep=None,
                         on_round=None):
    """Text from `verifier` (default the whole model), drafted by its sub-models.

    drafters: None (the verifier's children), a level (all its descendants there) or a list of nodes.
    Returns (prompt + new text, SpecStats).
    """
    v = variant_of(cfg)
    v.require("speculative", "speculative decoding")
    tokenizer = check_tokenizer(v, cfg, tokenizer)
    new, stats = speculative_ids(params, cfg, v.prompt_ids(cfg, tokenizer, prompt), max_new_tokens, verifier,
                                 drafters, k, temperature, top_k, top_p, seed, keep, on_round)
    return prompt + tokenizer.decode(new), stats
