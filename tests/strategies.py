"""Hypothesis strategies for the tinyfractal test suite: the one place they live.

- `configs()`: random VALID configs (levels 1-4, split 2-4, widths and head dims that divide, heads a
  multiple of kv heads), with a tiny vocabulary and context so one forward pass takes milliseconds.
- `params_for(cfg)`: random float32 parameters for a config. Unlike `init_params`, every norm gain and
  bias is nonzero, so a model that reads the wrong gain slice gives different numbers.
- `token_batches(cfg)`: (B, T) token ids with 1 <= B <= 3 and 1 <= T <= context.
- `invalid_configs()`: (kwargs, keywords, kind): config fields that break exactly one constraint, and
  words the ValueError must contain to name that constraint.
- `SPEC_ROLES` and `spec_slices`: which block of each array a model owns, written by hand from the role
  table of docs/design.md (section 4), not imported from tinyfractal.core.tree, so tests can compare the
  code against the design.

`examples(n)` gives the number of examples of a law: n under the default profile, ten times n under
HYPOTHESIS_PROFILE=thorough.
"""
import os

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from tinyfractal.config import Config
from tinyfractal.core.model import option_shapes

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
SCALE = 10 if PROFILE == "thorough" else 1


def examples(n):
    """Settings for a law checked on n examples (10n under the thorough profile)."""
    return settings(max_examples=n * SCALE)


# (levels, split) pairs, smallest trees first so that hypothesis shrinks toward small ones.
SHAPES = sorted(((L, s) for L in range(1, 5) for s in range(2, 5)),
                key=lambda p: (sum(p[1] ** i for i in range(p[0])), p))


def n_nodes(levels, split):
    """1 + s + ... + s^(L-1), by the closed form (s^L - 1) / (s - 1)."""
    return (split ** levels - 1) // (split - 1)


@st.composite
def config_dicts(draw, max_nodes=85, min_levels=1):
    """The fields of a random valid config, as a dict (see `configs`)."""
    shapes = [(L, s) for L, s in SHAPES if n_nodes(L, s) <= max_nodes and L >= min_levels]
    levels, split = draw(st.sampled_from(shapes))
    leaves = split ** (levels - 1)
    kv_heads = draw(st.integers(1, 2))
    return dict(
        vocab_size=draw(st.integers(8, 20)),
        context=draw(st.integers(4, 8)),
        layers=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        head_dim=leaves * 2 * draw(st.integers(1, 2)),     # leaf head dim 2 or 4: even, as RoPE needs
        hidden=leaves * draw(st.integers(1, 3)),           # leaf width 1, 2 or 3
        mlp_mult=draw(st.integers(1, 3)),
        levels=levels,
        split=split,
        rope_theta=draw(st.sampled_from([100.0, 10.0, 10000.0]) | st.floats(2.0, 1e4)),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3])),
        dropout=draw(st.sampled_from([0.0, 0.1])),
    )


def configs(max_nodes=85, min_levels=1):
    """Random valid Configs with at most max_nodes models in the tree (85 = levels 4, split 4)."""
    return config_dicts(max_nodes, min_levels).map(lambda d: Config(**d))


def random_params(cfg, seed, dtype=np.float32):
    """Parameters of the right shapes (the role table of docs/design.md) with every entry random and nonzero-ish."""
    rng = np.random.default_rng(seed)
    D, H, K, hd, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    F = cfg.mlp_mult * D

    def w(shape, fan_in):
        return (rng.uniform(-1, 1, size=shape) / np.sqrt(fan_in)).astype(dtype)

    def gain(n):
        return rng.normal(0.0, 0.5, size=n).astype(dtype)

    params = {"E": rng.standard_normal((V, D)).astype(dtype),
              "emb_norm": gain(D), "final_norm": gain(D), "out_norm": gain(D), "layers": []}
    for _ in range(cfg.layers):
        params["layers"].append({
            "attn_norm": gain(D), "mlp_norm": gain(D),
            "Wq": w((D, H, hd), D), "Wk": w((D, K, hd), D), "Wv": w((D, K, hd), D),
            "Wo": w((H, hd, D), H * hd),
            "Wgate": w((D, F), D), "bgate": w(F, D), "Wup": w((D, F), D), "bup": w(F, D),
            "Wdown": w((F, D), F), "bdown": w(D, F),
        })
    for name in ("logit_gain", "node_gain"):   # the per-node output tables of the options cfg has on
        if name in option_shapes(cfg):
            params[name] = rng.normal(0.0, 0.4, size=option_shapes(cfg)[name]).astype(dtype)
    return params


