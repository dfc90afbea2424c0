"""The JAX engine (tinyfractal/jax_engine) is the same FractalFormer as the NumPy engine.

- Same-program laws: the stacked diagonal blocks equal `tree.level_view`; the tree loss and every
  gradient equal the NumPy engine's on random configs (levels 1-3, split 2-3, float32); one AdamW step
  with frozen entries equals `train.adamw_step`; the same with each node's own output gain
  (logit_scale='learned', node_gains) read from random tables.
- Checkpoints cross both ways: a JAX run evaluated and sampled by NumPy gives the same per-node table
  and text, and a NumPy run resumed by JAX continues where it stopped.
- Sharding changes nothing: 4 CPU devices in a child process; 2 processes over 127.0.0.1.
- The command line: one line and exit 2 for what the engine cannot do, and for a missing jax.

Compilation dominates the time here, so the configs are tiny, examples are few, XLA's backend
optimisation is off (it halves compile time and changes no result we compare at these tolerances) and
compiled programs are cached on disk for the child processes.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
jax = pytest.importorskip("jax")
CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "tinyfractal-jax-test-cache"
jax.config.update("jax_compilation_cache_dir", str(CACHE))      # the same program is compiled once per session
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import numpy as np                                                   # noqa: E402
from autograd import value_and_grad                                  # noqa: E402
from hypothesis import given                                         # noqa: E402
from hypothesis import strategies as st                              # noqa: E402

import tinyfractal as tf                                             # noqa: E402
from strategies import examples                                      # noqa: E402
from tinyfractal.cli import main as cli                              # noqa: E402
from tinyfractal.core.tree import flatten, unflatten                 # noqa: E402
from tinyfractal.jax_engine import blocks, model as jmodel           # noqa: E402
from tinyfractal.jax_engine.mesh import Layout                       # noqa: E402
from tinyfractal.jax_engine.train import train as jax_train          # noqa: E402
from tinyfractal.training import train as np_train                   # noqa: E402
from tinyfractal.training.merge import trainable_mask                # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_backend_optimization_level=0",
             "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(CACHE),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
# a constant learning rate and constant loss weights (the default 'sqrtwidth>nodes' anneals over tc.steps),
# so a run of 25 steps resumed to 50 is the run of 50 steps
MICRO = ["--preset", "micro", "--batch_size=4", "--eval_batches=2", "--log_interval=25", "--warmup=0", "--min_lr=0.003",
         "--loss_weights=sqrtwidth"]


@st.composite
def configs(draw):
    """Small valid configs with levels 1-3 and split 2-3, no dropout, leaf width >= 2.

    (At width 1, rmsnorm(x) is sign(x)·(1+g): its gradient with respect to x is analytically ~0, and
    both engines return float32 rounding noise for it, which no relative tolerance can compare.)"""
    split, levels = draw(st.sampled_from([(2, 1), (3, 1), (2, 2), (3, 2), (2, 3), (3, 3)]))
    leaves = split ** (levels - 1)
    kv_heads = draw(st.sampled_from([1, 2]))
    return tf.Config(vocab_size=draw(st.integers(5, 20)), context=draw(st.integers(2, 6)), layers=draw(st.integers(1, 2)),
                     heads=kv_heads * draw(st.integers(1, 2)), kv_heads=kv_heads,
                     head_dim=2 * leaves * draw(st.integers(1, 2)), hidden=leaves * draw(st.integers(2, 3)),
                     mlp_mult=draw(st.integers(1, 2)), levels=levels, split=split,
                     rope_theta=draw(st.sampled_from([10.0, 100.0])), eps=draw(st.sampled_from([1e-6, 1e-3])))


def random_params(cfg, seed):
    """init_params with nonzero gains and biases (float32), so reading a wrong slice of one shows."""
    rng = np.random.default_rng(seed)
    return unflatten({k: (v + (rng.normal(0, 0.3, v.shape) if v.ndim == 1 else 0)).astype(np.float32)
                      for k, v in flatten(tf.init_params(cfg, seed)).items()})


@st.composite
def cases(draw):
    cfg = draw(configs())
    params = random_params(cfg, draw(st.integers(0, 2 ** 31 - 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, cfg.context))
    return cfg, params, rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def device(params):
    return jax.tree_util.tree_map(jax.numpy.asarray, params)


@examples(6)
@given(cases())
def test_stacked_blocks_by_reshape_and_diagonal_equal_numpy_level_view(case):
    """View law: the JAX level view (reshape, then a diagonal gather) holds exactly the arrays of
    tree.level_view (strided views): entry j is model j's blocks, bit for bit, at every level."""
    cfg, params, _, _ = case
    jparams = device(params)
    for level in range(cfg.levels):
        stack = jax.jit(lambda p: blocks.level_view(p, cfg, level))      # one compile, not one per op
        want, got = flatten(tf.level_view(params, cfg, level)), flatten(stack(jparams))
        assert want.keys() == got.keys()
        for name, w in want.items():
            assert got[name].shape == w.shape, name
            assert np.array_equal(np.asarray(got[name]), w), name


