"""The JAX engine: the same FractalFormer, compiled with `jax.jit`, sharded over devices and hosts.

The NumPy + autograd engine is the classroom engine. This one is for accelerators and scale: it runs
the level-batched forward of `core/fast.py` with the formulas of `core/formulas.py` called with
`xp=jax.numpy` (nothing is re-typed), takes gradients with `jax.grad`, and applies AdamW with the rules
of `training/train.py`. Checkpoints are the NumPy engine's own format, so a run can move between them.

  blocks.py   the diagonal blocks of a level, stacked (the JAX twin of `tree.level_view`)
  model.py    the level-batched forward, per-node losses and the tree loss
  optim.py    AdamW, global-norm clipping and frozen entries, as one jitted training step
  mesh.py     the device mesh: data parallel, models of a level over a "model" axis, many hosts
  train.py    `fit`: the training loop, evaluation, checkpoints and resume
  sample.py   `generate` from any node
  bench.py    the JAX side of `python -m tinyfractal.bench --backend numpy,jax`
  cli.py      what `python -m tinyfractal train|eval|sample --backend jax` call

Importing this package does not import jax, so `--backend jax` without jax installed can say how to
install it. On a CPU the fused NumPy engine is faster; JAX pays off on a GPU, a TPU or many hosts.
"""
INSTALL = "pip install 'tinyfractal[jax]' (or: pip install jax)"


def available():
    """True if jax can be imported here (this imports it: call it only when about to use it)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def require(what="the JAX backend"):
    """Raise a one-line ValueError saying how to install jax, unless it is installed."""
    if not available():
        raise ValueError(f"{what} needs jax, which is not installed; install it with: {INSTALL}")


def check_variant(cfg, what="the JAX engine"):
    """The JAX engine runs the base variant, with every output option (logit_scale none, sqrt or learned;
    node_gains); any other variant raises a ValueError that names it."""
    from tinyfractal.variants import unsupported, variant_of
    v = variant_of(cfg)
    if v.name != "base":
        raise unsupported(v, what, "it runs the base variant only so far; use --backend numpy")
    return v

