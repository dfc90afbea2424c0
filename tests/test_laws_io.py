"""Laws 12-14: what goes in and out of the engine (tokens, checkpoints, configs) is checked, exact, and
refuses bad input with a ValueError that says what is wrong.

The tokenizer laws are checked on tokenizers trained afresh on random texts (tests/test_tokenizer.py
covers the committed tokenizer in depth), so they hold for any trained tokenizer, not one file.
"""
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import (INVALID_KINDS, arrays_with_roles, config_dicts, configs, examples, get, invalid_configs,
                        params_for, random_params, spec_param_count, token_batches)
from tinyfractal.training import checkpoint
from tinyfractal.core import fast
from tinyfractal.config import Config
from tinyfractal.api import init_params
from tinyfractal.core.model import count_params, forward
from tinyfractal.text.bpe import Tokenizer, train
from tinyfractal.core.tree import flatten


# Law 12: tokenizer

@st.composite
def trained_tokenizers(draw):
    """The committed tokenizer, or one trained on a random text with up to 8 merges (fewer if the text
    runs out of mergeable pairs)."""
    if draw(st.integers(0, 4)) == 0:
        return COMMITTED
    text = draw(st.text(alphabet="ab c\n.,AB'", min_size=1, max_size=80))
    for merges in range(draw(st.integers(0, 8)), -1, -1):
        try:
            return train(text, merges)
        except ValueError:
            continue


COMMITTED = Tokenizer.default()


def texts_for(tok, max_size=60):
    """Text over tok's alphabet: random characters, pieces of its tokens glued together, or runs of
    repeated pieces ('lll', 'aaaa'), so that merges, and merges of a repeated character, really fire."""
    pieces = st.lists(st.sampled_from(tok.token_strings), max_size=max_size // 4).map("".join)
    runs = st.lists(st.tuples(st.sampled_from(tok.token_strings[:len(tok.chars)] + tok.token_strings[-3:]),
                              st.integers(1, 5)), max_size=max_size // 8).map(lambda r: "".join(s * n for s, n in r))
    return st.text(alphabet="".join(tok.chars), max_size=max_size) | pieces | runs


@examples(120)
@given(trained_tokenizers().flatmap(lambda t: st.tuples(st.just(t), texts_for(t))))
def test_tokenizer_round_trip(args):
    """Tokenizer: decode(encode(s)) == s for every text s over the alphabet, for any trained tokenizer
    (checked on the drawn text and on runs around every merge: 'lll', 'thth', ...)."""
    tok, text = args
    strings = tok.token_strings
    around_merges = [strings[a] * 3 + strings[b] * 2 + strings[a] for a, b in tok.merges]
    for s in [text] + around_merges:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s


@examples(80)
@given(trained_tokenizers().flatmap(lambda t: st.tuples(st.just(t), texts_for(t))))
def test_tokenizer_encoding_is_deterministic(args):
    """Tokenizer: encoding the same text twice, or with the tokenizer reloaded from its JSON, gives the same ids."""
    tok, text = args
    first = tok.encode(text)
    assert tok.encode(text) == first
    assert Tokenizer.from_json(tok.to_json()).encode(text) == first
    assert tok.encode_array(text).tolist() == first


@examples(80)
@given(trained_tokenizers().flatmap(lambda t: st.tuples(st.just(t), texts_for(t, 120))))
def test_tokenizer_merging_never_increases_token_count(args):
    """Tokenizer: with the first k merges a text has no more tokens than with the first k-1, for every k,
    and never more tokens than characters."""
    tok, text = args
    counts = [len(Tokenizer(tok.chars, tok.merges[:k]).encode(text)) for k in range(len(tok.merges) + 1)]
    assert counts[0] == len(text)
    assert all(b <= a for a, b in zip(counts, counts[1:])), counts


@examples(120)
@given(trained_tokenizers().flatmap(lambda t: st.tuples(
    st.just(t), texts_for(t, 20), texts_for(t, 20), st.characters().filter(lambda c: c not in t.chars))))
def test_tokenizer_rejects_every_character_outside_the_alphabet(args):
    """Tokenizer: a text holding any character outside the alphabet raises ValueError naming it."""
    tok, before, after, char = args
    text = before + char + after
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(Exception) as err:
            encode(text)
        assert type(err.value) is ValueError
        assert repr(char) in str(err.value)


# Law 13: checkpoints

def arrays_equal_bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def checkpoints(draw):
    """(cfg, params, meta, opt_state or None) for a random config."""
    cfg = draw(configs())
    params = draw(params_for(cfg))
    meta = draw(st.fixed_dictionaries({"step": st.integers(0, 10 ** 6),
                                       "val_loss": st.floats(0, 10, allow_nan=False),
                                       "note": st.text(max_size=10)}))
    opt = None
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2 ** 32 - 1))
        opt = {"m": flatten(random_params(cfg, seed)), "v": flatten(random_params(cfg, seed + 1)),
               "t": draw(st.integers(1, 10 ** 6))}
    return cfg, params, meta, opt


