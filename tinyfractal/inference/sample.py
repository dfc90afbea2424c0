"""Sampling text from any node of the tree: temperature, top-k and top-p, all of which really act.

`generate` decodes with a KV cache (`infer.py`); `generate_reference` recomputes the whole window for
every token, the readable definition the cached path is tested against.
"""
import numpy as onp

from tinyfractal.inference import decoder as infer
from tinyfractal.core.model import forward
from tinyfractal.core.tree import view


def check_sampling(temperature, top_k, top_p, max_new_tokens=0):
    """Raise ValueError for sampling settings outside their ranges."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
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


def prompt_ids(tokenizer, prompt):
    """Token ids of a prompt; an empty prompt starts from a newline."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return list(tokenizer.encode(prompt if prompt else "\n"))


def generate_reference(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200,
                       temperature=1.0, top_k=None, top_p=None, seed=0):
    """Sample from model (level, index) by recomputing the whole window for every token.

    The window is the last `context` tokens, so a long prompt or a long generation slides instead of
    failing. Returns the prompt followed by the new text.
    """
    cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if cfg.coupling != "none":   # a coupled node runs its subtree or its ancestors: coupling.py
        from tinyfractal.variants.coupled import generate_reference as coupled
        return coupled(params, cfg, tokenizer, prompt, level, index, max_new_tokens, temperature, top_k, top_p, seed)
    if cfg.tokenizer == "bytes":   # byte models sample whole groups of bytes, slot by slot: concepts.py
        from tinyfractal.variants.byte_model import generate as generate_bytes
        return generate_bytes(params, cfg, prompt, level, index, max_new_tokens, temperature, top_k, top_p, seed)
    p, sub = view(params, cfg, level, index), cfg.sub(level)
    ids = prompt_ids(tokenizer, prompt)
    rng = onp.random.default_rng(seed)
    new = []
    for _ in range(max_new_tokens):
        window = onp.asarray(ids[-cfg.context:])[None, :]
        logits = forward(p, sub, window)[0, -1]
        token = sample_token(logits, rng, temperature, top_k, top_p)
        ids.append(token)
        new.append(token)
    return prompt + tokenizer.decode(new)


def generate(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200,
             temperature=1.0, top_k=None, top_p=None, seed=0, keep=None):
    """Sample from model (level, index) with a KV cache: the prompt once, then one token per step.

    Same tokens as `generate_reference` for the same seed. When the window of `context` tokens is
    full it slides, recomputing the cache from the last `keep` tokens (default: context, which is
    exactly the reference's window). Returns the prompt followed by the new text.
    """
    cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    keep = infer.check_keep(keep, cfg.context)
    if cfg.coupling != "none":   # a coupled node runs its subtree or its ancestors: coupling.py
        from tinyfractal.variants.coupled import generate as coupled
        return coupled(params, cfg, tokenizer, prompt, level, index, max_new_tokens, temperature, top_k, top_p, seed, keep)
    if cfg.tokenizer == "bytes":   # byte models sample whole groups of bytes, slot by slot: concepts.py
        from tinyfractal.variants.byte_model import generate as generate_bytes
        return generate_bytes(params, cfg, prompt, level, index, max_new_tokens, temperature, top_k, top_p, seed)
    ids = prompt_ids(tokenizer, prompt)
    rng = onp.random.default_rng(seed)
    new = infer.decode(infer.node_models(params, cfg, level, index), ids, max_new_tokens,
                       lambda logits: sample_token(logits, rng, temperature, top_k, top_p), keep)
    return prompt + tokenizer.decode(new)