def assert_grads_close(got, want, rtol=1e-5, array_rtol=1e-4):
    """The gradients agree to rtol relative, as one vector (the L2 norm over every array), and each array
    to array_rtol relative in its own L2 norm.

    Per array the bound is looser because float32 rounding is not spread evenly: a small array whose
    gradient comes out of a cancellation (Wo of a 2-wide model, a gain of a 2-wide rmsnorm, Wq and Wk
    when T = 1, where the gradient is analytically zero) carries the rounding of larger terms. For the
    same reason an array whose gradient is below 1% of the whole gradient's norm is held to that 1%.
    A wrong slice, formula or missing term gives errors the size of the gradient itself, far above both.
    """
    want, got = flatten(want), flatten(got)
    total = np.sqrt(sum(np.vdot(w, w) for w in want.values()))
    errors = {}
    for name, w in want.items():
        g = np.asarray(got[name])
        assert g.dtype == np.float32 and g.shape == w.shape, name
        errors[name] = np.linalg.norm(g - w)
        scale = max(np.linalg.norm(w), 1e-2 * total)
        assert errors[name] <= array_rtol * scale, f"{name}: error {errors[name]:.2e}, gradient norm {np.linalg.norm(w):.2e}"
    overall = np.sqrt(sum(e * e for e in errors.values()))
    assert overall <= rtol * total, f"whole gradient: error {overall:.2e}, norm {total:.2e}"


@examples(3)
@given(cases(), st.booleans())
def test_jax_tree_loss_and_every_gradient_equal_the_numpy_engine(case, weighted):
    """Same-program law across engines: the jitted JAX tree loss and its gradient with respect to every
    array equal the NumPy engine's (tf.tree_loss under autograd) within float32 rounding (1e-5 relative),
    with equal or random level weights."""
    cfg, params, ids, targets = case
    weights = list(np.random.default_rng(1).uniform(0.1, 2.0, cfg.levels)) if weighted else None
    loss, grads = value_and_grad(lambda p: tf.tree_loss(p, cfg, ids, targets, weights))(params)
    jloss, jgrads = jax.jit(jax.value_and_grad(
        lambda p, i, t: jmodel.tree_loss(p, cfg, i, t, weights)))(device(params), ids, targets)
    np.testing.assert_allclose(float(jloss), loss, rtol=1e-5)
    assert_grads_close(jgrads, grads)


# grad_clip 0.15 with clip_mode tree: the gradient norms here (0.12-0.13, the leaves frozen) stay under
# 0.15 and over the tree's threshold 0.15 * sqrt(1/3), so only the tree's rule clips, by a factor that
# changes from step to step (a constant factor would leave Adam's step unchanged)
@pytest.mark.parametrize("width_lr, clip_mode, grad_clip", [(0.0, "global", 0.5), (1.0, "global", 0.5),
                                                            (1.0, "tree", 0.15)])
