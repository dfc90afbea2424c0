"""Self-speculative decoding: greedy output is the verifier's own, sampling keeps the verifier's law.

Expected values come from the plain paths (`infer.greedy_ids`, `model.forward`), never from the
speculative code. The chi-square tests have fixed seeds, and a test shows they reject a broken rule.
"""
import numpy as onp
import pytest
from hypothesis import given, settings, strategies as st

from tinyfractal import Config, Tokenizer, forward, init_params, speculative_generate, view
from tinyfractal.inference import decoder as infer
from tinyfractal.inference import speculative
from tinyfractal.inference.sample import filtered_probs
from tinyfractal.inference.speculative import accept_sampled, accept_sampled_multi, resolve_drafters, speculative_ids

CFG = Config.preset("tiny").override(context=16, hidden=48, head_dim=8)


def lively(cfg, seed=0):
    """Random parameters whose greedy output does not repeat one token forever (embedding gain 0.1)."""
    params = init_params(cfg, seed)
    params["emb_norm"][:] = -0.9
    return params


PARAMS = lively(CFG, 1)

# Upper 0.1% points of the chi-square distribution (standard tables), by degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
            9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697}

VERIFIER_DRAFTERS = [((0, 0), None), ((0, 0), 1), ((0, 0), 2), ((0, 0), [(2, 1)]), ((0, 0), [(1, 0), (2, 3)]),
                     ((1, 1), 2), ((1, 0), [(2, 1)])]


@given(st.lists(st.integers(0, 127), min_size=1, max_size=24), st.sampled_from(VERIFIER_DRAFTERS),
       st.integers(1, 6), st.sampled_from([None, 8, 1]))
def test_greedy_speculative_output_is_the_verifiers_greedy_output(prompt, pair, k, keep):
    """For any prompt, verifier, drafters, draft length and window rule, greedy speculative decoding
    returns exactly the tokens the verifier alone would choose greedily (with the same sliding window)."""
    verifier, drafters = pair
    want = infer.greedy_ids(PARAMS, CFG, prompt, 30, *verifier, keep=keep)
    got, stats = speculative_ids(PARAMS, CFG, prompt, 30, verifier, drafters, k, keep=keep)
    assert got == want
    assert stats.new_tokens == 30


def test_greedy_equality_runs_through_accepts_and_rejects():
    """The random prompts above do exercise both paths: some drafted tokens are kept, some refused,
    and the best-of-N choice sometimes picks a drafter other than the first."""
    accepted = drafted = 0
    chosen = set()
    rng = onp.random.default_rng(0)
    for _ in range(6):
        prompt = list(rng.integers(0, 128, 6))
        got, stats = speculative_ids(PARAMS, CFG, prompt, 30, (0, 0), 2, 3, keep=8)
        assert got == infer.greedy_ids(PARAMS, CFG, prompt, 30, keep=8)
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        chosen |= {node for node, n in stats.accepted_by.items() if n}
    assert 0 < accepted < drafted
    assert len(chosen) > 1


WIDE = CFG.override(context=64)


@settings(max_examples=10)
@given(st.lists(st.integers(0, 127), min_size=1, max_size=12), st.sampled_from([1, 2, [(1, 1), (2, 0)]]),
       st.integers(1, 5))
def test_each_drafter_proposes_its_own_greedy_continuation(prompt, drafters, k):
    """Law: after any history of accepted and refused drafts (and cache rollbacks), every drafter's
    draft is exactly what that sub-model alone would generate greedily from the text so far, and the
    round keeps the longest prefix, over all drafts, that the verifier would have written itself."""
    rounds = []
    new, _ = speculative_ids(PARAMS, WIDE, prompt, 30, (0, 0), drafters, k, on_round=rounds.append)
    text = list(prompt) + new
    assert rounds
    for r in rounds:
        known = text[:r["known"]]
        for draft, owners in zip(r["drafts"], r["owners"]):
            for level, j in owners:
                assert list(draft) == infer.greedy_ids(PARAMS, WIDE, known, len(draft), level, j)
        own = infer.greedy_ids(PARAMS, WIDE, known, r["drafts"].shape[1])
        longest = max(next((i for i, (a, b) in enumerate(zip(d, own)) if a != b), len(own)) for d in r["drafts"])
        assert r["accepted"] == longest


