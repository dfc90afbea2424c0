"""Can the laws fail? Run each law's tests against deliberately broken engines ("mutants").

    python tests/mutants.py              # every mutant, then a table: law, mutant, caught
    python tests/mutants.py --list       # the mutants and what each one breaks
    python tests/mutants.py --only NAME  # one mutant (repeatable)

A law test that passes on the real engine and also passes on a broken one checks nothing. For every
law this script breaks the engine in a way that law is about (a view off by one block, a child given
its parent's gain slice, a non-causal mask, a checkpoint loaded without its checksum, ...), runs that
law's tests with the break in place, and reports whether they caught it (failed).

How: pytest runs in a child process with TINYFRACTAL_MUTANT=name; tests/conftest.py then calls
`activate(name)` before any test module is imported, which patches tinyfractal in memory only (no
file is changed). HYPOTHESIS_PROFILE=mutants makes the runs repeatable (fixed seed, no example
database, the default profile's example counts) and skips shrinking: one failing example is enough. Not collected by pytest (no test_ prefix).

A mutant rewrites the source text of one function, so it stops applying when that code moves or
changes. `build(name)` makes a mutant's patch without installing it (every source edit found and
compiled, every attribute it replaces present), and tests/test_mutants.py builds every mutant in the
normal suite, so a mutant that no longer applies fails a fast test instead of showing up as "n/a" here.
Every change a mutant makes goes through `install`, `replace_everywhere`, `rewrite` or `set_vjp`,
which only build while a dry run is on.
"""
import argparse
import contextlib
import inspect
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as onp

HERE = Path(__file__).resolve().parent


class NotApplicable(Exception):
    """The code a mutant rewrites has changed, so the mutant cannot be built."""


# Patching helpers. While DRY_RUN is on they build every patch and check it would apply, but change nothing.

DRY_RUN = False


@contextlib.contextmanager
def dry_run():
    """Inside this block mutants are built but not installed (see `build`)."""
    global DRY_RUN
    saved, DRY_RUN = DRY_RUN, True
    try:
        yield
    finally:
        DRY_RUN = saved


def install(owner, name, value):
    """owner.name = value, for an attribute that exists (unless a dry run)."""
    if not hasattr(owner, name):
        raise NotApplicable(f"{getattr(owner, '__name__', owner)} has no attribute {name!r}")
    if not DRY_RUN:
        setattr(owner, name, value)


def set_vjp(fn, vjp_maker, argnums=False):
    """Give the autograd primitive `fn` another VJP maker (defvjp, or defvjp_argnums) (unless a dry run)."""
    from autograd.extend import defvjp, defvjp_argnums
    if not getattr(fn, "_is_autograd_primitive", False):
        raise NotApplicable(f"{fn!r} is not an autograd primitive")
    if not DRY_RUN:
        (defvjp_argnums if argnums else defvjp)(fn, vjp_maker)


def replace_everywhere(old, new):
    """Point every reference to `old` in tinyfractal's modules and in the test modules at `new`
    (covers `from .tree import view` copies as well as the defining module)."""
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("tinyfractal") or name.startswith("test_")
                                  or name == "strategies"):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                if not DRY_RUN:
                    setattr(module, attr, new)
                count += 1
    if count == 0:
        raise NotApplicable(f"nothing refers to {old!r}")


def rewrite(owner, name, old, new, count=1):
    """Replace `owner.name` (a function or method) with a copy whose source has `old` replaced by `new`."""
    import importlib
    original = getattr(owner, name)
    fn = original.fget if isinstance(original, property) else original
    fn = getattr(fn, "fun", fn) if getattr(fn, "_is_autograd_primitive", False) else fn
    source = textwrap.dedent(inspect.getsource(fn))
    if source.count(old) != count:
        raise NotApplicable(f"{owner.__name__}.{name} holds {old!r} {source.count(old)} times, expected {count}")
    module = importlib.import_module(fn.__module__)
    namespace = dict(vars(module))
    exec(compile(source.replace(old, new), f"<mutant of {fn.__module__}.{name}>", "exec"), namespace)
    mutated = namespace[fn.__name__]
    if isinstance(original, property):
        mutated = property(mutated)
    if getattr(original, "_is_autograd_primitive", False) and not DRY_RUN:
        from autograd.core import primitive_vjps       # a rebuilt primitive keeps its hand-written VJP
        primitive_vjps[mutated] = primitive_vjps[original]
    if inspect.isclass(owner):
        install(owner, name, mutated)
    else:
        replace_everywhere(original, mutated)


