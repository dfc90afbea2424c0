"""Sampling text from any node of the tree, for every variant: temperature, top-k and top-p, all of which act.

`generate` decodes with the KV-cached decoder (`decoder.py`); `generate_reference` recomputes the whole
window for every position with the variant's reference forward: the readable definition the cached path
is tested against. A position is a token, or for byte models a group of g bytes sampled slot by slot
(the slots come from the same state, so given the past they are drawn independently).
"""
import math
import numbers

import numpy as onp

from tinyfractal.inference import decoder
from tinyfractal.variants import variant_of


MIN_TEMPERATURE = 1e-6


def check_sampling(temperature, top_k, top_p, max_new_tokens=0):
    """Raise ValueError for sampling settings outside their ranges.

    temperature: 0 (greedy) or a finite number >= MIN_TEMPERATURE = 1e-6. Below that, sampling is
    greedy in all but name, and the smallest floats (1e-320) overflow logits / temperature to inf,
    whose softmax is nan. NumPy integer and float scalars are accepted like Python numbers.
    """
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or not (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def filtered_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution the sampler draws from: (V,) logits -> (V,) float64 probabilities.

    temperature 0 puts all mass on the argmax. top_k keeps the k most likely tokens; top_p keeps the
    smallest set of most likely tokens whose mass reaches p (always at least one). Both renormalise.
    """
    logits = onp.asarray(logits, dtype=onp.float64)
    V = logits.shape[-1]
    if temperature == 0:
        p = onp.zeros(V)
        p[int(onp.argmax(logits))] = 1.0
        return p
    z = logits / temperature
    if top_k is not None and top_k < V:
        keep = onp.argsort(-z, kind="stable")[:top_k]    # ties go to the lower id, as argmax does
        z = onp.where(onp.isin(onp.arange(V), keep), z, -onp.inf)
    p = onp.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = onp.argsort(-p, kind="stable")
        cumulative = onp.cumsum(p[order])
        keep = order[:int(onp.searchsorted(cumulative, top_p) + 1)]
        mask = onp.zeros(V, dtype=bool)
        mask[keep] = True
        p = onp.where(mask, p, 0.0)
        p /= p.sum()
    return p


def sample_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token id drawn from `filtered_probs`."""
    p = filtered_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return int(onp.argmax(p))
    return int(rng.choice(len(p), p=p))


def check_tokenizer(variant, cfg, tokenizer):
    """The tokenizer to use: the variant's own when None; ValueError if it does not fit the config."""
    if tokenizer is None:
        return variant.tokenizer(cfg)
    if getattr(tokenizer, "vocab_size", None) != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {getattr(tokenizer, 'vocab_size', None)} tokens but this {variant.name} "
                         f"model reads {cfg.vocab_size}; pass tokenizer=None to use the variant's own")
    return tokenizer


def _setup(params, cfg, tokenizer, prompt, level, index, max_new_tokens, temperature, top_k, top_p, seed):
    """What both generators share: checks, the prompt as positions, how many positions, and the chooser."""
    v = variant_of(cfg)
    level, index = cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokenizer = check_tokenizer(v, cfg, tokenizer)
    ids = v.prompt_ids(cfg, tokenizer, prompt, level)
    rng = onp.random.default_rng(seed)
    choose = lambda logits: v.choose(logits, lambda row: sample_token(row, rng, temperature, top_k, top_p))
    return v, tokenizer, level, index, ids, v.new_positions(cfg, level, max_new_tokens), choose


def generate_reference(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200,
                       temperature=1.0, top_k=None, top_p=None, seed=0, on_logits=None):
    """Sample from model (level, index) by recomputing the whole window for every new position.

    The window is the last `context` positions, so a long prompt or a long generation slides instead of
    failing. Returns the prompt followed by the new text.
    """
    v, tokenizer, level, index, ids, n, choose = _setup(params, cfg, tokenizer, prompt, level, index, max_new_tokens,
                                                        temperature, top_k, top_p, seed)
    new = []
    for _ in range(n):
        start = max(0, len(ids) - cfg.context)
        logits = v.forward_node(params, cfg, level, index, onp.asarray(ids[start:])[None])[0, -1]
        if on_logits:
            on_logits(start, logits)
        item = choose(logits)
        ids.append(item)
        new.append(item)
    return prompt + v.text_of(tokenizer, new, max_new_tokens)


def generate(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200,
             temperature=1.0, top_k=None, top_p=None, seed=0, keep=None):
    """Sample from model (level, index) with a KV cache: the prompt once, then one position per step.

    The same text as `generate_reference` for the same seed. When the window of `context` positions is
    full it slides, recomputing the cache from the last `keep` positions (default: context, exactly the
    reference's window). Returns the prompt followed by the new text (max_new_tokens tokens, or bytes).
    """
    keep = decoder.check_keep(keep, cfg.context)
    v, tokenizer, level, index, ids, n, choose = _setup(params, cfg, tokenizer, prompt, level, index, max_new_tokens,
                                                        temperature, top_k, top_p, seed)
    new = decoder.decode(decoder.node_decoder(params, cfg, level, index), ids, n, choose, keep)
    return prompt + v.text_of(tokenizer, new, max_new_tokens)
