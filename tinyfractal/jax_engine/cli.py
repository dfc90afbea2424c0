"""What `python -m tinyfractal train|eval|sample --backend jax` run: called by tinyfractal/cli.py."""
from tinyfractal.jax_engine import check_variant, require


def start(distributed=False):
    """Check that jax is installed and, with --distributed, join the multi-process run first."""
    require("--backend jax")
    if distributed:
        from tinyfractal.jax_engine.mesh import initialize
        initialize()


def fitter(cfg, model_axis=1, distributed=False):
    """The `fit` that `train --backend jax` calls: the JAX engine's, on a mesh with this model axis.

    Only process 0 of a distributed run logs; the others return data None (nothing to report there).
    """
    start(distributed)
    check_variant(cfg)
    from tinyfractal.jax_engine.mesh import is_main
    from tinyfractal.jax_engine.train import fit

    def fit_jax(cfg, tc, log=print, **kwargs):
        return fit(cfg, tc, log=log if is_main() else (lambda *a, **k: None), model_axis=model_axis, **kwargs)
    return fit_jax


def level_losses(cfg):
    """`evaluate`'s level_losses on one device, and the function putting host params where it wants them."""
    start()
    check_variant(cfg, "evaluating with the JAX engine")
    import jax
    from tinyfractal.jax_engine.mesh import Layout
    from tinyfractal.jax_engine.train import make_level_losses, to_device
    layout = Layout(devices=jax.devices()[:1])     # one device: any batch size
    return make_level_losses(cfg, layout), lambda params: to_device(params, layout)


def generate(*args, **kwargs):
    start()
    from tinyfractal.jax_engine.sample import generate
    return generate(*args, **kwargs)
