"""The corpus as token ids, a 90/10 train/val split, and reproducible random batches."""
import numpy as onp

from tinyfractal.paths import CORPUS


def load_tokens(tokenizer, path=CORPUS):
    """Encode the whole corpus once: (n_tokens,) int32."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return onp.asarray(tokenizer.encode_array(text), dtype=onp.int32)


def train_val_split(tokens, val_fraction=0.1):
    """The first 90% trains, the last 10% validates (contiguous, as the original)."""
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]


def batch_at(tokens, batch_size, context, seed, step):
    """Random windows for one step, the same for the same (seed, step): ids and targets (B,T).

    Seeding per step (not one running stream) is what lets a resumed run continue bit for bit.
    """
    if len(tokens) <= context + 1:
        raise ValueError(f"the text has {len(tokens)} tokens; need more than context+1 = {context + 1}")
    rng = onp.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    ids = onp.stack([tokens[s:s + context] for s in starts])
    targets = onp.stack([tokens[s + 1:s + context + 1] for s in starts])
    return ids, targets


def unigram_entropy(tokens, vocab_size):
    """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
    counts = onp.bincount(tokens, minlength=vocab_size).astype(onp.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * onp.log(p)).sum())