def test_training_steps_with_frozen_entries_match_numpy_adamw(width_lr, clip_mode, grad_clip):
    """Optimizer law: three JAX steps (clipping, global or by the tree's weights, warmup, weight decay except
    on NO_DECAY names, frozen entries of a merged model, each matrix entry's width_lr factor) give the
    parameters three NumPy steps give, and every frozen entry is bit for bit what it was."""
    cfg = tf.Config.preset("micro")
    tc = np_train.TrainConfig(steps=3, batch_size=2, warmup=2, eval_interval=3, eval_batches=1, grad_clip=grad_clip,
                              width_lr=width_lr, clip_mode=clip_mode)
    start = tf.init_params(cfg, 0)
    trainable, j_params = assert_jax_steps_equal_numpy_steps(cfg, tc, start)
    assert any(not np.array_equal(flatten(j_params)[k], flatten(start)[k]) for k in trainable), "nothing trained"


@pytest.mark.parametrize("loss_weights", ["nodes", "sqrtwidth>nodes", "1,4>width", "params"])
def test_training_steps_with_loss_weights_match_numpy(loss_weights):
    """Optimizer law for loss_weights: three JAX steps of a tree weighted per level (a fixed scheme, or one
    annealed from one end to the other over the run, so every step has its own weights and its own tree
    clipping threshold) give the parameters three NumPy steps give, with nothing frozen."""
    cfg = tf.Config.preset("micro")
    tc = np_train.TrainConfig(steps=3, batch_size=2, warmup=2, eval_interval=3, eval_batches=1, grad_clip=0.05,
                              loss_weights=loss_weights)
    # atol 2e-5: with nothing frozen, an entry whose gradient is near 0 takes an Adam step of either sign
    # that rounding decides; a step here moves an entry by up to 3e-3, a wrong weight by more than 1e-4
    assert_jax_steps_equal_numpy_steps(cfg, tc, tf.init_params(cfg, 0), frozen_level=None, atol=2e-5)


def assert_jax_steps_equal_numpy_steps(cfg, tc, start, frozen_level=1, atol=1e-6):
    """Train copies of `start` for tc.steps (3) with each engine, the entries of `frozen_level` and below
    frozen (None: nothing frozen); assert the JAX run took 3 steps, left every frozen entry bit for bit, and
    matches NumPy's parameters. Returns (trainable mask or None, JAX-trained params)."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 200).astype(np.int32)
    trainable = None if frozen_level is None else trainable_mask(start, cfg, frozen_level=frozen_level)
    np_params = unflatten({k: v.copy() for k, v in flatten(start).items()})
    np_train.train(np_params, cfg, tc, tokens, tokens, trainable=trainable, log=lambda *a: None)
    j_params = unflatten({k: v.copy() for k, v in flatten(start).items()})
    state, _ = jax_train(j_params, cfg, tc, tokens, tokens, trainable=trainable, log=lambda *a: None)
    assert state["t"] == 3
    for name, want in flatten(np_params).items():
        got, before = flatten(j_params)[name], flatten(start)[name]
        if trainable is not None:
            mask = trainable[name]
            assert np.array_equal(got[~mask], before[~mask]), f"{name}: a frozen entry moved"
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)
    return trainable, j_params


def eval_json(*args):
    """Per-node val losses printed by `eval --json`."""
    return json.loads(run_cli(["eval", *args, "--json", "--batches", "2", "--batch-size", "4"]))


def run_cli(argv):
    """Run the command line in this process; its stdout, asserting exit code 0."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(argv) == 0
    return out.getvalue()


