"""Training with the JAX engine: the NumPy engine's loop, progress line, evaluation and checkpoints.

Only the step differs: one jitted function (optim.py) does the forward, `jax.grad`, clipping and AdamW
on arrays that live on the devices of the mesh (mesh.py). Everything around it is the NumPy engine's
own code: batches (`data.batch_at`, seeded per step), `evaluate`, `record_eval`, the divergence guard,
and `fit` itself (run folder, lock, resume, step folders), which takes this `train` as its trainer.
So a checkpoint written here is the same .npz + JSON a NumPy run writes, and the reverse.
"""
import functools
import math
import time

import jax
import numpy as onp

from tinyfractal.core.tree import flatten, unflatten
from tinyfractal.jax_engine import check_variant
from tinyfractal.jax_engine.mesh import Layout, host, is_main
from tinyfractal.jax_engine.model import node_losses
from tinyfractal.jax_engine.optim import hyper, make_train_step
from tinyfractal.training.data import batch_at
from tinyfractal.training.train import (Diverged, adamw_init, divergence_cause, progress_line, record_eval,
                                        width_lr_scales)

_compiled_losses = {}


def make_level_losses(cfg, layout):
    """`evaluate`'s level_losses for the JAX engine: (device params, cfg, ids, targets) -> [(N,) arrays].

    One jitted function per config and mesh, kept, so evaluating again does not compile again.
    """
    check_variant(cfg, "evaluating with the JAX engine")
    key = (cfg, layout.key)
    if key not in _compiled_losses:
        _compiled_losses[key] = jax.jit(
            lambda flat, ids, targets: node_losses(unflatten(flat), cfg, ids, targets, layout=layout),
            in_shardings=(layout.replicated, layout.batch, layout.batch), out_shardings=layout.replicated)
    run = _compiled_losses[key]

    def level_losses(flat, _cfg, ids, targets):
        layout.check_batch(len(ids))
        return [host(x) for x in run(flat, layout.put(ids, layout.batch), layout.put(targets, layout.batch))]
    return level_losses


def to_device(params, layout):
    """Host params (nested dict) -> flat name -> replicated device array."""
    return layout.put_tree(flatten(params))


def to_host(flat):
    """Device flat dict -> host params (nested dict of float32 NumPy arrays)."""
    return unflatten({k: host(v) for k, v in flat.items()})


def _write_back(params, state, flat, m, v, t):
    """Copy the device's params and moments into the host arrays in place (the NumPy engine's contract:
    `train` updates `params` and `state` in place), so `fit`'s checkpoints see them."""
    for name, a in flatten(params).items():
        a[...] = host(flat[name])
    for name in m:
        state["m"][name][...] = host(m[name])
        state["v"][name][...] = host(v[name])
    state["t"] = t


