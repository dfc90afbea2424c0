"""The "all experts at once" ensemble: every model of a level answers, and their answers are pooled.

A mixture of experts picks a few experts per token with a gate. A FractalFormer level already holds
N = split**level experts side by side in the same arrays, so all of them can run at once, in one
level-batched pass (`fast.forward_level`), and be combined with no gate and no new parameters:

  how="logprob" (default): the mean of the experts' log-probabilities, renormalised:
      log p(v) = mean_j log p_j(v) - log sum_u exp(mean_j log p_j(u))
    a normalised geometric mean (a product of experts with weights 1/N). A token gets mass only if
    every expert gives it some.
  how="prob": the mean of the experts' probabilities, log p(v) = log (1/N) sum_j p_j(v):
    a uniform mixture. A token gets mass if any expert likes it.

Both return (B,T,V) log-probabilities, which `cross_entropy` accepts as logits.
"""
import numpy as onp
import autograd.numpy as np

from tinyfractal.api import forward_level, forward_node
from tinyfractal.core import formulas
from tinyfractal.training.data import batch_at
from tinyfractal.training.train import evaluate
from tinyfractal.variants import variant_of

HOWS = ("logprob", "prob")


log_softmax = formulas.log_softmax


def combine(logits, how="logprob"):
    """Pool N experts' logits (N,B,T,V) into one model's log-probabilities (B,T,V)."""
    if how not in HOWS:
        raise ValueError(f"ensemble how={how!r} is not one of {HOWS}")
    logp = log_softmax(logits)
    if how == "logprob":
        return log_softmax(np.mean(logp, axis=0))
    m = np.max(logp, axis=0, keepdims=True)
    return np.log(np.mean(np.exp(logp - m), axis=0)) + m[0]


def ensemble_logits(params, cfg, ids, level, how="logprob"):
    """Log-probabilities of all split**level models of a level pooled, from one batched pass. (B,T) -> (B,T,V).

    Works for every variant that supports ensembles: coupled levels run with the nodes they need, and
    byte models pool each slot's distribution ((B,T,g) groups -> (B,T,g,V)).
    """
    variant_of(cfg).require("ensemble", "an ensemble of a level")
    return combine(forward_level(params, cfg, level, ids), how)


def ensemble_logits_reference(params, cfg, ids, level, how="logprob"):
    """The same, model by model with the reference forward: the readable definition."""
    variant_of(cfg).require("ensemble", "an ensemble of a level")
    level = cfg.check_level(level)
    return combine(np.stack([forward_node(params, cfg, level, j, ids) for j in range(cfg.n_models(level))]), how)


def ensemble_losses(params, cfg, tokens, batch_size=16, batches=8, seed=1234, how="logprob"):
    """Val losses on the same fixed batches as `train.evaluate`: every node, every level's ensemble, and
    every family's ensemble (the children of one parent pooled, to set next to that parent).

    Returns (nodes {(l, j): loss}, levels {(l, how): loss} for both hows, families {(l, j): loss} where
    (l, j) is the parent whose children were pooled with `how`).
    """
    v = variant_of(cfg)
    v.require("ensemble", "an ensemble of a level")
    nodes = evaluate(params, cfg, tokens, batch_size, batches, seed)
    levels = {(level, h): 0.0 for level in range(1, cfg.levels) for h in HOWS}
    families = {(level, j): 0.0 for level in range(cfg.levels - 1) for j in range(cfg.n_models(level))}
    s = cfg.split
    for b in range(batches):
        ids, targets = batch_at(tokens, batch_size, cfg.context, seed, b)
        for level in range(1, cfg.levels):
            inputs, wanted = v.level_batch(cfg, level, ids, targets)
            logits = forward_level(params, cfg, level, inputs)                      # (N,B,T,V)
            for h in HOWS:
                levels[(level, h)] += float(formulas.cross_entropy(combine(logits, h), wanted)) / batches
            for j in range(cfg.n_models(level - 1)):
                family = combine(logits[s * j:s * (j + 1)], how)
                families[(level - 1, j)] += float(formulas.cross_entropy(family, wanted)) / batches
    return nodes, levels, families


def ensemble_table(cfg, nodes, levels, families, how="logprob"):
    """Lines of text: each level's members, their mean and best, its two ensembles, and the root; then
    each parent next to the ensemble of its own children."""
    root = nodes[(0, 0)]
    lines = [f"{'level':>5} {'members (val loss)':<36} {'mean':>6} {'best':>6} {'ens:logprob':>11} "
             f"{'ens:prob':>8} {'root':>6}"]
    for level in range(1, cfg.levels):
        members = [nodes[(level, j)] for j in range(cfg.n_models(level))]
        lines.append(f"{level:>5} {' '.join(f'{v:.3f}' for v in members):<36} {onp.mean(members):6.3f} "
                     f"{min(members):6.3f} {levels[(level, 'logprob')]:11.3f} {levels[(level, 'prob')]:8.3f} "
                     f"{root:6.3f}")
    lines.append("")
    lines.append(f"{'parent':>7} {'parent loss':>11} {'children':<24} {'children ens:' + how:>21}")
    for (level, j), pooled in sorted(families.items()):
        kids = [nodes[(level + 1, cfg.split * j + r)] for r in range(cfg.split)]
        lines.append(f"{f'({level},{j})':>7} {nodes[(level, j)]:11.3f} {' '.join(f'{v:.3f}' for v in kids):<24} "
                     f"{pooled:21.3f}")
    return lines