def params_for(cfg, dtype=np.float32):
    """Strategy: random parameters for cfg (drawn from a seed, so examples replay exactly)."""
    return st.integers(0, 2 ** 32 - 1).map(lambda seed: random_params(cfg, seed, dtype))


@st.composite
def token_batches(draw, cfg, min_T=1):
    """(B, T) int64 token ids in [0, vocab_size), 1 <= B <= 3, min_T <= T <= context."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(min_T, cfg.context))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


@st.composite
def models(draw, max_nodes=85, dtype=np.float32, min_levels=1, min_T=1):
    """(cfg, params, ids, targets): a random model and a batch for it."""
    cfg = draw(configs(max_nodes, min_levels))
    params = draw(params_for(cfg, dtype))
    ids = draw(token_batches(cfg, min_T))
    targets = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).integers(0, cfg.vocab_size, size=ids.shape)
    return cfg, params, ids, targets


def node_of(cfg, level=None):
    """Strategy: a (level, index) of cfg's tree, optionally at a given level."""
    levels = st.just(level) if level is not None else st.integers(0, cfg.levels - 1)
    return levels.flatmap(lambda l: st.tuples(st.just(l), st.integers(0, cfg.split ** l - 1)))


# Which axes of each array are split among the models of a level, copied by hand from docs/design.md §4:
# R residual (D), M mlp (F), C inside a head (hd); None is shared whole (vocabulary, heads).
SPEC_ROLES = {"E": (None, "R"), "emb_norm": ("R",), "final_norm": ("R",), "out_norm": ("R",)}
SPEC_LAYER_ROLES = {
    "attn_norm": ("R",), "mlp_norm": ("R",),
    "Wq": ("R", None, "C"), "Wk": ("R", None, "C"), "Wv": ("R", None, "C"), "Wo": (None, "C", "R"),
    "Wgate": ("R", "M"), "Wup": ("R", "M"), "bgate": ("M",), "bup": ("M",), "Wdown": ("M", "R"), "bdown": ("R",),
}


def arrays_with_roles(params):
    """[(path, array, roles)] for every array; path is ('E',) or ('layers', i, 'Wq')."""
    out = [((k,), params[k], SPEC_ROLES[k]) for k in SPEC_ROLES]
    for i, layer in enumerate(params["layers"]):
        out += [(("layers", i, k), layer[k], SPEC_LAYER_ROLES[k]) for k in SPEC_LAYER_ROLES]
    return out


def array_paths(params):
    """The path of every array: those of the role table, then the per-node tables a config has on."""
    return [path for path, _, _ in arrays_with_roles(params)] + [(k,) for k in SPEC_TABLES if k in params]


def get(params, path):
    for p in path:
        params = params[p]
    return params


