"""The JAX side of `python -m tinyfractal.bench --backend numpy,jax`: one training step, and a matmul peak.

`training_step` has the NumPy bench's interface (a function of (ids, targets) running one full step:
forward, `jax.grad`, clipping, AdamW), so the bench times both engines the same way, one step of each
in turn. The step is compiled ahead of time when it is built, so its compile time is measured apart
(`step.compile_seconds`) and no timed step includes it.

`measure_peak` times `jnp.matmul` on the model's own shapes on JAX's default device: on a CPU it says
what XLA gets from the cores NumPy uses; on a GPU or TPU it is the peak to hold the JAX step against.
"""
import time

import jax
import jax.numpy as jnp
import numpy as onp

from tinyfractal.api import init_params
from tinyfractal.core.tree import flatten
from tinyfractal.jax_engine import check_variant
from tinyfractal.jax_engine.mesh import Layout, host
from tinyfractal.jax_engine.optim import adamw_init, hyper, make_train_step
from tinyfractal.training.train import width_lr_scales


def layout_for(batch):
    """Data parallel over every local device when the batch splits evenly over them, else one device."""
    devices = jax.local_devices()
    return Layout(devices=devices if batch % len(devices) == 0 else devices[:1])


def training_step(cfg, tc, seed=0):
    """A function running one full JAX training step on its own fresh parameters (compiled already)."""
    check_variant(cfg, "the JAX bench")
    layout = layout_for(tc.batch_size)
    params = init_params(cfg, seed)
    flat = layout.put_tree(flatten(params))
    state = adamw_init(flat)
    arrays = {"flat": flat, "m": layout.put_tree(state["m"]), "v": layout.put_tree(state["v"]), "t": 0}
    rows = lambda a: layout.put(onp.asarray(a, dtype=onp.int32), layout.batch)
    example = rows(onp.zeros((tc.batch_size, cfg.context)))
    c0 = time.perf_counter()
    compiled = make_train_step(cfg, tc, layout=layout,
                               lr_scales=width_lr_scales(params, cfg, tc.width_lr, tc.lr_width)).lower(
        arrays["flat"], arrays["m"], arrays["v"], example, example, layout.put_tree(hyper(cfg, tc, 0, 1)), {}).compile()
    timings = {}

    def step(ids, targets):
        t0 = time.perf_counter()
        arrays["t"] += 1
        arrays["flat"], arrays["m"], arrays["v"], loss, _ = compiled(
            arrays["flat"], arrays["m"], arrays["v"], rows(ids), rows(targets),
            layout.put_tree(hyper(cfg, tc, arrays["t"] - 1, arrays["t"])), {})
        value = float(host(loss))                   # waits for the device: the step is done
        timings["forward+backward+optimizer"] = time.perf_counter() - t0
        return value
    step.timings = timings
    step.compile_seconds = time.perf_counter() - c0
    step.devices = layout.describe()
    return step


def measure_peak(shapes, budget=0.05):
    """Best float32 GFLOP/s of jnp.matmul over (batch, m, k, n) shapes on the default device: (GFLOP/s, shape, device)."""
    best = (0.0, None)
    matmul = jax.jit(jnp.matmul)
    for (Bm, m, k, n) in shapes:
        a = jnp.asarray(onp.random.default_rng(0).standard_normal((Bm, m, k), dtype=onp.float32))
        b = jnp.asarray(onp.random.default_rng(1).standard_normal((Bm, k, n), dtype=onp.float32))
        matmul(a, b).block_until_ready()
        reps, fastest, start = 0, float("inf"), time.perf_counter()
        while reps < 3 or time.perf_counter() - start < budget:
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            fastest = min(fastest, time.perf_counter() - t0)
            reps += 1
        if 2.0 * Bm * m * k * n / fastest / 1e9 > best[0]:
            best = (2.0 * Bm * m * k * n / fastest / 1e9, (Bm, m, k, n))
    return best + (str(jax.devices()[0]),)