def test_checkpoints_cross_both_ways_with_the_same_tables_and_text(tmp_path):
    """Format law: 50 JAX steps, then NumPy `eval` and `sample` (and JAX's) on that checkpoint: the per-node
    val losses agree to 1e-4, the final table of the run equals NumPy's evaluation of its checkpoint, and
    both engines sample the same text for the same seed. The reverse: NumPy trains 25 steps, JAX resumes
    them to 50, and its losses are the JAX-only run's."""
    jdir, ndir, rdir = tmp_path / "jax", tmp_path / "numpy", tmp_path / "resumed"
    run_cli(["train", "--backend", "jax", *MICRO, "--steps", "50", "--eval_interval=25", "--out", str(jdir)])
    by_numpy, by_jax = eval_json("--ckpt", str(jdir)), eval_json("--ckpt", str(jdir), "--backend", "jax")
    assert by_numpy.keys() == by_jax.keys() == {"0.0", "1.0", "1.1"}
    for node, value in by_numpy.items():
        assert abs(by_jax[node] - value) < 1e-4, node

    params, cfg, meta = tf.load(jdir)
    val = meta["metrics"]["val"]
    tc = np_train.TrainConfig(**meta["train"])
    from tinyfractal.training.data import load_tokens, train_val_split
    recomputed = np_train.evaluate(params, cfg, train_val_split(load_tokens(tf.Tokenizer.default()))[1],
                                   tc.batch_size, tc.eval_batches)
    for node, value in recomputed.items():
        assert abs(val[np_train.node_key(node)][-1] - value) < 1e-4, node

    sample = ["sample", "--ckpt", str(jdir), "--level", "1", "--index", "1", "--prompt", "ROMEO:",
              "--max-new-tokens", "24", "--temperature", "1", "--seed", "3"]
    text = run_cli(sample)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 10
    assert run_cli(sample + ["--backend", "jax"]) == text

    run_cli(["train", *MICRO, "--steps", "50", "--eval_interval=25", "--out", str(ndir)])
    history = json.loads((ndir / "metrics.json").read_text())
    np.testing.assert_allclose(history["loss"], json.loads((jdir / "metrics.json").read_text())["loss"], atol=1e-4)
    run_cli(["train", *MICRO, "--steps", "25", "--eval_interval=25", "--out", str(rdir)])
    run_cli(["train", "--backend", "jax", *MICRO, "--eval_interval=25", "--out", str(rdir), "--resume", "--extend-to", "50"])
    resumed = json.loads((rdir / "metrics.json").read_text())
    assert resumed["step"] == list(range(1, 51))
    np.testing.assert_allclose(resumed["loss"], json.loads((jdir / "metrics.json").read_text())["loss"], atol=1e-4)


