"""Training with the JAX engine: the NumPy engine's loop, progress line, evaluation and checkpoints.

Only the step differs: one jitted function (optim.py) does the forward, `jax.grad`, clipping and AdamW
on arrays that live on the devices of the mesh (mesh.py). Everything around it is the NumPy engine's
own code: batches (`data.batch_at`, seeded per step), `evaluate`, `record_eval`, `loss_table`, and
`save_run`, so a checkpoint written here is the same .npz + JSON a NumPy run writes, and the reverse.
"""
import time

import jax
import numpy as onp

from tinyfractal.core.tree import flatten, unflatten
from tinyfractal.jax_engine import check_variant
from tinyfractal.jax_engine.mesh import Layout, host, is_main
from tinyfractal.jax_engine.model import node_losses
from tinyfractal.jax_engine.optim import adamw_init, hyper, make_train_step
from tinyfractal.training.data import batch_at
from tinyfractal.training.train import progress_line, record_eval


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


def host_state(m, v, t):
    return {"m": {k: host(a) for k, a in m.items()}, "v": {k: host(a) for k, a in v.items()}, "t": t}


def train(params, cfg, tc, train_tokens, val_tokens, state=None, metrics=None, level_weights=None,
          trainable=None, layout=None, log=print, on_eval=None):
    """Train up to step tc.steps (from state['t'] if resuming): the NumPy `train`, stepped by JAX.

    params and state are host (NumPy) values, as the NumPy engine keeps them; returns
    (params, state, metrics) as host values. `on_eval(step, metrics, params, state)` runs after every
    evaluation (fit saves a checkpoint there).
    """
    check_variant(cfg)
    layout = layout or Layout()
    layout.check_batch(tc.batch_size)
    state = state or adamw_init(flatten(params))
    metrics = metrics or {"step": [], "loss": [], "eval_step": [], "train": {}, "val": {}}
    flat, m, v = to_device(params, layout), layout.put_tree(state["m"]), layout.put_tree(state["v"])
    masks = {k: layout.put(onp.asarray(mask, dtype=bool), layout.replicated) for k, mask in (trainable or {}).items()}
    rows = lambda a: layout.put(a, layout.batch)
    level_losses = make_level_losses(cfg, layout)
    start, t = state["t"], state["t"]
    if start >= tc.steps:
        return to_host(flat), host_state(m, v, t), metrics

    ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, start)
    c0 = time.perf_counter()
    step_fn = make_train_step(cfg, tc, level_weights, layout).lower(
        flat, m, v, rows(ids), rows(targets), layout.put_tree(hyper(tc, start, t + 1)), masks).compile()
    log(f"compiled the training step in {time.perf_counter() - c0:.1f} s ({layout.describe()})")

    tokens_per_step = tc.batch_size * cfg.context
    t0, done = time.perf_counter(), 0
    for step in range(start, tc.steps):
        ids, targets = batch_at(train_tokens, tc.batch_size, cfg.context, tc.seed, step)
        t += 1
        flat, m, v, loss, gnorm = step_fn(flat, m, v, rows(ids), rows(targets),
                                          layout.put_tree(hyper(tc, step, t)), masks)
        loss, done = float(host(loss)), done + 1
        metrics["step"].append(step + 1)
        metrics["loss"].append(loss)
        last = step + 1 == tc.steps
        if (step + 1) % tc.log_interval == 0 or last or step == start:
            elapsed = time.perf_counter() - t0
            log(progress_line(step + 1, tc.steps, loss, float(host(gnorm)), done * tokens_per_step / elapsed,
                              (tc.steps - step - 1) * elapsed / done))
        if (step + 1) % tc.eval_interval == 0 or last:
            record_eval(flat, cfg, tc, train_tokens, val_tokens, metrics, step + 1, level_losses)
            if on_eval:
                on_eval(step + 1, metrics, to_host(flat), host_state(m, v, t))
    return to_host(flat), host_state(m, v, t), metrics


def fit(cfg, tc, out=None, resume=False, log=print, level_weights=None, model_axis=1):
    """The whole job with the JAX engine: data, init (or resume from `out`), train, save.

    Returns (params, state, metrics, (train_tokens, val_tokens)) as host values, like the NumPy `fit`.
    Only process 0 logs and writes.
    """
    from tinyfractal.core.model import init_params
    from tinyfractal.training.checkpoint import load, load_optimizer
    from tinyfractal.training.data import load_tokens, train_val_split
    from tinyfractal.training.train import save_run
    variant = check_variant(cfg)
    layout = Layout(model_axis)
    layout.check_batch(tc.batch_size)
    log = log if is_main() else (lambda *a, **k: None)
    tokenizer = variant.tokenizer(cfg)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the config's vocab_size is {cfg.vocab_size}")
    train_tokens, val_tokens = (variant.training_rows(cfg, part) for part in train_val_split(load_tokens(tokenizer)))
    if resume:
        params, saved_cfg, meta = load(out)
        if saved_cfg != cfg:
            raise ValueError(f"cannot resume: the checkpoint's config {saved_cfg} differs from {cfg}")
        state = load_optimizer(out)
        if state is None:
            raise ValueError(f"cannot resume from {out}: it was saved without optimizer state")
        metrics = meta.get("metrics")
        log(f"resuming from {out} at step {state['t']}")
    else:
        params, state, metrics = init_params(cfg, tc.seed), None, None

    def checkpoint(step, metrics, params, state):
        """Save at every evaluation, so an interrupted run can be resumed from the last one."""
        if out is not None and is_main():
            save_run(out, params, cfg, tc, state, metrics, extra={"backend": "jax"})
    params, state, metrics = train(params, cfg, tc, train_tokens, val_tokens, state, metrics, level_weights,
                                   layout=layout, log=log, on_eval=checkpoint)
    return params, state, metrics, (train_tokens, val_tokens)