def spec_slices(shape, roles, split, level, index):
    """Model (level, index)'s block: along every role axis the index-th of split**level equal blocks."""
    n = split ** level
    return tuple(slice(index * (size // n), (index + 1) * (size // n)) if r else slice(None)
                 for size, r in zip(shape, roles))


# The per-node output tables (levels, D), there when an option is on: model (level, index) holds rows
# level.. (its own row first, then its descendants' levels), and its residual block of columns.
SPEC_TABLES = ("logit_gain", "node_gain")


def table_slices(shape, split, level, index):
    return (slice(level, None),) + spec_slices(shape[1:], ("R",), split, level, index)


def spec_mask(params, cfg, level, index):
    """{path: bool array}: True where docs/design.md says model (level, index) owns the entry."""
    out = {}
    for path, a, roles in arrays_with_roles(params):
        m = np.zeros(a.shape, dtype=bool)
        m[spec_slices(a.shape, roles, cfg.split, level, index)] = True
        out[path] = m
    for name in SPEC_TABLES:
        if name in params:
            m = np.zeros(params[name].shape, dtype=bool)
            m[table_slices(m.shape, cfg.split, level, index)] = True
            out[(name,)] = m
    return out


def spec_copy(params, cfg, level, index):
    """A standalone params dict for model (level, index): copies of its blocks by docs/design.md."""
    def cut(a, roles):
        return np.array(a[spec_slices(a.shape, roles, cfg.split, level, index)], copy=True)
    return {**{k: cut(params[k], SPEC_ROLES[k]) for k in SPEC_ROLES},
            **{k: np.array(params[k][table_slices(params[k].shape, cfg.split, level, index)], copy=True)
               for k in SPEC_TABLES if k in params},
            "layers": [{k: cut(layer[k], SPEC_LAYER_ROLES[k]) for k in SPEC_LAYER_ROLES}
                       for layer in params["layers"]]}


def spec_param_count(cfg):
    """Scalars in a model of this config, from the shapes in docs/design.md."""
    D, H, K, hd, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
    F = cfg.mlp_mult * D
    per_layer = 2 * D + D * H * hd + 2 * D * K * hd + H * hd * D + 2 * D * F + 2 * F + F * D + D
    tables = cfg.levels * D * ((cfg.logit_scale == "learned") + cfg.node_gains)   # (levels, D) each
    return V * D + 3 * D + cfg.layers * per_layer + tables


def astype(params, dtype):
    """A copy of params with every array cast to dtype (fresh, contiguous memory)."""
    return {**{k: np.array(v, dtype=dtype) for k, v in params.items() if k != "layers"},
            "layers": [{k: np.array(v, dtype=dtype) for k, v in layer.items()} for layer in params["layers"]]}


INT_FIELDS = ("vocab_size", "context", "layers", "heads", "kv_heads", "head_dim", "hidden", "mlp_mult",
              "levels", "split")


INVALID_KINDS = ["positive", "integer", "positive_float", "dropout", "split", "hidden", "head_dim", "rope_even",
                 "kv_heads", "coupling", "coupling_flag", "coupling_scale_init", "tokenizer", "bytes_vocab",
                 "bytes_coupling"]


@st.composite
def invalid_configs(draw, kind=None):
    """(kwargs, keywords, kind): fields breaking exactly one constraint of a config (of the given kind,
    one of INVALID_KINDS, or any). keywords are words the ValueError message must contain, naming the
    broken constraint.
    """
    d = draw(config_dicts(max_nodes=21))
    kind = kind or draw(st.sampled_from(INVALID_KINDS))
    leaves = d["split"] ** (d["levels"] - 1)
    if kind == "positive":
        field = draw(st.sampled_from(INT_FIELDS))
        d[field] = draw(st.integers(-5, 0))
        return d, (field, "positive"), kind
    if kind == "integer":
        field = draw(st.sampled_from(INT_FIELDS))
        bad = [2.5, 2.0, True, "3", [2]] + ([] if field == "vocab_size" else [None])   # vocab_size=None: the variant's own
        d[field] = draw(st.sampled_from(bad))
        return d, (field, "integer"), kind
    if kind == "positive_float":
        field = draw(st.sampled_from(["rope_theta", "eps"]))
        d[field] = draw(st.sampled_from([0.0, -1.0, float("nan"), True, "x", None]))
        return d, (field, "positive"), kind
    if kind == "dropout":
        d["dropout"] = draw(st.sampled_from([-0.1, 1.0, 1.5, float("nan"), True, "0.1"]))
        return d, ("dropout",), kind
    if kind == "split":
        d["split"] = 1
        d["levels"] = 1
        return d, ("split", "2"), kind
    if kind in ("hidden", "head_dim"):
        if leaves == 1:
            d["levels"] = 2
            leaves = d["split"]
            d["head_dim"] = 2 * leaves * draw(st.integers(1, 2))
            d["hidden"] = leaves * draw(st.integers(1, 3))
        step = leaves if kind == "hidden" else 2 * leaves
        d[kind] = step * draw(st.integers(1, 3)) + draw(st.integers(1, leaves - 1))
        return d, (kind, "divisible"), kind
    if kind == "coupling":
        d["coupling"] = draw(st.sampled_from(["sideways", "Upstream", "", 1, None]))
        return d, ("coupling",), kind
    if kind == "coupling_flag":
        field = draw(st.sampled_from(["coupling_cumulative", "coupling_sublayer"]))
        d[field] = draw(st.sampled_from([1, 0, "yes", "true", None]))
        return d, (field, "true or false"), kind
    if kind == "coupling_scale_init":
        d["coupling_scale_init"] = draw(st.sampled_from([float("inf"), float("-inf"), float("nan"), True, "x"]))
        return d, ("coupling_scale_init",), kind
    if kind == "tokenizer":
        d["tokenizer"] = draw(st.sampled_from(["chars", "BPE", "", None, 1]))
        return d, ("tokenizer",), kind
    if kind == "bytes_vocab":
        d["tokenizer"] = "bytes"
        return d, ("vocab_size", "256"), kind          # the drawn vocab is 8..20, never 256
    if kind == "bytes_coupling":
        d.update(tokenizer="bytes", vocab_size=256, coupling=draw(st.sampled_from(["upstream", "downstream"])))
        return d, ("coupling", "bytes"), kind
    if kind == "rope_even":
        d["head_dim"] = leaves * draw(st.sampled_from([1, 3, 5]))
        return d, ("even",), kind
    d["kv_heads"] = draw(st.integers(2, 3))
    d["heads"] = d["kv_heads"] * draw(st.integers(0, 2)) + draw(st.integers(1, d["kv_heads"] - 1))
    return d, ("heads", "kv_heads"), kind


BAD_TOKEN_KINDS = ["negative", "too_large", "float", "bool", "rank", "empty", "too_long"]


@st.composite
def bad_token_arrays(draw, cfg, kind=None):
    """(ids, kind): token ids a token model of cfg must refuse, and what is wrong with them, one of
    BAD_TOKEN_KINDS: a negative id, an id >= vocab_size, a float or bool dtype, not two axes (B, T),
    an empty batch or time axis, or more positions than the context."""
    kind = kind or draw(st.sampled_from(BAD_TOKEN_KINDS))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(cfg.context + 1, cfg.context + 3)) if kind == "too_long" else draw(st.integers(1, cfg.context))
    ids = np.array(draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=B * T, max_size=B * T)),
                   dtype=draw(st.sampled_from([np.int64, np.int32, np.uint8 if cfg.vocab_size <= 256 else np.int64])))
    ids = ids.reshape(B, T)
    at = (draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1)))
    if kind == "negative":
        ids = ids.astype(np.int64)
        ids[at] = draw(st.integers(-10 ** 6, -1))
    elif kind == "too_large":
        ids = ids.astype(np.int64)
        ids[at] = draw(st.integers(cfg.vocab_size, 2 ** 40))
    elif kind == "float":
        ids = ids.astype(draw(st.sampled_from([np.float16, np.float32, np.float64])))
    elif kind == "bool":
        ids = ids > 0
    elif kind == "rank":
        ids = draw(st.sampled_from([ids.reshape(-1), ids[..., None], ids[None], ids.reshape(-1)[0]]))
    elif kind == "empty":
        ids = draw(st.sampled_from([ids[:0], ids[:, :0]]))
    return ids, kind