@examples(50)
@given(checkpoints())
def test_checkpoint_save_then_load_is_bit_exact(args):
    """Checkpoints: load(save(params, cfg, meta)) gives the same config, the same meta and every array
    bit for bit (float32), and the optimizer state too when one was saved."""
    cfg, params, meta, opt = args
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, params, cfg, meta, opt_state=opt)
        loaded, cfg2, meta2 = checkpoint.load(tmp)
        assert cfg2 == cfg and meta2 == meta
        for path, a, _ in arrays_with_roles(params):
            assert arrays_equal_bitwise(get(loaded, path), a), path
        assert set(flatten(loaded)) == set(flatten(params))
        state = checkpoint.load_optimizer(tmp)
        if opt is None:
            assert state is None
        else:
            assert state["t"] == opt["t"]
            for k in opt["m"]:
                assert arrays_equal_bitwise(state["m"][k], opt["m"][k]) and arrays_equal_bitwise(state["v"][k], opt["v"][k])


def saved(cfg, params):
    """A temporary folder holding a checkpoint of params (caller cleans up)."""
    tmp = tempfile.TemporaryDirectory()
    checkpoint.save(tmp.name, params, cfg, {"step": 7})
    return tmp


def files(folder):
    """The folder holding the current checkpoint's params.npz and meta.json (its step folder)."""
    return checkpoint.resolve(folder)


def assert_refused(folder):
    with pytest.raises(Exception) as err:
        checkpoint.load(folder)
    assert type(err.value) is ValueError, repr(err.value)


small_checkpoints = configs(max_nodes=13).flatmap(lambda c: st.tuples(st.just(c), params_for(c)))


@examples(50)
@given(small_checkpoints, st.data())
def test_checkpoint_truncated_or_altered_params_are_rejected(args, data):
    """Checkpoints: params.npz cut short, or with any one byte changed, is refused with a ValueError."""
    cfg, params = args
    with saved(cfg, params) as folder:
        f = files(folder) / "params.npz"
        good = f.read_bytes()
        cut = data.draw(st.integers(0, len(good) - 1), label="truncate at")
        f.write_bytes(good[:cut])
        assert_refused(folder)
        at = data.draw(st.integers(0, len(good) - 1), label="alter byte")
        flip = data.draw(st.integers(1, 255), label="xor")
        f.write_bytes(good[:at] + bytes([good[at] ^ flip]) + good[at + 1:])
        assert_refused(folder)


@examples(30)
@given(small_checkpoints, st.data())
def test_checkpoint_params_from_another_save_are_rejected(args, data):
    """Checkpoints: a well-formed params.npz whose numbers differ from the ones saved (one entry changed,
    a valid file in every other way) is refused with a ValueError, never loaded silently."""
    cfg, params = args
    with saved(cfg, params) as folder:
        flat = {f"param/{k}": np.array(v) for k, v in flatten(params).items()}
        name = data.draw(st.sampled_from(sorted(flat)))
        flat[name].reshape(-1)[data.draw(st.integers(0, flat[name].size - 1))] += 1.0
        buf = io.BytesIO()
        np.savez(buf, **flat)
        (files(folder) / "params.npz").write_bytes(buf.getvalue())
        assert_refused(folder)


