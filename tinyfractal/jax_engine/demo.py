"""The placement of a FractalFormer on a device mesh, as JSON: `python -m tinyfractal.jax_engine.demo`.

Lesson 8 (lessons/cluster.py) starts this in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=4, so a laptop shows what four devices would hold: the
tree loss on one device, on a data x model mesh of 4 x 1 and of 2 x 2, and which batch rows and which
models of level 2 land on each device.
"""
import json
import sys

import numpy as np

from tinyfractal.config import Config


def main():
    """Runs in a child process that pretends to have 4 devices: the tree loss on three meshes, as JSON."""
    import jax
    from tinyfractal.core.tree import unflatten
    from tinyfractal.jax_engine.mesh import Layout, host
    from tinyfractal.jax_engine.model import forward_level, tree_loss
    from tinyfractal.jax_engine.train import to_device
    from tinyfractal.training.data import batch_at
    from tinyfractal.api import init_params
    cfg = Config.preset("micro").override(levels=3, hidden=32)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2000).astype(np.int32)
    ids, targets = batch_at(tokens, 4, cfg.context, 0, 0)
    out = {"devices": [str(d) for d in jax.devices()], "runs": {}}
    for name, layout in (("1 device", Layout(devices=jax.devices()[:1])), ("data 4 x model 1", Layout()),
                         ("data 2 x model 2", Layout(model_axis=2))):
        rows = lambda a: layout.put(a, layout.batch)
        both = jax.jit(lambda p, i, t: (tree_loss(unflatten(p), cfg, i, t, layout=layout),
                                        forward_level(unflatten(p), cfg, 2, i, layout=layout)))
        loss, logits = both(to_device(init_params(cfg, 0), layout), rows(ids), rows(targets))   # logits (4,B,T,V)
        span = lambda sl, n: [sl.start or 0, n if sl.stop is None else sl.stop]
        out["runs"][name] = {
            "describe": layout.describe(), "loss": float(host(loss)),
            "ids": {str(s.device): span(s.index[0], 4) for s in rows(ids).addressable_shards},
            "level2": {str(s.device): [span(sl, n) for sl, n in zip(s.index[:2], logits.shape[:2])]
                       for s in logits.addressable_shards}}
    print(json.dumps(out))
    return 0




if __name__ == "__main__":
    sys.exit(main())
