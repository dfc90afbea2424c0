"""What `python -m tinyfractal train|eval|sample --backend jax` run: called by tinyfractal/cli.py."""
from tinyfractal.jax_engine import check_variant, require


def start(distributed=False):
    """Check that jax is installed and, with --distributed, join the multi-process run first."""
    require("--backend jax")
    if distributed:
        from tinyfractal.jax_engine.mesh import initialize
        initialize()


def train(cfg, tc, out, resume=False, level_weights=None, model_axis=1, distributed=False):
    """Train with the JAX engine; process 0 prints the table and writes the checkpoint and metrics.json."""
    start(distributed)
    check_variant(cfg)
    from tinyfractal.jax_engine.mesh import is_main
    from tinyfractal.jax_engine.train import fit
    from tinyfractal.training.train import loss_table
    say = print if is_main() else (lambda *a, **k: None)
    say(f"training {cfg}\nwith {tc}\non the JAX engine")
    _, _, metrics, _ = fit(cfg, tc, out=out, resume=resume, level_weights=level_weights, model_axis=model_axis)
    say("\n".join(loss_table(metrics, cfg)))
    say(f"saved checkpoint and metrics.json to {out}")
    return 0


def level_losses(cfg):
    """`evaluate`'s level_losses on one host's devices, and the params as that function wants them."""
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
