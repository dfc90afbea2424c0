"""Runs in a child process for tests/test_jax.py, where the device count can still be chosen.

`python tests/jax_worker.py sharded` runs 3 training steps of the same tree on one device, data
parallel over every device, and with the models of each level over a 2-device "model" axis; it prints
each run's losses and final parameters as JSON. Start it with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""
import json
import sys

import numpy as np


def sharded():
    import jax
    import tinyfractal as tf
    from tinyfractal.core.tree import flatten
    from tinyfractal.jax_engine.mesh import Layout, host
    from tinyfractal.jax_engine.optim import adamw_init, hyper, make_train_step
    from tinyfractal.training.data import batch_at
    from tinyfractal.training.train import TrainConfig, width_lr_scales
    cfg = tf.Config(vocab_size=16, context=8, layers=1, heads=2, kv_heads=1, head_dim=8, hidden=8, mlp_mult=2,
                    levels=3, split=2, logit_scale="learned", node_gains=True)   # the per-node gain tables too
    tc = TrainConfig(steps=3, batch_size=4, warmup=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 400).astype(np.int32)
    layouts = {"single": Layout(devices=jax.devices()[:1]), "data": Layout(), "data+model": Layout(model_axis=2)}
    out = {"devices": len(jax.devices())}
    for name, layout in layouts.items():
        flat = layout.put_tree(flatten(tf.init_params(cfg, 0)))
        state = adamw_init(flat)
        m, v = layout.put_tree(state["m"]), layout.put_tree(state["v"])
        lr_scales = width_lr_scales(tf.init_params(cfg, 0), cfg, tc.width_lr, tc.lr_width)
        step_fn, losses = make_train_step(cfg, tc, layout=layout, lr_scales=lr_scales), []
        for step in range(tc.steps):
            ids, targets = (layout.put(a, layout.batch) for a in batch_at(tokens, tc.batch_size, cfg.context, 0, step))
            flat, m, v, loss, _ = step_fn(flat, m, v, ids, targets, layout.put_tree(hyper(cfg, tc, step, step + 1)), {})
            losses.append(float(host(loss)))
        out[name] = {"loss": losses, "describe": layout.describe(),
                     "params": {k: host(a).tolist() for k, a in flat.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    {"sharded": sharded}[sys.argv[1]]()
