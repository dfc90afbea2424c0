"""`python -m tinyfractal.study tax`: the nesting tax of every node, its cache, its table, figure and JSON.

The --quick study trains the micro preset for a few steps (seconds); its numbers are plumbing only.
"""
import json
import math

import numpy as np
import pytest

from tinyfractal import Config, Tokenizer, init_params
from tinyfractal.tools import study
from tinyfractal.training.data import batch_at, load_tokens, train_val_split


def run(capsys, *argv):
    code = study.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick study, shared: (its folder, its JSON, its stdout)."""
    out = tmp_path_factory.mktemp("tax")
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = study.main(["tax", "--quick", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "tax.json").read_text()), buf.getvalue()


def test_quick_study_prints_the_table_and_writes_json_and_figure(quick):
    """The study prints a row per node and the tax per level, and writes tax.json and a PNG figure."""
    out, record, text = quick
    cfg = Config.preset("micro")
    assert [r["node"] for r in record["nodes"]] == [f"{l}.{j}" for l in range(cfg.levels) for j in range(2 ** l)]
    for level, j in [(0, 0), (1, 0), (1, 1)]:
        assert f"({level},{j})" in text
    assert "tax per level" in text and "bits/char" in text and "[tree seed 0] step" in text
    assert (out / "tax.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tax_is_the_nodes_val_minus_its_standalone_twins(quick):
    """tax = tree val - alone val per node, from the runs' own records; the twin of a level-l node is a
    one-level model of width d_l and head dim h_l; a level's tax is the mean over its nodes."""
    _, record, _ = quick
    cfg = Config.from_dict(record["config"])
    tree = record["trees"][0]
    for row in record["nodes"]:
        level = row["level"]
        twin = record["alone"][str(level)][0]
        assert row["tax"] == pytest.approx(tree["val"][row["node"]] - twin["val"]["0.0"], abs=1e-12)
        twin_cfg = Config.from_dict(twin["config"])
        assert (twin_cfg.hidden, twin_cfg.head_dim, twin_cfg.levels) == (cfg.width(level), cfg.head_width(level), 1)
    for lv in record["levels"]:
        rows = [r["tax"] for r in record["nodes"] if r["level"] == lv["level"]]
        assert lv["tax"] == pytest.approx(sum(rows) / len(rows))


def test_bits_per_char_count_the_characters_of_the_evaluated_windows(quick):
    """chars/token is counted on the val windows the evaluation reads, token by token (decode of each id),
    and bits/char = nats / ln 2 / (chars per token)."""
    _, record, _ = quick
    tokenizer = Tokenizer.default()
    _, val = train_val_split(load_tokens(tokenizer))
    chars = tokens = 0
    for b in range(record["eval_batches"]):
        _, targets = batch_at(val, record["train_config"]["batch_size"], record["config"]["context"], 1234, b)
        chars += sum(len(tokenizer.decode([int(t)])) for t in targets.ravel())
        tokens += targets.size
    assert record["chars_per_token"] == pytest.approx(chars / tokens)
    row = record["nodes"][0]
    assert row["bits_per_char"] == pytest.approx(row["val"] / math.log(2) / (chars / tokens))


def test_a_rerun_hits_the_cache_and_trains_nothing(quick, capsys, monkeypatch, tmp_path):
    """Run the same study again with the same cache: every run comes from the cache (training is not
    called) and the table's numbers are the same."""
    out, record, _ = quick
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("trained although cached"))
    code, text, _ = run(capsys, "tax", "--quick", "--out", str(tmp_path), "--cache", str(out / "study_cache"))
    assert code == 0
    assert text.count("cached:") == 1 + Config.preset("micro").levels
    again = json.loads((tmp_path / "tax.json").read_text())
    assert [r["val"] for r in again["nodes"]] == [r["val"] for r in record["nodes"]]


def test_a_tree_only_setting_retrains_only_the_tree(quick, capsys, monkeypatch, tmp_path):
    """loss_weights changes only how the tree is trained, so the standalone twins come from the cache;
    a model option (logit_scale) changes the twins too, so they are trained again."""
    out, _, _ = quick
    kinds = []
    real = study.train_run

    def counting(cfg, *args, **kwargs):
        kinds.append(cfg.levels)
        return real(cfg, *args, **kwargs)
    monkeypatch.setattr(study, "train_run", counting)
    cache = str(out / "study_cache")
    code, text, _ = run(capsys, "tax", "--quick", "--out", str(tmp_path / "a"), "--cache", cache, "--loss_weights=width")
    assert code == 0 and kinds == [2] and text.count("cached:") == 2
    kinds.clear()
    code, _, _ = run(capsys, "tax", "--quick", "--out", str(tmp_path / "b"), "--cache", cache, "--logit_scale=none")
    assert code == 0 and kinds == [2, 1, 1]
    code, text, _ = run(capsys, "table", str(out), str(tmp_path / "a"), str(tmp_path / "b" / "tax.json"))
    assert code == 0
    lines = text.strip().splitlines()
    assert len(lines) == 4 and "baseline" in lines[1] and "--loss_weights=width" in lines[2]