def module(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise NotApplicable(f"{name} cannot be imported: {e}") from None


# The mutants. Each function breaks one thing; its docstring says what.

def children_skip_split_factor():
    """tree.children returns (l+1, j + r) instead of (l+1, s*j + r)."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "children", "cfg.split * index + r", "index + r")


def parent_hardcodes_2():
    """tree.parent divides by 2 whatever the split (the original used 2**level for split**level)."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "parent", "index // cfg.split", "index // 2")


def n_nodes_counts_one_level_too_many():
    """Config.n_nodes sums split**l over levels+1 levels."""
    config = module("tinyfractal.config")
    rewrite(config.Config, "n_nodes", "range(self.levels)", "range(self.levels + 1)")


def view_returns_copies():
    """tree.view hands out copies of the blocks instead of views."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "view", "a[node_slices(cfg, level, index, roles)]", "onp.array(a[node_slices(cfg, level, index, roles)])")


def level_view_returns_copies():
    """tree.level_view stacks copies of the diagonal blocks instead of an as_strided view."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "stacked_blocks_np", "return onp.lib.stride_tricks.as_strided(a, shape, strides)",
            "return onp.array(onp.lib.stride_tricks.as_strided(a, shape, strides))")


def blocks_overlap_by_half():
    """Model (l, j)'s blocks start at j * size / 2: siblings overlap by half a block."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "node_slices", "slice(index * sizes[r], (index + 1) * sizes[r])",
            "slice(index * sizes[r] // 2, index * sizes[r] // 2 + sizes[r])")


def blocks_in_reverse_order():
    """Model (l, j) gets block n-1-j: every level is tiled, but children are not in their parent's order."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "node_slices", "slice(index * sizes[r], (index + 1) * sizes[r])",
            "slice((cfg.split ** level - 1 - index) * sizes[r], (cfg.split ** level - index) * sizes[r])")


def index_mask_of_model_0():
    """tree.index_mask marks model (l, 0)'s entries whatever the index asked for."""
    tree = module("tinyfractal.core.tree")
    rewrite(tree, "index_mask", "node_slices(cfg, level, index, roles)", "node_slices(cfg, level, 0, roles)")


def sub_keeps_the_head_dim():
    """Config.sub shrinks the width but forgets to shrink the head dim."""
    config = module("tinyfractal.config")
    rewrite(config.Config, "sub", "head_dim=self.head_width(level),", "")


def sub_keeps_all_levels():
    """Config.sub keeps all L levels instead of L - l."""
    config = module("tinyfractal.config")
    rewrite(config.Config, "sub", "levels=self.levels - level", "levels=self.levels")


def _patch_view(change):
    tree = module("tinyfractal.core.tree")
    original = tree.view

    def mutated(params, cfg, level, index):
        return change(original(params, cfg, level, index), params, cfg, level, index)
    replace_everywhere(original, mutated)


def out_norm_gain_slice_0():
    """The tied output's norm gain is always slice 0, whatever the model (the original's mistake 4)."""
    tree = module("tinyfractal.core.tree")

    def change(v, params, cfg, level, index):
        v["out_norm"] = params["out_norm"][tree.node_slices(cfg, level, 0, ("R",))]
        return v
    _patch_view(change)


