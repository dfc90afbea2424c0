"""Runs in a child process for tests/test_jax.py, where the device count can still be chosen.

`python tests/jax_worker.py sharded` trains the same tree for 3 steps on one device, data parallel
over every device, and with the models of each level over a 2-device "model" axis; it prints each run's
losses and final parameters' digest as JSON. Start it with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""
import json
import sys

import numpy as np


def sharded():
    import jax
    import tinyfractal as tf
    from tinyfractal.core.tree import flatten
    from tinyfractal.jax_engine.mesh import Layout
    from tinyfractal.jax_engine.train import train
    from tinyfractal.training.train import TrainConfig
    cfg = tf.Config(vocab_size=16, context=8, layers=1, heads=2, kv_heads=1, head_dim=8, hidden=8, mlp_mult=2,
                    levels=3, split=2)
    tc = TrainConfig(steps=3, batch_size=4, eval_interval=3, eval_batches=1, log_interval=1, warmup=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 400).astype(np.int32)
    layouts = {"single": Layout(devices=jax.devices()[:1]), "data": Layout(), "data+model": Layout(model_axis=2)}
    out = {"devices": len(jax.devices())}
    for name, layout in layouts.items():
        params, _, metrics = train(tf.init_params(cfg, 0), cfg, tc, tokens, tokens, layout=layout, log=lambda *a: None)
        out[name] = {"loss": metrics["loss"], "describe": layout.describe(),
                     "params": {k: v.tolist() for k, v in flatten(params).items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    {"sharded": sharded}[sys.argv[1]]()