def train(params, cfg, tc, train_tokens, val_tokens, state=None, metrics=None, level_weights=None,
          trainable=None, log=print, on_eval=None, until=None, on_interrupt=None, layout=None):
    """The NumPy `train` (training/train.py), stepped by JAX: same arguments, same contract.

    Trains up to step tc.steps (or `until`), continuing from state['t']; params and state are host
    (NumPy) values and are updated in place before every `on_eval(step, metrics, state)`, before
    `on_interrupt` and at the end. Returns (state, metrics). A non-finite loss or gradient norm raises
    Diverged with the step's update not applied. `layout` is the device mesh (default: every device).
    """
    check_variant(cfg)
    layout = layout or Layout()
    layout.check_batch(tc.batch_size)
    state = state or adamw_init(params)
    metrics = metrics or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
    start = t = state["t"]
    end = tc.steps if until is None else min(until, tc.steps)
    if start >= end:
        return state, metrics
    flat, m, v = to_device(params, layout), layout.put_tree(state["m"]), layout.put_tree(state["v"])
    masks = {k: layout.put(onp.asarray(mask, dtype=bool), layout.replicated) for k, mask in (trainable or {}).items()}
    rows = lambda a: layout.put(a, layout.batch)
    level_losses = make_level_losses(cfg, layout)

    ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, start)
    c0 = time.perf_counter()
    lr_scales = width_lr_scales(params, cfg, tc.width_lr, tc.lr_width)
    step_fn = make_train_step(cfg, tc, layout, lr_scales).lower(
        flat, m, v, rows(ids), rows(targets), layout.put_tree(hyper(cfg, tc, start, t + 1, level_weights)),
        masks).compile()
    level_losses(flat, cfg, ids, targets)          # compiles the evaluation now, not inside the first timed steps
    log(f"compiled the training step and the evaluation in {time.perf_counter() - c0:.1f} s ({layout.describe()})")

    tokens_per_step = tc.batch_size * cfg.context
    t0, done, consistent = time.perf_counter(), 0, True
    try:
        for step in range(start, end):
            ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, step)
            # the old buffers stay valid until the new ones replace them (nothing is donated), so an
            # interrupt or a divergence anywhere in here leaves (flat, m, v) at the last good step
            h = layout.put_tree(hyper(cfg, tc, step, t + 1, level_weights))
            out = step_fn(flat, m, v, rows(ids), rows(targets), h, masks)
            loss, gnorm = float(host(out[3])), float(host(out[4]))
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                _write_back(params, state, flat, m, v, t)
                raise Diverged(f"training diverged at step {step + 1}: loss {loss:.4g}, |g| {gnorm:.4g}; likely "
                               f"cause: {divergence_cause(tc, step + 1, start, loss, gnorm)}")
            consistent = False
            (flat, m, v), t, done = out[:3], t + 1, done + 1
            state["t"] = t
            metrics["step"].append(step + 1)
            metrics["loss"].append(loss)
            last = step + 1 == end
            if (step + 1) % tc.log_interval == 0 or last or step == start:
                elapsed = time.perf_counter() - t0
                log(progress_line(step + 1, tc.steps, loss, gnorm, done * tokens_per_step / elapsed,
                                  (tc.steps - step - 1) * elapsed / done))
            if (step + 1) % tc.eval_interval == 0 or last:
                record_eval(flat, cfg, tc, train_tokens, val_tokens, metrics, step + 1, level_losses)
                _write_back(params, state, flat, m, v, t)
                if on_eval:
                    on_eval(step + 1, metrics, state)
            consistent = True
    except KeyboardInterrupt:
        if consistent and on_interrupt is not None:
            _write_back(params, state, flat, m, v, t)
            on_interrupt(state["t"], metrics, state)
        raise
    _write_back(params, state, flat, m, v, t)
    return state, metrics


def fit(cfg, tc, out=None, resume=False, log=print, tokenizer=None, level_weights=None, overwrite=False,
        allow_changes=(), keep=2, model_axis=1):
    """The whole job with the JAX engine: the NumPy `fit` (run folder, lock, resume rules, checkpoints at
    every evaluation, divergence and Ctrl-C handling) with the JAX `train` as its trainer.

    In a multi-process run only process 0 runs `fit` (it alone locks and writes); every other process
    starts from the same place (the saved run with `resume`, else init_params) and steps along, so the
    collectives match; it returns (params, state, metrics, None): nothing to report there.
    """
    from tinyfractal.training.train import default_tokenizer, fit as numpy_fit
    check_variant(cfg)
    layout = Layout(model_axis)
    layout.check_batch(tc.batch_size)
    trainer = functools.partial(train, layout=layout)
    if is_main():
        return numpy_fit(cfg, tc, out, resume, log, tokenizer, level_weights, overwrite, allow_changes, keep,
                         trainer=trainer)
    from tinyfractal.api import init_params
    from tinyfractal.training import checkpoint
    from tinyfractal.training.data import load_tokens, train_val_split
    from tinyfractal.variants import variant_of
    tokenizer = tokenizer or default_tokenizer(cfg)
    if resume:
        params, _, meta, state, _ = checkpoint.load_run(out, tokenizer)
        metrics = meta.get("metrics")
    else:
        params, state, metrics = init_params(cfg, tc.seed), None, None
    data = [variant_of(cfg).training_rows(cfg, part) for part in train_val_split(load_tokens(tokenizer))]
    weights = None if level_weights is None else [float(w) for w in level_weights]
    state, metrics = trainer(params, cfg, tc, *data, state, metrics, weights, log=lambda *a, **k: None)
    return params, state, metrics, None
