"""Sampling from any node with the JAX engine: the window is recomputed for every new token.

The semantics are `inference.sample.generate_reference`'s: the window is the last `context` tokens, and
the next token is drawn by the NumPy sampler (`sample_token`: temperature, top-k, top-p) from the same
seeded generator, so for the same checkpoint and seed both engines write the same text (up to float
rounding deciding a near tie). The window is padded to `context` tokens, so one compiled forward
serves every step: causal attention keeps the padding from reaching the position we read.
"""
import jax
import jax.numpy as jnp
import numpy as onp

from tinyfractal.core.tree import view
from tinyfractal.inference.sample import check_sampling, check_tokenizer, sample_token
from tinyfractal.jax_engine import check_variant
from tinyfractal.jax_engine.model import forward_stacked


def generate(params, cfg, tokenizer, prompt, level=0, index=0, max_new_tokens=200, temperature=1.0,
             top_k=None, top_p=None, seed=0):
    """Sample max_new_tokens tokens from model (level, index); returns the prompt followed by the new text."""
    v = check_variant(cfg, "sampling with the JAX engine")
    level, index = cfg.check_node(level, index)
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokenizer = check_tokenizer(v, cfg, tokenizer)
    ids = v.prompt_ids(cfg, tokenizer, prompt, level)
    sub, T = cfg.sub(level), cfg.context
    node = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], view(params, cfg, level, index))  # N = 1
    last_logits = jax.jit(lambda p, window, at: forward_stacked(p, sub, window)[0, 0, at])          # (V,)
    rng = onp.random.default_rng(seed)
    new = []
    for _ in range(max_new_tokens):
        window = ids[-T:]
        padded = onp.zeros((1, T), dtype=onp.int32)
        padded[0, :len(window)] = window
        token = sample_token(onp.asarray(last_logits(node, padded, len(window) - 1)), rng, temperature, top_k, top_p)
        ids.append(token)
        new.append(token)
    return prompt + v.text_of(tokenizer, new, max_new_tokens)
