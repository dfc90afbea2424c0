"""The shape trace: one forward pass of one model of the tree, op by op.

For every step of the reference forward (core/model.py) it prints the step, the slices of the shared
arrays it read, and its input and output shapes, like the print statements of the original notebook.
Nothing in the model knows it is traced: `tracing` wraps the model's step functions from outside for
the duration of one pass. The slices are not recomputed from the index formulas of tree.py: `locate`
reads them off the memory addresses of the views the forward really used, so a wrong view would print
a wrong slice (and the trace marks any slice that differs from the role table of docs/design.md).

    python -m tinyfractal trace --preset tiny --level 2 --index 1
    from tinyfractal.tools.trace import trace_node; steps = trace_node(params, cfg, 2, 1, ids)
"""
import contextlib
import inspect
from dataclasses import dataclass, field

import numpy as onp

from tinyfractal.core import model
from tinyfractal.core.model import count_params, forward
from tinyfractal.core.tree import flatten, node_slices, roles_of, view
from tinyfractal.variants import variant_of

# The step functions of core/model.py that a trace wraps, and how each is printed ({} = the norm's gain; a
# function gets the names of the per-node tables the step read, and a step that read none is not shown).
STEPS = {
    "embed": "x = rmsnorm(E[ids], emb_norm)",
    "norm": "rmsnorm(x, {})",
    "project_qkv": "q, k, v = x Wq, x Wk, x Wv",
    "rotate": "rope on q, k (pairs m, m + h/2)",
    "attention_weights": "softmax(q k^T / sqrt(h), causal)",
    "mix_heads": "attn out = (probs v) Wo",
    "gated_hidden": "hidden = gelu(x Wgate + bgate) * (x Wup + bup)",
    "down": "mlp out = hidden Wdown + bdown",
    "output_table": "tied output: rmsnorm(E, out_norm)",
    "gain_of": lambda tables: f"g_out = output_gain({', '.join(tables)})",
    "logits_of": "logits = rmsnorm(x, final_norm) g_out out_emb^T",
}
ACTIVATIONS = {"x", "ids", "q", "k", "v", "probs", "hidden", "table"}   # step arguments that are not weights
DERIVED = {"g_out"}   # step arguments computed by an earlier step (gain_of's output gain): neither input nor weight


def _address(a):
    return a.__array_interface__["data"][0]


def locate(v, base):
    """The tuple of slices s with base[s] the same memory as view v, or None if v is not such a slice.

    Works from addresses: the byte offset of v inside base, split along base's strides, gives the
    start of v on every axis; the answer is then checked by slicing base and comparing addresses.
    """
    if not isinstance(v, onp.ndarray) or v.dtype != base.dtype or v.ndim != base.ndim:
        return None
    if v.strides != base.strides or not onp.may_share_memory(v, base):
        return None
    offset = _address(v) - _address(base)
    if offset < 0:
        return None
    starts = [0] * base.ndim
    for axis in sorted(range(base.ndim), key=lambda a: -base.strides[a]):
        if base.strides[axis] > 0:
            starts[axis], offset = divmod(offset, base.strides[axis])
    if offset:
        return None
    index = tuple(slice(s, s + n) for s, n in zip(starts, v.shape))
    found = base[index]
    if found.shape != v.shape or _address(found) != _address(v):
        return None
    return index


def format_index(index, shape):
    """(slice(24, 48), slice(None)) -> '24:48, :' (a slice over a whole axis prints as ':')."""
    parts = []
    for s, n in zip(index, shape):
        start, stop, _ = s.indices(n)
        parts.append(":" if (start, stop) == (0, n) else f"{start}:{stop}")
    return ", ".join(parts)


def format_shape(x):
    """An array -> '(1,8,24)'; a tuple of arrays -> their shapes side by side; None -> '-'."""
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return " ".join(format_shape(a) for a in x)
    return "(" + ",".join(str(n) for n in onp.shape(x)) + ")"


@dataclass
class Step:
    """One traced op: its layer (None outside the layers), name, the slices it read, in/out shapes."""
    layer: object
    op: str
    uses: list = field(default_factory=list)       # [(flat name, index, full shape, expected index)]
    shape_in: str = "-"
    shape_out: str = "-"
    output: object = None       # the step's result, kept only by a Tracer(keep_outputs=True)

    def mismatches(self):
        return [name for name, index, _, expected in self.uses if index != expected]


class Tracer:
    """Records the Steps of one traced pass (see `tracing`).

    `params` are the full shared arrays, the view given to forward must be cut from them.
    """

    def __init__(self, params, cfg, level, index, keep_outputs=False):
        self.keep_outputs = keep_outputs
        self.flat = flatten(params)
        self.cfg, self.level, self.index = cfg, level, index
        self.steps = []
        self._layer = None

    def find(self, v):
        """(flat name, index) of the shared array that view v lives in; ValueError if none holds it."""
        found = self.owner(v)
        if found is None:
            raise ValueError(f"an op read an array of shape {onp.shape(v)} that is not a slice of the shared "
                             f"arrays; trace a view of the same params that were given to the Tracer")
        return found

    def owner(self, v):
        """(flat name, index) of the shared array that v is a slice of, or None (an activation)."""
        for name, base in self.flat.items():
            index = locate(v, base)
            if index is not None:
                return name, index
        return None

    def wrap(self, step, fn):
        """fn, recording a Step each time it runs. Its array arguments named in ACTIVATIONS are its input;
        every other array argument is a weight, which must be a slice of the shared arrays."""
        names = list(inspect.signature(fn).parameters)

        def traced(*args):
            out = fn(*args)
            weights, inputs = {}, []
            for name, a in zip(names, args):
                if name in DERIVED:
                    continue
                if name in ACTIVATIONS:
                    inputs.append(a)
                elif isinstance(a, onp.ndarray):
                    weights[self.find(a)[0].split(".")[-1]] = a
            x = inputs[0] if len(inputs) == 1 else (tuple(inputs) or None)
            if callable(STEPS[step]):
                if weights:
                    self(STEPS[step](list(weights)), weights, x, out)
            else:
                self(STEPS[step].format(*weights), weights, x, out)
            return out
        return traced


    def __call__(self, op, weights, x, out):
        uses = []
        for key, v in weights.items():
            name, index = self.find(v)
            if name.split(".")[-1] != key:
                raise ValueError(f"op {op!r} reads {key}, but that memory belongs to {name}")
            expected = node_slices(self.cfg, self.level, self.index, roles_of(name))
            expected = tuple(slice(*s.indices(n)[:2]) for s, n in zip(expected, self.flat[name].shape))
            uses.append((name, index, self.flat[name].shape, expected))
        if uses:  # an op without weights (rope, softmax) belongs to the layer of the op before it
            layers = {int(name.split(".")[1]) for name, *_ in uses if name.startswith("layers.")}
            self._layer = layers.pop() if layers else None
        self.steps.append(Step(self._layer, op, uses, format_shape(x), format_shape(out),
                               out if self.keep_outputs else None))


