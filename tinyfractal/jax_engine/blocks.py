"""All models of one level at once, as JAX arrays: the twin of `tree.level_view`.

NumPy stacks a level's diagonal blocks with one extra stride (`as_strided`), a view. JAX arrays have
no strides to play with, so here the same stack is built by reshaping and taking a diagonal:

  split every block axis X into (n, X/n)        the n-th block of X is row n of the new axis
  move those n axes to the front                 (n, n, ..., rest): block (i, j, ...) of the array
  index them all with one arange                 keeps the blocks with i = j = ...: the diagonal

The result is a copy inside the compiled program (XLA fuses it into the ops that read it), and its
gradient is the matching scatter into zeros, so a model's gradient lands on its own blocks only.
tests/test_jax.py proves `level_view` here equals `tree.level_view` array by array.
"""
import jax.numpy as jnp

from tinyfractal.core.tree import BLOCK_ROLES, LEVEL_ROLES, level_rows, map_roles


def stacked_blocks(a, roles, n):
    """(.., X, ..) -> (n, .., X/n, ..): the n diagonal blocks of `a` along its block-role axes."""
    axes = [i for i, r in enumerate(roles) if r in BLOCK_ROLES]
    if not axes:                                  # shared whole by every model (no block axis)
        return jnp.broadcast_to(a, (n,) + a.shape)
    shape = []
    for size, r in zip(a.shape, roles):
        shape += [n, size // n] if r in BLOCK_ROLES else [size]
    split = jnp.reshape(a, shape)                 # axis i of a -> axes (i + k, i + k + 1), k block axes before it
    front = jnp.moveaxis(split, [i + k for k, i in enumerate(axes)], list(range(len(axes))))
    j = jnp.arange(n)
    return front[(j,) * len(axes)]                # (n, ..., X/n, ...)


def level_view(params, cfg, level):
    """Every array of `params` as the stack (N, ...) of its N = split**level diagonal blocks."""
    cfg.check_level(level)
    n = cfg.n_models(level)

    def stack(a, roles):
        if any(r in LEVEL_ROLES for r in roles):   # every model of the level shares these rows
            a = a[tuple(level_rows(cfg, level, r) if r in LEVEL_ROLES else slice(None) for r in roles)]
        return stacked_blocks(a, roles, n)
    return map_roles(stack, params)