@pytest.mark.parametrize("argv,words", [
    (["tax", "--quick", "--seeds", "0,0"], "--seeds"),
    (["tax", "--quick", "--seeds", "a"], "--seeds"),
    (["tax", "--quick", "--steps", "0"], "--steps"),
    (["tax", "--quick", "--bogus=1"], "bogus"),
    (["tax", "--quick", "--tokenizer=bytes", "--vocab_size=256"], "tokenizer"),
    (["tax", "--quick", "--logit_scale=cube"], "logit_scale"),
    (["tax", "--quick", "--loss_weights=1,2,3,4"], "loss_weights"),
    (["table", "/nonexistent/study"], "no study"),
    (["nothing"], "invalid choice"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(capsys, tmp_path, argv, words):
    code, _, err = run(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "tax" else []))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err


def test_faithful_turns_every_studied_option_off(capsys, tmp_path):
    """Config.faithful and TrainConfig.faithful set every option the study measures to the prototype's
    choice, which is also the value the cache hash leaves out; --faithful applies both, then --key=value."""
    from tinyfractal.training.train import TrainConfig
    cfg = Config.preset("micro").override(logit_scale="learned", node_gains=True, nested_init=True).faithful()
    tc = TrainConfig(loss_weights="width", clip_mode="tree", width_lr=1.0).faithful()
    assert (cfg.logit_scale, cfg.node_gains, cfg.nested_init) == ("none", False, False)
    assert (tc.loss_weights, tc.clip_mode, tc.width_lr) == ("nodes", "global", 0.0)
    assert study.NEUTRAL == {"logit_scale": "none", "node_gains": False, "nested_init": False,
                             "loss_weights": "nodes", "clip_mode": "global", "width_lr": 0.0, "lr_width": 0}
    code, _, _ = run(capsys, "tax", "--quick", "--faithful", "--logit_scale=sqrt", "--out", str(tmp_path))
    assert code == 0
    assert json.loads((tmp_path / "tax.json").read_text())["config"]["logit_scale"] == "sqrt"


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_numbers(tmp_path):
    """A run saves a checkpoint at every evaluation; killed after one, it resumes there and ends with the
    same val losses and per-step losses as a run that was never interrupted."""
    from tinyfractal.training.train import TrainConfig
    cfg = Config.preset("micro")
    tc = TrainConfig(steps=4, batch_size=2, eval_interval=2, eval_batches=1, log_interval=1)
    data = study.load_data(cfg, tc, 1)
    whole = study.train_run(cfg, tc, data, 1, lambda s: None)

    def stop_at_step_3(line):
        if line.startswith("step     3/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        study.train_run(cfg, tc, data, 1, stop_at_step_3, tmp_path / "run.partial")
    lines = []
    resumed = study.train_run(cfg, tc, data, 1, lines.append, tmp_path / "run.partial")
    assert lines[0].startswith("resuming") and "step 2" in lines[0]
    assert resumed["val"] == whole["val"] and resumed["loss"] == whole["loss"] and resumed["first"] == whole["first"]


def test_a_twin_trains_its_matrices_at_the_lr_its_node_gets_in_the_tree():
    """Fair-twin law: with width_lr = a, the matrices of a level-l node train at lr * (D / d_l)^a in the tree,
    so the twin's matrices get the same factor (lr_width = D); every other tree-only setting goes back to
    neutral. Without width_lr the twin's settings are the neutral ones (so old cache entries still match)."""
    from tinyfractal.training.train import TrainConfig, width_lr_scales
    cfg = Config.preset("micro").override(levels=3, hidden=16, head_dim=8)
    tc = TrainConfig(width_lr=1.0, loss_weights="width", clip_mode="tree")
    plain = study.alone_train(TrainConfig(loss_weights="width", width_lr=0.0), cfg)
    assert (plain.width_lr, plain.lr_width, plain.loss_weights) == (0.0, 0, "nodes")
    for level in range(cfg.levels):
        twin_cfg, twin_tc = study.alone_config(cfg, level), study.alone_train(tc, cfg)
        assert (twin_tc.loss_weights, twin_tc.clip_mode, twin_tc.lr_width) == ("nodes", "global", cfg.hidden)
        scales = width_lr_scales(init_params(twin_cfg, 0), twin_cfg, twin_tc.width_lr, twin_tc.lr_width)
        want = cfg.split ** level
        if scales is None:            # every factor 1: only the root's twin may have that
            assert want == 1, level
        else:
            assert all(np.all(a == want) for a in scales.values()), level