def test_four_devices_data_and_model_sharded_steps_equal_one_device():
    """Sharding law: on 4 CPU devices, data parallel (4 x 1) and data x model (2 x 2) training gives, at
    each of 3 steps, the single-device loss within 1e-5, and the same parameters within 1e-5 after them
    (the config has logit_gain and node_gain, so the per-level tables are sharded with the models too)."""
    env = {**CHILD_ENV, "XLA_FLAGS": CHILD_ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "jax_worker.py"), "sharded"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["devices"] == 4
    single = result["single"]
    assert "data 1 x model 1" in single["describe"]
    for name, mesh in (("data", "data 4 x model 1"), ("data+model", "data 2 x model 2")):
        run = result[name]
        assert mesh in run["describe"]
        np.testing.assert_allclose(run["loss"], single["loss"], rtol=0, atol=1e-5)
        assert {"logit_gain", "node_gain"} <= single["params"].keys()
        for key, value in single["params"].items():
            np.testing.assert_allclose(run["params"][key], value, rtol=0, atol=1e-5, err_msg=f"{name}: {key}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_over_localhost_train_like_one(tmp_path):
    """Many-hosts law: `train --backend jax --distributed` as 2 processes on 127.0.0.1 (gloo collectives,
    one CPU device each, batch rows split between them) logs the losses of the same run in one process."""
    train = [sys.executable, "-m", "tinyfractal", "train", "--backend", "jax", *MICRO, "--steps", "3",
             "--eval_interval=3", "--eval_batches=1"]
    port = free_port()
    procs = [subprocess.Popen(train + ["--distributed", "--out", str(tmp_path / "two")], cwd=ROOT,
                              env={**CHILD_ENV, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        single = subprocess.run(train + ["--out", str(tmp_path / "one")], cwd=ROOT, env=CHILD_ENV,
                                capture_output=True, text=True, timeout=600)
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:          # a hung pair (one side failed to start) must not outlive the test
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    assert single.returncode == 0, single.stderr[-2000:]
    assert "2 process(es)" in outputs[0][0] and "loss" in outputs[0][0]
    assert "loss" not in outputs[1][0] and "training" not in outputs[1][0]      # only process 0 prints
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["step"] == [1, 2, 3]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two["val"]["1.1"], one["val"]["1.1"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["train", "--backend", "jax", "--preset", "micro", "--coupling=upstream"], ["upstream"]),
    (["train", "--backend", "jax", "--preset", "micro", "--tokenizer=bytes"], ["bytes"]),
    (["train", "--backend", "jax", "--preset", "micro", "--model-axis", "3"], ["model axis", "3"]),
    (["train", "--preset", "micro", "--distributed"], ["--backend jax"]),
])
def test_what_the_jax_engine_cannot_do_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    """Bad-input law: a variant the JAX engine does not run, or a mesh that does not fit the devices, is one
    line on stderr naming it, and exit code 2."""
    assert cli(args + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_a_diverging_jax_run_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    """Divergence law, as in the NumPy engine: resumed with a learning rate that overflows the weights, the
    run stops with exit code 3 and one line naming the step, and the checkpoint on disk stays the last
    finite one (step 2)."""
    out = str(tmp_path / "run")
    assert cli(["train", "--backend", "jax", *MICRO, "--steps", "2", "--eval_interval=1", "--out", out]) == 0
    capsys.readouterr()
    assert cli(["train", "--backend", "jax", "--out", out, "--resume", "--extend-to", "6", "--allow-changes",
                "--lr=1e30", "--min_lr=1e30"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "step 2" in err[0], err
    params, _, meta = tf.load(out)
    assert meta["step"] == 2 and all(np.isfinite(a).all() for a in flatten(params).values())


def test_without_jax_the_numpy_engine_imports_and_backend_jax_says_how_to_install():
    """Optional-dependency law: `import tinyfractal` (and its command line) never imports jax, and with jax
    missing, `--backend jax` is one line on stderr naming the install command, exit code 2."""
    probe = "import sys, tinyfractal, tinyfractal.cli, tinyfractal.jax_engine; print('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=CHILD_ENV, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    blocked = ("import sys; sys.modules['jax'] = None; from tinyfractal.cli import main; "
               "sys.exit(main(['train', '--preset', 'micro', '--out', 'nowhere', '--backend', 'jax']))")
    done = subprocess.run([sys.executable, "-c", blocked], env=CHILD_ENV, capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "pip install" in done.stderr, done.stderr


def test_dropout_acts_in_training_only_and_other_variants_are_refused():
    """Dropout law: with a key (training) dropout changes the tree loss; without one (evaluation) the loss is
    exactly the same model's loss with dropout 0. Variant law: a coupled or byte config is a ValueError
    naming the variant, never a base model's answer."""
    cfg = tf.Config.preset("micro").override(dropout=0.5)
    params = device(tf.init_params(cfg, 0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context))
    loss = jax.jit(lambda p, i, key: jmodel.tree_loss(p, cfg, i, i, key=key))
    evaluate = jax.jit(lambda p, i: jmodel.tree_loss(p, cfg, i, i))
    plain = jax.jit(lambda p, i: jmodel.tree_loss(p, cfg.override(dropout=0.0), i, i))
    evaluated, undropped = float(evaluate(params, ids)), float(plain(params, ids))
    assert evaluated == undropped
    trained = [float(loss(params, ids, jax.random.PRNGKey(seed))) for seed in (0, 1)]
    assert trained[0] != undropped and trained[0] != trained[1]
    for changes, name in (({"coupling": "downstream"}, "downstream"), ({"tokenizer": "bytes"}, "bytes")):
        other = tf.Config.preset("micro").override(**changes)
        with pytest.raises(ValueError, match=name):
            jmodel.tree_loss(device(tf.init_params(other, 0)), other, ids, ids)


# The output options (model.output_gain): each node's own gain from its row of logit_gain and node_gain.
OUTPUT_OPTIONS = [{"logit_scale": "learned", "node_gains": False}, {"logit_scale": "sqrt", "node_gains": True},
                  {"logit_scale": "learned", "node_gains": True}]


def with_random_tables(params, seed):
    """params with logit_gain and node_gain drawn at random (fresh they are zero, which hides a dropped or
    misread gain), rows and columns all different, so a node reading another node's entries shows."""
    rng = np.random.default_rng(seed)
    return unflatten({k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) if k in ("logit_gain", "node_gain")
                      else v for k, v in flatten(params).items()})


@pytest.mark.parametrize("options", OUTPUT_OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_output_gains_give_the_numpy_node_losses_and_gradients(options):
    """Same-program law for the output options: with logit_scale='learned', node_gains=True, or both, and
    random nonzero logit_gain and node_gain tables, every node's JAX loss equals the NumPy engine's
    (1e-5 relative) and so does the gradient of the tree loss with respect to every array, the tables
    included."""
    cfg = tf.Config.preset("micro").override(**options)
    params = with_random_tables(random_params(cfg, 3), 4)
    rng = np.random.default_rng(5)
    ids, targets = (rng.integers(0, cfg.vocab_size, (2, 8)) for _ in range(2))
    want = [np.asarray(a) for a in tf.node_losses(params, cfg, ids, targets)]
    got = jax.jit(lambda p, i, t: jmodel.node_losses(p, cfg, i, t))(device(params), ids, targets)
    assert [a.shape for a in want] == [(1,), (2,)]
    for level, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, err_msg=f"level {level}")
    loss, grads = value_and_grad(lambda p: tf.tree_loss(p, cfg, ids, targets))(params)
    jloss, jgrads = jax.jit(jax.value_and_grad(lambda p, i, t: jmodel.tree_loss(p, cfg, i, t)))(
        device(params), ids, targets)
    np.testing.assert_allclose(float(jloss), loss, rtol=1e-5)
    tables = {"logit_gain": options.get("logit_scale") == "learned", "node_gain": options.get("node_gains", False)}
    assert {k for k in flatten(grads) if k in tables} == {k for k, on in tables.items() if on}
    assert_grads_close(jgrads, grads)


@pytest.mark.parametrize("options", OUTPUT_OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_output_gain_tables_train_as_numpy_adamw_trains_them(options):
    """Optimizer law for the output options: three JAX steps from random nonzero logit_gain and node_gain
    tables (tree clipping, width_lr, weight decay except on NO_DECAY names, which hold both tables, frozen
    entries of a merged model, the leaves' rows among them) give the parameters three NumPy steps give;
    frozen entries stay bit for bit, and the tables' free entries move."""
    cfg = tf.Config.preset("micro").override(**options)
    tc = np_train.TrainConfig(steps=3, batch_size=2, warmup=2, eval_interval=3, eval_batches=1, grad_clip=0.5,
                              width_lr=1.0, clip_mode="tree", weight_decay=0.5)
    start = with_random_tables(tf.init_params(cfg, 0), 1)
    tables = [k for k in ("logit_gain", "node_gain") if k in flatten(start)]
    assert len(tables) == (options["logit_scale"] == "learned") + options["node_gains"]
    trainable, j_params = assert_jax_steps_equal_numpy_steps(cfg, tc, start)
    for name in tables:
        mask = trainable[name]
        assert mask.any() and not np.array_equal(flatten(j_params)[name][mask], flatten(start)[name][mask]), name


def test_sampling_with_output_gains_writes_the_numpy_text():
    """Sampling law with both output options on and random tables: the JAX engine (its node view holds the
    node's rows [l:] of each table) samples from node (1, 1) the text the NumPy engine samples, same seed."""
    from tinyfractal.jax_engine.sample import generate as jax_generate
    cfg = tf.Config.preset("micro").override(logit_scale="learned", node_gains=True)
    params, tokenizer = with_random_tables(random_params(cfg, 6), 7), tf.Tokenizer.default()
    args = dict(level=1, index=1, max_new_tokens=12, temperature=1.0, seed=3)
    want = tf.generate(params, cfg, tokenizer, "ROMEO:", **args)
    assert jax_generate(params, cfg, tokenizer, "ROMEO:", **args) == want
    assert len(want) > len("ROMEO:")