@given(st.lists(st.integers(0, 127), min_size=2, max_size=12), st.integers(1, 5))
def test_each_round_costs_the_verifier_one_pass(prompt, k):
    """Within one window, the verifier makes one pass for the prompt, then exactly one per round (a
    batched check of every draft) or per plain step: nothing is recomputed."""
    _, stats = speculative_ids(PARAMS, WIDE, prompt, 30, (0, 0), 2, k)
    assert stats.verifier_calls == 1 + stats.rounds + stats.plain_steps


def test_speculative_generate_text_matches_plain_greedy_text():
    """The text API: prompt + the verifier's own greedy continuation."""
    tok = Tokenizer.default()
    text, stats = speculative_generate(PARAMS, CFG, tok, "ROMEO:\n", drafters=2, k=3, max_new_tokens=25)
    from tinyfractal.inference.sample import generate
    assert text == generate(PARAMS, CFG, tok, "ROMEO:\n", max_new_tokens=25, temperature=0)
    assert 0 <= stats.acceptance_rate <= 1 and stats.verifier_calls_per_token <= 1


@settings(max_examples=10)
@given(st.lists(st.integers(0, 127), min_size=1, max_size=10), st.integers(1, 5), st.sampled_from([1, 2]))
def test_speculation_never_saves_verifier_flops(prompt, k, level):
    """Law: the verifier checks every kept token once plus the refused ones, so its matmul FLOPs are
    at least those of plain cached decoding, and the drafters only add more. (Within one window: a
    slide's prefill also multiplies the masked half of its attention square, which depends on how
    the window is split into calls.)"""
    cfg = CFG.override(context=32)
    plain = infer.node_decoder(PARAMS, cfg, 0, 0)
    ids = list(prompt)
    infer.decode(plain, ids, 20, lambda lg: int(onp.argmax(lg)))
    _, stats = speculative_ids(PARAMS, cfg, prompt, 20, (0, 0), level, k)
    assert stats.verifier_flops >= plain.flops
    assert stats.flops > plain.flops


def chi_square(counts, probs, min_expected=5.0):
    """Pearson's statistic over the cells expected >= min_expected, the rest pooled into one cell.
    Returns (statistic, degrees of freedom)."""
    counts, expected = onp.asarray(counts, float), onp.asarray(probs, float) * sum(counts)
    big = expected >= min_expected
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = onp.asarray(obs), onp.asarray(exp)
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def sampled_first_tokens(p, q, draws, rule, seed=0):
    """Counts of the first emitted token of one-token drafting: draft ~ q, then `rule` decides."""
    rng = onp.random.default_rng(seed)
    counts = onp.zeros(p.shape[1])
    for _ in range(draws):
        d = int(rng.choice(q.shape[1], p=q[0]))
        a, t = rule(p, q, onp.asarray([d]), rng)
        counts[d if a >= 1 else t] += 1
    return counts


def always_accept(p, q, draft, rng):
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


def resample_from_p(p, q, draft, rng):
    """A subtler mistake: on rejection draw from p instead of normalize(max(0, p - q))."""
    for i, t in enumerate(draft):
        if rng.random() * q[i, t] >= p[i, t]:
            return i, int(rng.choice(p.shape[1], p=p[i]))
    return len(draft), int(rng.choice(p.shape[1], p=p[len(draft)]))