@examples(50)
@given(small_checkpoints, st.data())
def test_checkpoint_truncated_or_corrupt_meta_is_rejected(args, data):
    """Checkpoints: meta.json cut short, or with its checksum, format, version or shape-giving config
    fields altered, is refused with a ValueError."""
    cfg, params = args
    with saved(cfg, params) as folder:
        f = files(folder) / "meta.json"
        good = f.read_text()
        f.write_text(good[:data.draw(st.integers(0, len(good.rstrip()) - 1), label="truncate at")])
        assert_refused(folder)
        info = json.loads(good)
        change = data.draw(st.sampled_from(["sha256", "format", "version", "hidden", "layers", "vocab_size",
                                            "heads", "levels_invalid", "unknown_field", "config_missing"]))
        if change == "sha256":
            info["sha256"] = info["sha256"][::-1]
        elif change == "format":
            info["format"] = "something-else"
        elif change == "version":
            info["version"] = 2
        elif change == "levels_invalid":
            info["config"]["levels"] = 0
        elif change == "unknown_field":
            info["config"]["width"] = 3
        elif change == "config_missing":
            del info["config"]
        else:
            info["config"][change] *= 2
        f.write_text(json.dumps(info))
        assert_refused(folder)


@pytest.mark.parametrize("field", ["rope_theta", "eps", "context", "dropout", "meta.step"])
def test_checkpoint_altered_meta_values_are_rejected(field):
    """Checkpoints: any change to the config or meta recorded in meta.json is refused with a ValueError
    (an altered file is never loaded silently)."""
    cfg = Config.preset("micro")
    with saved(cfg, init_params(cfg, 0)) as folder:
        f = files(folder) / "meta.json"
        info = json.loads(f.read_text())
        if field == "meta.step":
            info["meta"]["step"] = 8
        elif field == "dropout":
            info["config"]["dropout"] = 0.5
        else:
            info["config"][field] *= 2
        f.write_text(json.dumps(info))
        assert_refused(folder)


# Law 14: configs

@examples(80)
@given(config_dicts(), st.data())
def test_every_valid_config_builds_and_runs(fields, data):
    """Configs: every valid config builds, survives to_dict/from_dict, has the parameter count of docs/design.md's shapes, and
    runs a forward pass of the whole model and of every level, giving finite (B, T, V) float32 logits."""
    cfg = Config(**fields)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    params = init_params(cfg, data.draw(st.integers(0, 1000)))
    assert count_params(params) == spec_param_count(cfg)
    ids = data.draw(token_batches(cfg))
    logits = forward(params, cfg, ids)
    assert logits.shape == ids.shape + (cfg.vocab_size,) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    for level in range(cfg.levels):
        batched = fast.forward_level(params, cfg, level, ids)
        assert batched.shape == (cfg.split ** level,) + ids.shape + (cfg.vocab_size,)
        assert np.all(np.isfinite(batched))


@pytest.mark.parametrize("kind", INVALID_KINDS)
@examples(20)
@given(data=st.data())
def test_every_invalid_config_raises_a_value_error_naming_the_constraint(kind, data):
    """Configs: every config that breaks a constraint raises a ValueError (not an AssertionError, not a
    NumPy error) whose message names the broken constraint, built directly or from a dict."""
    fields, keywords, kind = data.draw(invalid_configs(kind))
    makers = [lambda: Config(**fields)]
    if kind not in ("integer", "positive_float", "dropout", "coupling_flag", "coupling_scale_init"):
        makers.append(lambda: Config.from_dict({**Config().to_dict(), **fields}))   # plain values only; all fields
    for make in makers:
        with pytest.raises(Exception) as err:
            make()
        assert type(err.value) is ValueError, f"{kind}: {type(err.value).__name__}: {err.value}"
        message = str(err.value).lower()
        assert all(k.lower() in message for k in keywords), f"{kind}: {keywords} not all in {message!r}"


field_values = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True, width=32),
                         st.booleans(), st.none(), st.text(max_size=3), st.lists(st.integers(0, 2), max_size=2))


@examples(300)
@given(config_dicts(max_nodes=15), st.dictionaries(st.sampled_from(sorted(Config.__dataclass_fields__)),
                                                   field_values, max_size=3))
def test_any_config_either_runs_or_raises_a_value_error(fields, changes):
    """Configs: whatever values the fields get, building a Config either raises a ValueError or gives a
    config whose model builds and runs a forward pass (never another exception)."""
    fields = {**fields, **changes}
    try:
        cfg = Config(**fields)
    except Exception as e:      # noqa: BLE001 - the law is about which exception
        assert type(e) is ValueError, f"{type(e).__name__}: {e}"
        return
    if cfg.coupling != "none" or cfg.tokenizer != "bpe":
        return                  # coupled and byte models run through coupling.py and concepts.py
    ids = np.zeros((1, min(cfg.context, 4)), dtype=np.int64)
    logits = forward(init_params(cfg, 0), cfg, ids)
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