@contextlib.contextmanager
def tracing(tracer):
    """Within this block, every step function of core/model.py reports to `tracer` (restored after)."""
    originals = {name: getattr(model, name) for name in STEPS}
    try:
        for name, fn in originals.items():
            setattr(model, name, tracer.wrap(name, fn))
        yield tracer
    finally:
        for name, fn in originals.items():
            setattr(model, name, fn)


def trace_node(params, cfg, level, index, ids, log=print):
    """Run model (level, index) on ids (B,T) with the trace on; print every op with log; return the Steps."""
    variant_of(cfg).require("trace", "the shape trace")
    cfg.check_node(level, index)
    ids = onp.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a (B,T) array of token ids, got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[1] > cfg.context:
        raise ValueError(f"the input has {ids.shape[1]} tokens but the context is {cfg.context}")
    tracer = Tracer(params, cfg, level, index)
    node_params = view(params, cfg, level, index)
    with tracing(tracer):
        logits = forward(node_params, cfg.sub(level), ids)
    for line in format_trace(tracer.steps, cfg, level, index, count_params(node_params), logits.shape):
        log(line)
    return tracer.steps


def format_trace(steps, cfg, level, index, n_params, logits_shape):
    """The printed trace, as text lines."""
    d, h, f = cfg.width(level), cfg.head_width(level), cfg.mlp_width(level)
    lines = [f"model ({level},{index}) of {cfg.n_nodes}: width d={d}, head dim h={h} in each of {cfg.heads} "
             f"query heads and {cfg.kv_heads} kv head{'s' if cfg.kv_heads > 1 else ''}, mlp width f={f}, {n_params:,} parameters",
             f"it owns residual coords {index * d}:{(index + 1) * d} of {cfg.hidden}, mlp coords "
             f"{index * f}:{(index + 1) * f} of {cfg.mlp_hidden}, and coords {index * h}:{(index + 1) * h} "
             f"inside every head of {cfg.head_dim}",
             f"{'layer':<6}{'op':<48}{'in':<28}{'out'}"]
    for step in steps:
        where = "" if step.layer is None else str(step.layer)
        lines.append(f"{where:<6}{step.op:<48}{step.shape_in:<28}{step.shape_out}")
        for name, idx, shape, expected in step.uses:
            short = name.split(".")[-1]
            full = "(" + ",".join(str(n) for n in shape) + ")"
            mark = "" if idx == expected else f"   !! the role table says [{format_index(expected, shape)}]"
            lines.append(f"{'':<8}reads {short}[{format_index(idx, shape)}] of {full}{mark}")
    bad = sum(len(s.mismatches()) for s in steps)
    lines.append(f"logits {format_shape(onp.zeros(logits_shape))}; "
                 + ("every slice above matches the role table (docs/design.md)" if bad == 0
                    else f"{bad} slices differ from the role table (docs/design.md)"))
    return lines


def arguments(p):
    """The arguments of `python -m tinyfractal trace` (cli.py's command table names this function)."""
    p.add_argument("--preset", default="tiny")
    p.add_argument("--ckpt", default=None, help="trace a trained checkpoint instead of a fresh preset")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--prompt", default="First Citizen:")
    p.add_argument("--seed", type=int, default=0, help="init seed when no --ckpt is given")
    p.set_defaults(run=run_trace, overrides=True)


def run_trace(args, extra):
    from tinyfractal.cli_args import parse_overrides
    from tinyfractal.config import Config
    from tinyfractal.api import init_params
    from tinyfractal.text.bpe import Tokenizer
    if args.ckpt:
        if extra:
            raise ValueError("--key=value config overrides apply to a fresh --preset, not to a --ckpt")
        from tinyfractal.training.checkpoint import load
        params, cfg, _ = load(args.ckpt)
    else:
        cfg = Config.preset(args.preset).override(**parse_overrides(extra))
        params = init_params(cfg, args.seed)
    cfg.check_node(args.level, args.index)
    variant_of(cfg).require("trace", "the shape trace")
    tok = Tokenizer.default()
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the config's vocab_size is {cfg.vocab_size}")
    ids = onp.array([tok.encode(args.prompt)], dtype=onp.int64)
    if ids.shape[1] == 0:
        raise ValueError("--prompt must not be empty")
    print(f"prompt {args.prompt!r} -> {ids.shape[1]} tokens {ids[0].tolist()}")
    steps = trace_node(params, cfg, args.level, args.index, ids)
    return 0 if not any(s.mismatches() for s in steps) else 1