P1 = onp.array([[0.50, 0.05, 0.25, 0.15, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
Q1 = onp.array([[0.10, 0.40, 0.20, 0.10, 0.20]])


def test_accept_rule_keeps_the_verifier_distribution():
    """Law: a token drafted from q and kept with probability min(1, p/q), else replaced by a draw from
    normalize(max(0, p - q)), is distributed as p. Chi-square at the 0.1% level, 20000 draws."""
    stat, dof = chi_square(sampled_first_tokens(P1, Q1, 20000, accept_sampled), P1[0])
    assert stat < CHI2_999[dof], stat


@pytest.mark.parametrize("broken", [always_accept, resample_from_p])
def test_chi_square_catches_a_broken_accept_rule(broken):
    """The same test rejects always-accept (which gives q) and resampling from p (which gives
    min(p,q) + (1 - sum min(p,q)) p): the statistical test has teeth."""
    stat, dof = chi_square(sampled_first_tokens(P1, Q1, 20000, broken), P1[0])
    assert stat > CHI2_999[dof], stat


Q3 = onp.array([[0.10, 0.40, 0.20, 0.10, 0.20], [0.60, 0.10, 0.10, 0.10, 0.10], [0.05, 0.05, 0.05, 0.05, 0.80]])


def sampled_first_tokens_multi(draws, rule, seed=0):
    """Counts of the first emitted token when three drafters each propose one token from their own q."""
    rng = onp.random.default_rng(seed)
    p = onp.repeat(P1[None], 3, axis=0)
    counts = onp.zeros(5)
    for _ in range(draws):
        drafts = onp.asarray([[rng.choice(5, p=q)] for q in Q3])
        row, a, t = rule(p, Q3[:, None, :], drafts, rng)
        counts[drafts[row, 0] if a >= 1 else t] += 1
    return counts


def no_residual_update(p, q, drafts, rng):
    """A mistake: test every draft against the verifier's p itself, never against the residual."""
    for r in range(len(drafts)):
        t = drafts[r, 0]
        if rng.random() * q[r, 0, t] < p[0, 0, t]:
            return r, 1, int(rng.choice(p.shape[2], p=p[r, 1]))
    return 0, 0, int(rng.choice(p.shape[2], p=p[0, 0]))


def test_recursive_rule_for_several_drafters_keeps_the_verifier_distribution():
    """Law: with several independent drafts, trying them in turn against P, and replacing P by
    normalize(max(0, P - q_r)) after each refusal, emits a token distributed as p. 12000 draws, 0.1%."""
    stat, dof = chi_square(sampled_first_tokens_multi(12000, accept_sampled_multi), P1[0])
    assert stat < CHI2_999[dof], stat
    stat, dof = chi_square(sampled_first_tokens_multi(12000, no_residual_update), P1[0])
    assert stat > CHI2_999[dof], f"the test must reject the rule without residuals; statistic {stat}"


TINYV = Config.preset("micro").override(vocab_size=4).faithful()   # unscaled output: fresh models are peaked, so drafter and verifier differ
TINYV_PARAMS = lively(TINYV, 1)
PROMPT = [1, 2, 3, 0, 1]
TEMP = 3.0


def exact_pair_distribution():
    """p(t1, t2) of the verifier at temperature 3, from model.forward: (4*4,)."""
    def probs(ids):
        return filtered_probs(forward(TINYV_PARAMS, TINYV, onp.asarray([ids]))[0, -1], TEMP)
    p1 = probs(PROMPT)
    return onp.concatenate([p1[a] * probs(PROMPT + [a]) for a in range(4)])


def speculative_pairs(draws, monkeypatch=None, rule=None, drafters=((1, 0),)):
    if rule is not None:
        monkeypatch.setattr(speculative, rule[0], rule[1])
    counts = onp.zeros(16)
    for seed in range(draws):
        new, _ = speculative_ids(TINYV_PARAMS, TINYV, PROMPT, 2, (0, 0), list(drafters), k=3, temperature=TEMP,
                                 seed=seed)
        counts[4 * new[0] + new[1]] += 1
    return counts


def test_sampled_speculative_decoding_keeps_the_verifiers_joint_distribution():
    """End to end on a 4-token vocabulary: the first two sampled tokens (both drafted, so both go
    through accept/reject) follow the verifier's exact joint p(t1) p(t2 | t1). 1500 draws, 0.1% level."""
    p = exact_pair_distribution()
    q1 = filtered_probs(forward(view(TINYV_PARAMS, TINYV, 1, 0), TINYV.sub(1), onp.asarray([PROMPT]))[0, -1], TEMP)
    assert onp.abs(q1 - p.reshape(4, 4).sum(1)).sum() > 0.5, "the drafter must differ from the verifier"
    stat, dof = chi_square(speculative_pairs(1500), p)
    assert stat < CHI2_999[dof], stat


def test_sampled_multi_draft_decoding_keeps_the_verifiers_joint_distribution():
    """The same end-to-end test with both level-1 models drafting (the recursive rule): 1500 draws."""
    stat, dof = chi_square(speculative_pairs(1500, drafters=((1, 0), (1, 1))), exact_pair_distribution())
    assert stat < CHI2_999[dof], stat


@pytest.mark.parametrize("name, broken, drafters", [
    ("accept_sampled", always_accept, ((1, 0),)),
    ("accept_sampled_multi", no_residual_update, ((1, 0), (1, 1))),
])
def test_end_to_end_chi_square_catches_a_broken_rule(monkeypatch, name, broken, drafters):
    """With the rule replaced by always-accept (one drafter) or by the recursive rule without residuals
    (two drafters), the same end-to-end test fails; 600 draws suffice."""
    stat, dof = chi_square(speculative_pairs(600, monkeypatch, (name, broken), drafters), exact_pair_distribution())
    assert stat > CHI2_999[dof], stat


def test_drafter_choices_resolve_to_descendants():
    """None means the verifier's children; a level means its descendants there; lists are kept sorted."""
    assert resolve_drafters(CFG, (0, 0), None) == [(1, 0), (1, 1)]
    assert resolve_drafters(CFG, (0, 0), 2) == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert resolve_drafters(CFG, (1, 1), 2) == [(2, 2), (2, 3)]
    assert resolve_drafters(CFG, (0, 0), [(2, 3), (1, 0)]) == [(1, 0), (2, 3)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(verifier=(1, 0), drafters=[(2, 2)]), "not a descendant"),
    (dict(verifier=(1, 0), drafters=[(1, 0)]), "not a descendant"),
    (dict(verifier=(1, 0), drafters=[(0, 0)]), "not a descendant"),
    (dict(verifier=(2, 0)), "leaf"),
    (dict(drafters=0), "drafter level"),
    (dict(drafters=3), "drafter level"),
    (dict(drafters=[]), "non-empty"),
    (dict(drafters=[(2, 1), (2, 1)]), "twice"),
    (dict(drafters=[(2, 9)]), "out of range"),
    (dict(drafters=[2]), "pair"),
    (dict(k=0), "k must be"),
    (dict(k=2.0), "k must be"),
    (dict(temperature=-1), "temperature"),
    (dict(keep=0), "keep"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_speculative_inputs_are_clear_errors(kwargs, match):
    """Each bad choice is a ValueError that names it."""
    with pytest.raises(ValueError, match=match):
        speculative_ids(PARAMS, CFG, [1, 2, 3], **{"max_new_tokens": 5, **kwargs})


@pytest.mark.parametrize("prompt", [[], [1, 128], [-1]])
def test_bad_prompts_are_clear_errors(prompt):
    """An empty prompt or token ids outside the vocabulary: ValueError."""
    with pytest.raises(ValueError, match="prompt"):
        speculative_ids(PARAMS, CFG, prompt, 5)


def test_parse_drafters_reads_levels_nodes_and_sets():
    """'2' is a level, '2.1' a node, '+' joins parts; anything else is a ValueError."""
    from tinyfractal.inference.speculative import parse_drafters
    assert parse_drafters(CFG, (0, 0), "2") == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert parse_drafters(CFG, (0, 0), "2.3+1.0") == [(1, 0), (2, 3)]
    assert parse_drafters(CFG, (1, 1), "2") == [(2, 2), (2, 3)]
    assert parse_drafters(CFG, (0, 0), "1+2") == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    for bad in ("", "x", "2.1.0", "2.", "1+1"):
        with pytest.raises(ValueError):
            parse_drafters(CFG, (0, 0), bad)


def test_sample_command_speculative(tmp_path, capsys):
    """`sample --speculative` prints the verifier's greedy text and a stats line; bad choices exit 2
    with one line on stderr."""
    from tinyfractal import save
    from tinyfractal.cli import main
    ckpt = tmp_path / "ckpt"
    save(ckpt, PARAMS, CFG, {})
    base = ["sample", "--ckpt", str(ckpt), "--prompt", "KING:", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "--drafters", "2", "--draft-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "acceptance" in out.err
    for extra, message in ((["--speculative", "--drafters", "2.9"], "out of range"),
                           (["--speculative", "--level", "1", "--drafters", "2.3"], "not a descendant"),
                           (["--speculative", "--draft-k", "0"], "k must be"),
                           (["--drafters", "2"], "only apply with --speculative")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
