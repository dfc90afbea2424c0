"""The "all experts at once" ensemble: one batched pass equals the model-by-model definition, and
the pooled model obeys the laws of its two combination rules."""
import numpy as onp
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from tinyfractal import Config, ensemble_logits, forward, init_params, view
from tinyfractal.training.data import batch_at
from tinyfractal.inference.ensemble import HOWS, combine, ensemble_logits_reference, ensemble_losses, ensemble_table
from tinyfractal.core.model import cross_entropy

CFG = Config.preset("tiny").override(context=12, hidden=48, head_dim=8)
PARAMS = init_params(CFG, 0)
IDS = onp.random.default_rng(0).integers(0, 128, (2, 12))


def logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m + onp.log(onp.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_batched_ensemble_equals_model_by_model(level, how):
    """ensemble_logits (one level-batched pass) equals pooling the reference forward of each model."""
    onp.testing.assert_allclose(ensemble_logits(PARAMS, CFG, IDS, level, how),
                                ensemble_logits_reference(PARAMS, CFG, IDS, level, how), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", HOWS)
def test_ensemble_is_a_distribution(how):
    """Every row of the ensemble's log-probabilities sums to one in probability."""
    onp.testing.assert_allclose(logsumexp(ensemble_logits(PARAMS, CFG, IDS, 2, how)), 0.0, atol=1e-4)


def test_level_zero_ensemble_is_the_whole_model():
    """A level of one expert pools to that expert: log_softmax of the root's logits."""
    root = forward(PARAMS, CFG, IDS)
    want = root - logsumexp(root)[..., None]
    onp.testing.assert_allclose(ensemble_logits(PARAMS, CFG, IDS, 0), want, rtol=1e-4, atol=1e-4)


def test_logprob_ensemble_is_the_mean_of_member_log_probs_up_to_a_constant():
    """The default rule: log p_ens(v) - mean_j log p_j(v) is the same for every token v (the renormaliser)."""
    members = [forward(view(PARAMS, CFG, 1, j), CFG.sub(1), IDS) for j in range(2)]
    mean = onp.mean([m - logsumexp(m)[..., None] for m in members], axis=0)
    gap = ensemble_logits(PARAMS, CFG, IDS, 1) - mean
    onp.testing.assert_allclose(gap, gap[..., :1] + onp.zeros_like(gap), atol=1e-4)


logit_stacks = arrays(onp.float64, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6)),
                      elements=st.floats(-20, 20))


@given(logit_stacks, st.sampled_from(HOWS), st.data())
def test_ensemble_loss_is_at_most_the_mean_member_loss(logits, how, data):
    """Law (Jensen / AM-GM): for any experts and targets, the pooled model's cross-entropy is at most the
    mean of the experts' cross-entropies, for both the mixture and the normalised geometric mean."""
    N, T, V = logits.shape
    targets = onp.asarray(data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T)))
    pooled = float(cross_entropy(combine(logits[:, None], how)[0], targets))
    mean = onp.mean([float(cross_entropy(logits[j], targets)) for j in range(N)])
    assert pooled <= mean + 1e-9


@given(arrays(onp.float64, st.tuples(st.integers(1, 3), st.integers(2, 6)), elements=st.floats(-20, 20)),
       st.integers(1, 4), st.sampled_from(HOWS))
def test_identical_experts_pool_to_themselves(logits, copies, how):
    """N copies of one expert pool to that expert's own log-probabilities."""
    stacked = onp.repeat(logits[None, None], copies, axis=0)
    onp.testing.assert_allclose(combine(stacked, how)[0], logits - logsumexp(logits)[..., None], atol=1e-9)


def test_ensemble_losses_table_reports_every_node_and_pool():
    """ensemble_losses gives each node's loss (as evaluate), each level's pooled loss computed on the same
    batches, and each parent's children pooled; the table prints every level and every parent."""
    tokens = onp.random.default_rng(1).integers(0, 128, 400).astype(onp.int32)
    nodes, levels, families = ensemble_losses(PARAMS, CFG, tokens, batch_size=3, batches=2)
    ids, targets = batch_at(tokens, 3, CFG.context, 1234, 0)
    ids2, targets2 = batch_at(tokens, 3, CFG.context, 1234, 1)
    want = 0.5 * (float(cross_entropy(ensemble_logits(PARAMS, CFG, ids, 2, "prob"), targets))
                  + float(cross_entropy(ensemble_logits(PARAMS, CFG, ids2, 2, "prob"), targets2)))
    assert levels[(2, "prob")] == pytest.approx(want, rel=1e-5)
    assert set(families) == {(0, 0), (1, 0), (1, 1)}
    lines = ensemble_table(CFG, nodes, levels, families)
    assert len(lines) == 1 + (CFG.levels - 1) + 2 + 3


def test_bad_inputs_are_clear_errors():
    """An unknown rule, a level out of range, or a coupled model: ValueError naming the problem."""
    with pytest.raises(ValueError, match="how"):
        ensemble_logits(PARAMS, CFG, IDS, 1, how="max")
    with pytest.raises(ValueError, match="level"):
        ensemble_logits(PARAMS, CFG, IDS, 3)
    with pytest.raises(ValueError, match="coupling"):
        ensemble_logits(PARAMS, CFG.override(coupling="upstream"), IDS, 1)