def child_gets_parent_gain_slice():
    """A child's attn_norm gain is the first d_l entries of its parent's gain slice, not its own."""
    def change(v, params, cfg, level, index):
        if level > 0:
            start = (index // cfg.split) * cfg.width(level - 1)
            for layer, full in zip(v["layers"], params["layers"]):
                layer["attn_norm"] = full["attn_norm"][start:start + cfg.width(level)]
        return v
    _patch_view(change)


def level_view_first_column():
    """level_view steps down the first block axis only: model j gets block (j, 0), not the diagonal (j, j)."""
    tree = module("tinyfractal.core.tree")
    original = tree._stacked_shape_strides
    block_roles = getattr(tree, "BLOCK_ROLES", ("R", "M", "C"))

    def mutated(a, roles, n):
        shape = tuple(s // n if r in block_roles else s for s, r in zip(a.shape, roles))
        steps = [st * (s // n) for st, s, r in zip(a.strides, a.shape, roles) if r in block_roles]
        return (n,) + shape, (sum(steps[:1]),) + a.strides
    replace_everywhere(original, mutated)


def stacked_blocks_gradient_halved():
    """The hand-written gradient of stacked_blocks (under level_view) is scaled by 1/2."""
    tree = module("tinyfractal.core.tree")

    def vjp_maker(ans, a, roles, n):
        def vjp(g):
            full = onp.zeros(a.shape, dtype=g.dtype)
            tree.stacked_blocks_np(full, roles, n)[...] = 0.5 * g
            return full
        return vjp
    set_vjp(tree.stacked_blocks, vjp_maker)


def reference_attention_peeks_ahead():
    """The causal mask of the formulas (the reference model, the decoder) lets position t see t+1."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "causal_mask", "<= (Tk - Tq) + onp.arange(Tq)", "<= (Tk - Tq) + 1 + onp.arange(Tq)")


def fast_attention_peeks_ahead():
    """The level-batched attention (ops.causal_attention) masks only from t+2 on: t sees t+1."""
    ops = module("tinyfractal.core.ops")
    rewrite(ops, "causal_attention", "-onp.inf, dtype=dtype), 1)", "-onp.inf, dtype=dtype), 2)")


def fast_rmsnorm_gain_of_model_0():
    """The level-batched rmsnorm gives every model of the level model 0's gain."""
    ops = module("tinyfractal.core.ops")
    import autograd.numpy as np
    original = ops.rmsnorm

    def rmsnorm(x, g, eps):
        return original(x, np.repeat(g[:1], g.shape[0], axis=0), eps)
    replace_everywhere(original, rmsnorm)


def rmsnorm_without_sqrt():
    """rmsnorm (the formula) divides by mean(x^2) + eps instead of its square root."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "rmsnorm", "xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)",
            "(xp.mean(x * x, axis=-1, keepdims=True) + eps)")


def softmax_without_max_shift():
    """softmax (the formula) exponentiates without subtracting the row max: large scores overflow."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "softmax", "xp.exp(x - xp.max(x, axis=-1, keepdims=True))", "xp.exp(x)")


def rope_interleaved_pairs():
    """RoPE pairs (2m, 2m+1) instead of docs/design.md's (m, m + h/2): still a rotation, wrong pairs."""
    formulas = module("tinyfractal.core.formulas")
    import autograd.numpy as anp

    def rope(x, cos, sin, xp=anp):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
        return xp.reshape(xp.stack([y1, y2], axis=-1), x.shape)
    replace_everywhere(formulas.rope, rope)


def rope_reflects():
    """RoPE's second half gets x1*sin - x2*cos: a reflection, not a rotation."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "rope", "x1 * s + x2 * c", "x1 * s - x2 * c")


def rope_ignores_start():
    """rope_tables ignores `start`: every position is rotated as if the text began there."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "rope_tables", "onp.arange(start, start + T", "onp.arange(0, T")


def gelu_wrong_constant():
    """GELU's cubic coefficient is 0.04472 instead of 0.044715 (in the formula)."""
    formulas = module("tinyfractal.core.formulas")
    rewrite(formulas, "gelu", "GELU_K * x * x * x", "0.04472 * x * x * x")


def geglu_gates_the_wrong_branch():
    """The reference MLP applies GELU to the up branch instead of the gate branch."""
    model = module("tinyfractal.core.model")
    rewrite(model, "gated_hidden", "formulas.geglu(np.dot(rows, dense(Wgate)) + bgate, np.dot(rows, dense(Wup)) + bup)",
            "formulas.geglu(np.dot(rows, dense(Wup)) + bup, np.dot(rows, dense(Wgate)) + bgate)")


def rmsnorm_gradient_ignores_the_rms():
    """rmsnorm's gradient treats the root-mean-square as a constant (a custom VJP that forgets a term)."""
    formulas = module("tinyfractal.core.formulas")
    import autograd.numpy as anp
    from autograd.extend import primitive

    @primitive
    def rms(x, eps):
        return onp.sqrt(onp.mean(x * x, axis=-1, keepdims=True) + eps)
    set_vjp(rms, lambda ans, x, eps: lambda g: onp.zeros_like(x))

    def rmsnorm(x, g, eps, xp=anp):
        return x / rms(x, eps) * (1.0 + g)
    replace_everywhere(formulas.rmsnorm, rmsnorm)


def ops_geglu_gradient_drops_a_term():
    """ops.geglu's hand-written gradient forgets the a*sigma*(1-sigma) term of gelu'."""
    ops = module("tinyfractal.core.ops")
    rewrite(ops, "_geglu_vjp", "d *= 1.0 - sg ", "d *= 0.0 ")
    set_vjp(ops.geglu, ops._geglu_vjp, argnums=True)       # the primitive still holds the old VJP maker


def decode_drops_the_last_token():
    """Tokenizer.decode loses the last token."""
    tok = module("tinyfractal.text.bpe")
    rewrite(tok.Tokenizer, "decode", "arr.tolist()]", "arr.tolist()[:-1]]")


def encode_alternates_merges():
    """Every second call to Tokenizer.encode skips all merges (not deterministic)."""
    tok = module("tinyfractal.text.bpe")
    original = tok.Tokenizer.encode
    calls = [0]

    def encode(self, text):
        calls[0] += 1
        return tok.Tokenizer(self.chars, []).encode(text) if calls[0] % 2 == 0 else original(self, text)
    install(tok.Tokenizer, "encode", encode)


def merge_splits_runs():
    """A merge of (a, a) also fires on overlapping pairs, so 'aaa' becomes one token that decodes to 'aa'."""
    tok = module("tinyfractal.text.bpe")
    rewrite(tok, "_merge_pair", "hit &= _run_offsets(x)[:-1] % 2 == 0", "pass")


def unknown_characters_become_id_0():
    """Characters outside the alphabet are silently encoded as id 0."""
    tok = module("tinyfractal.text.bpe")
    rewrite(tok.Tokenizer, "_char_ids", "if not found.all():", "if False:")


def load_skips_the_checksum():
    """checkpoint.load never compares params.npz with the SHA-256 in meta.json."""
    ckpt = module("tinyfractal.training.checkpoint")
    rewrite(ckpt, "_read", 'if hashlib.sha256(data).hexdigest() != info.get("sha256"):', "if False:")


def load_skips_the_meta_checksum():
    """checkpoint.load never compares meta.json with its own checksum (an edited config loads)."""
    ckpt = module("tinyfractal.training.checkpoint")
    rewrite(ckpt, "_read", 'if info.get("meta_sha256") != _digest(info):', "if False:")


def save_rounds_to_float16():
    """checkpoint.save stores every array rounded through float16."""
    ckpt = module("tinyfractal.training.checkpoint")
    rewrite(ckpt, "save", "onp.ascontiguousarray(v)", "onp.ascontiguousarray(v).astype(onp.float16).astype(onp.float32)")


def load_skips_the_shape_check():
    """checkpoint.load trusts the arrays without comparing their shapes with the config."""
    ckpt = module("tinyfractal.training.checkpoint")
    rewrite(ckpt, "load", '_check_shapes(flat, cfg, f"checkpoint {str(path)!r}")', "pass")


def no_kv_heads_check():
    """Config validation forgets that heads must be a multiple of kv_heads."""
    config = module("tinyfractal.config")
    rewrite(config, "validate", "if cfg.heads % cfg.kv_heads:", "if False:")


def split_check_is_an_assert():
    """Config validation reports split < 2 with an AssertionError instead of a ValueError."""
    config = module("tinyfractal.config")
    rewrite(config, "validate", 'raise ValueError(f"split must', 'raise AssertionError(f"split must')


def leaf_head_must_be_4():
    """Config validation refuses a leaf head dim of 2 (a valid config)."""
    config = module("tinyfractal.config")
    rewrite(config, "validate", "leaf_head < 2", "leaf_head < 4")


def decoder_rotates_new_tokens_from_0():
    """The KV-cached decoder rotates the new tokens' q and k as if they stood at position 0, not after the cache."""
    decoder = module("tinyfractal.inference.decoder")
    rewrite(decoder, "attend_cached", "formulas.rope_tables(Tn, h, dec.cfg.rope_theta, L)",
            "formulas.rope_tables(Tn, h, dec.cfg.rope_theta, 0)")


def rollback_keeps_one_slot_too_many():
    """Cache.rollback forgets one slot fewer than asked: a refused draft token stays in the cache."""
    decoder = module("tinyfractal.inference.decoder")
    rewrite(decoder.Cache, "rollback", "self.length = length", "self.length = min(self.length, length + 1)")


def expand_drops_the_last_slot():
    """Cache.expand copies every cached slot but the last into the branches that verify drafts."""
    decoder = module("tinyfractal.inference.decoder")
    rewrite(decoder.Cache, "expand", "b[:, :, :L] = a[:, :, :L]", "b[:, :, :L - 1] = a[:, :, :L - 1]")


def upstream_children_swapped_on_the_fast_path():
    """The level-batched upstream coupling concatenates each parent's children in reverse order."""
    coupled = module("tinyfractal.variants.coupled")
    rewrite(coupled.Upstream, "receive", "order = [position[s * j + r] for j in members[level] for r in range(s)]",
            "order = [position[s * j + s - 1 - r] for j in members[level] for r in range(s)]")


def coupling_scale_ignored_on_the_fast_path():
    """The level-batched coupling adds what a level receives without its learnable scale."""
    coupled = module("tinyfractal.variants.coupled")
    rewrite(coupled.Coupled, "couple", "add = scale[m, layer] * got", "add = got")


def byte_input_reads_the_output_gains():
    """The level-batched byte model weighs the bytes of a group with the output slot gains Q instead of P."""
    byte_model = module("tinyfractal.variants.byte_model")
    rewrite(byte_model, "forward_stacked", 'gain_in = slot_gain(stacked, "P", g)', 'gain_in = slot_gain(stacked, "Q", g)')


def byte_configs_run_as_base():
    """The registry forgets the bytes variant: a byte config is run by the base model."""
    variants = module("tinyfractal.variants")
    rewrite(variants, "name_of", 'if cfg.tokenizer == "bytes":', "if False:")


@dataclass
class Law:
    number: int
    name: str
    files: str
    select: str          # pytest -k expression choosing the law's tests


LAWS = [
    Law(1, "tree shape", "test_laws_tree.py", "tree_shape"),
    Law(2, "views are views", "test_laws_tree.py", "views_are_views"),
    Law(3, "siblings disjoint, children tile parent", "test_laws_tree.py",
        "siblings or tile or index_mask_is"),
    Law(4, "a child of a child is a grandchild", "test_laws_tree.py",
        "grandchild or sub_config or level_of_a_view"),
    Law(5, "a sub-model is a model", "test_laws_model.py", "sub_model_is_a_model"),
    Law(6, "locality", "test_laws_model.py", "locality"),
    Law(7, "isolation", "test_laws_model.py", "isolation"),
    Law(8, "level-batched path = per-node path", "test_laws_model.py", "level_batched"),
    Law(9, "causality", "test_laws_model.py", "causality"),
    Law(10, "operator laws", "test_laws_ops.py", "rmsnorm or softmax or rope or geglu"),
    Law(11, "gradients", "test_laws_ops.py", "gradients"),
    Law(12, "tokenizer", "test_laws_io.py", "tokenizer"),
    Law(13, "checkpoints", "test_laws_io.py", "checkpoint"),
    Law(14, "configs", "test_laws_io.py", "every_valid_config or invalid_config or any_config"),
    Law(15, "cached decoding = full recompute", "test_infer.py test_variants.py test_speculative.py",
        "cached or window or prefill or rollback or with_and_without_cache or speculative_output or greedy"),
    Law(16, "every variant answers for itself", "test_variants.py",
        "registry or fast_path_equals_reference or forward_of_a_view or ensemble"),
]

# (law number, mutant, tests to run or None for the whole law, expected to be caught). The rows
# expected NOT to be caught show a limit of one test on its own, and which other test covers it.
PLAN = [
    (1, children_skip_split_factor, None, True), (1, parent_hardcodes_2, None, True),
    (1, n_nodes_counts_one_level_too_many, None, True),
    (2, view_returns_copies, None, True), (2, level_view_returns_copies, None, True),
    (2, level_view_first_column, None, True),
    (3, blocks_overlap_by_half, None, True), (3, blocks_in_reverse_order, None, True),
    (3, index_mask_of_model_0, None, True),
    (4, sub_keeps_the_head_dim, None, True), (4, sub_keeps_all_levels, None, True),
    (4, blocks_in_reverse_order, "grandchild", False),   # reversal commutes with nesting of views ...
    (4, blocks_in_reverse_order, None, True),            # ... but not with level_view of a view
    (5, out_norm_gain_slice_0, None, True), (5, child_gets_parent_gain_slice, None, True),
    (5, blocks_in_reverse_order, None, True),
    (6, out_norm_gain_slice_0, None, True), (6, child_gets_parent_gain_slice, None, True),
    (6, level_view_first_column, None, True),
    (7, out_norm_gain_slice_0, None, True), (7, child_gets_parent_gain_slice, None, True),
    (7, fast_rmsnorm_gain_of_model_0, None, True),
    (8, level_view_first_column, None, True), (8, fast_rmsnorm_gain_of_model_0, None, True),
    (8, stacked_blocks_gradient_halved, None, True), (8, ops_geglu_gradient_drops_a_term, None, True),
    (9, reference_attention_peeks_ahead, None, True), (9, fast_attention_peeks_ahead, None, True),
    (10, rmsnorm_without_sqrt, None, True), (10, softmax_without_max_shift, None, True),
    (10, rope_reflects, None, True), (10, rope_interleaved_pairs, None, True), (10, rope_ignores_start, None, True),
    (10, rope_interleaved_pairs, "relative_position", False),   # still a rotation: only the half-split-pairs law sees it
    (10, rope_ignores_start, "relative_position", False),       # <q,k> at every position: trivially relative
    (10, gelu_wrong_constant, None, True), (10, geglu_gates_the_wrong_branch, None, True),
    (11, stacked_blocks_gradient_halved, None, True), (11, rmsnorm_gradient_ignores_the_rms, None, True),
    (11, ops_geglu_gradient_drops_a_term, None, True),
    (12, decode_drops_the_last_token, None, True), (12, encode_alternates_merges, None, True),
    (12, merge_splits_runs, None, True), (12, unknown_characters_become_id_0, None, True),
    (13, load_skips_the_checksum, None, True), (13, load_skips_the_meta_checksum, None, True),
    (13, save_rounds_to_float16, None, True),
    (13, load_skips_the_shape_check, None, False),   # unreachable: any edit that changes shapes fails a checksum first
    (14, no_kv_heads_check, None, True), (14, split_check_is_an_assert, None, True),
    (14, leaf_head_must_be_4, None, True),
    (15, decoder_rotates_new_tokens_from_0, None, True), (15, rollback_keeps_one_slot_too_many, None, True),
    (15, expand_drops_the_last_slot, None, True), (15, reference_attention_peeks_ahead, None, True),
    (16, upstream_children_swapped_on_the_fast_path, None, True), (16, coupling_scale_ignored_on_the_fast_path, None, True),
    (16, byte_input_reads_the_output_gains, None, True), (16, byte_configs_run_as_base, None, True),
]
MUTANTS = {fn.__name__: fn for _, fn, _, _ in PLAN}


def activate(name):
    """Apply mutant `name` in this process (called by tests/conftest.py when TINYFRACTAL_MUTANT is set)."""
    if name not in MUTANTS:
        raise NotApplicable(f"unknown mutant; known: {sorted(MUTANTS)}")
    MUTANTS[name]()


def build(name):
    """Build mutant `name` against today's code without installing anything; NotApplicable if it no longer
    applies (tests/test_mutants.py calls this for every mutant)."""
    with dry_run():
        activate(name)


def run_pytest(law, mutant=None, select=None):
    """Run a law's tests in a child process, optionally with a mutant -> (exit code, seconds, last line)."""
    env = {**os.environ, "HYPOTHESIS_PROFILE": "mutants"}
    env.pop("TINYFRACTAL_MUTANT", None)
    if mutant:
        env["TINYFRACTAL_MUTANT"] = mutant
    cmd = [sys.executable, "-m", "pytest", *(str(HERE / f) for f in law.files.split()),
           *(["-k", select or law.select] if select or law.select else []),
           "-p", "no:cacheprovider", "-q", "-x", "-W", "ignore", "--no-header", "-rN"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, time.perf_counter() - t0, lines[-1] if lines else ""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tests/mutants.py", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    parser.add_argument("--law", type=int, action="append", help="run only the mutants of this law (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip checking that every law passes unbroken")
    args = parser.parse_args(argv)
    laws = {law.number: law for law in LAWS}
    if args.list:
        for number, fn, select, expect in PLAN:
            print(f"law {number:2d}  {fn.__name__:36s} {fn.__doc__}" + (f" [only -k {select}]" if select else ""))
        return 0
    plan = [row for row in PLAN if (not args.only or row[1].__name__ in args.only)
            and (not args.law or row[0] in args.law)]
    if not plan:
        print(f"no such mutant or law: {args.only or args.law}; see --list", file=sys.stderr)
        return 2
    if not args.no_baseline:
        everything = Law(0, "all laws", " ".join(sorted({f for law in LAWS for f in law.files.split()})), "")
        code, secs, last = run_pytest(everything)
        print(f"unbroken engine, all law tests: exit {code} {secs:5.1f}s  {last}", flush=True)
        if code != 0:
            print("some law fails on the unbroken engine; fix that first", file=sys.stderr)
            return 1
    rows = []
    for number, fn, select, expect in plan:
        code, secs, last = run_pytest(laws[number], fn.__name__, select)
        caught = {0: "no", 1: "yes", 3: "n/a"}.get(code, f"error (exit {code})")
        rows.append((number, fn, select, expect, caught))
        print(f"law {number:2d}  {fn.__name__:36s} caught: {caught:4s} {secs:5.1f}s  {last}", flush=True)
    print()
    print("| law | mutant: what it breaks | tests run | caught |")
    print("|---|---|---|---|")
    for number, fn, select, expect, caught in rows:
        note = "" if expect else " (expected: a limit of this test alone)"
        print(f"| {number}. {laws[number].name} | `{fn.__name__}`: {fn.__doc__} | "
              f"{'-k ' + select if select else 'all of law ' + str(number)} | {caught}{note} |")
    run_laws = {row[0] for row in rows}
    missed = sorted(n for n in run_laws if not any(r[0] == n and r[4] == "yes" for r in rows))
    surprises = [r[1].__name__ for r in rows if (r[4] == "yes") != r[3]]
    print()
    print(f"{len(rows)} runs, {sum(r[4] == 'yes' for r in rows)} caught; laws never caught: {missed or 'none'}; "
          f"outcomes other than expected: {surprises or 'none'}")
    return 0 if not missed and not surprises else 1


if __name__ == "__main__":
    sys.exit(main())
