"""The model's hyperparameters: a frozen dataclass, its presets, and `sub(level)`.

Everything about sizes lives here, so the rest of the code asks the config instead of
recomputing `D // split**level` in many places.
"""
import dataclasses
import math
import numbers
from dataclasses import dataclass

from tinyfractal.validate import parameter_count


@dataclass(frozen=True)
class Config:
    """A FractalFormer. Level 0 is the whole model; level l holds split**l models of width hidden/split**l."""
    vocab_size: int = None              # None: what the variant reads (128 BPE tokens, or 256 bytes)
    context: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 16
    hidden: int = 64
    mlp_mult: int = 4
    levels: int = 3
    split: int = 2
    rope_theta: float = 100.0
    eps: float = 1e-6
    dropout: float = 0.0
    coupling: str = "none"              # none | upstream | downstream: residual links between levels
    coupling_cumulative: bool = False   # pass already-coupled states, so a signal crosses levels in one layer
    coupling_sublayer: bool = False     # pass only the layer's attention + MLP outputs, not the whole state
    coupling_scale_init: float = 1.0    # start of the learnable scale per (level, layer); 0 starts as base
    tokenizer: str = "bpe"              # bpe | bytes: bytes reads UTF-8, upper levels in groups (variants/byte_model.py)
    # Options found by the nesting-tax study (lessons/tax.md); faithful() or preset 'seed' turn them off.
    logit_scale: str = "learned"        # none | sqrt | learned: each node's logits times (1 + its own gain) / sqrt(d_l)
    node_gains: bool = True             # each node its own output gain, not a slice of its parent's (model.output_gain)
    nested_init: bool = True            # each weight entry starts as its deepest owner's would alone (base_params)

    def __post_init__(self):
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", 256 if self.tokenizer == "bytes" else 128)
        validate(self)

    @property
    def variant(self):
        """The variant's name: base, upstream, downstream or bytes (variants/__init__.py)."""
        from tinyfractal.variants import name_of
        return name_of(self)

    @staticmethod
    def preset(name):
        """A named config: 'original' (the seed's shape), 'seed' (that shape with the prototype's output and init:
        original.faithful()), 'tiny' (the classroom), 'micro' (tests), 'sierpinski' (split=3)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return Config(**PRESETS[name])

    @property
    def mlp_hidden(self):
        return self.mlp_mult * self.hidden

    def n_models(self, level):
        """How many models sit at a level: split**level."""
        return self.split ** level

    def width(self, level):
        """Residual width d_l of one model at this level."""
        return self.hidden // self.split ** level

    def head_width(self, level):
        """Head dim h_l of one model at this level (every level keeps all the heads)."""
        return self.head_dim // self.split ** level

    def mlp_width(self, level):
        """MLP width f_l of one model at this level."""
        return self.mlp_hidden // self.split ** level

    @property
    def n_nodes(self):
        """Models in the whole tree: 1 + s + ... + s**(L-1)."""
        return sum(self.split ** level for level in range(self.levels))

    def check_level(self, level):
        """level as an int, or ValueError: an integer (Python or NumPy) in [0, levels)."""
        if not _is_int(level) or not 0 <= level < self.levels:
            raise ValueError(f"level {_show(level)} is out of range; this config has levels 0..{self.levels - 1}")
        return int(level)

    def check_node(self, level, index):
        """(level, index) as ints, or ValueError: index in [0, split**level)."""
        level = self.check_level(level)
        n = self.n_models(level)
        if not _is_int(index) or not 0 <= index < n:
            raise ValueError(f"model index {_show(index)} is out of range at level {level}; valid indices are 0..{n - 1}")
        return level, int(index)

    def sub(self, level):
        """The config of one model at `level`: width D/s^l, head dim hd/s^l, levels L-l."""
        level = self.check_level(level)
        return dataclasses.replace(self, hidden=self.width(level), head_dim=self.head_width(level),
                                   levels=self.levels - level)

    def faithful(self):
        """This config with the prototype's exact output for every option of the nesting-tax study
        (FAITHFUL: no logit scale, gains only as slices of the parent's, the root's init for every entry),
        whatever the defaults are."""
        return self.override(**FAITHFUL)

    def to_dict(self):
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d):
        """Rebuild a config from `to_dict()` output, refusing unknown or missing fields.

        Every field must be present: a dict that lacks one is not a config this code wrote, and
        filling in a default could silently build another model. (Checkpoints from before a field
        existed are completed explicitly by checkpoint.py, which knows what those versions meant.)
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields are {sorted(names)}")
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"the config is missing fields {missing}; Config.to_dict() writes all of "
                             f"{sorted(names)}")
        return Config(**{k: _coerce(k, v) for k, v in d.items()})

    def override(self, **changes):
        """A copy with some fields changed (strings are parsed to the field's type); validated.

        Choosing the tokenizer chooses what it implies: vocab_size follows it unless it is given too.
        """
        names = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields are {sorted(names)}")
        changes = {k: _coerce(k, v) for k, v in changes.items()}
        if "tokenizer" in changes and "vocab_size" not in changes:
            changes["vocab_size"] = None
        return dataclasses.replace(self, **changes)


PRESETS = {
    # The prototype's hyperparameters (docs/design.md, "the original").
    "original": dict(vocab_size=128, context=256, layers=4, heads=4, kv_heads=1, head_dim=32, hidden=128,
                     mlp_mult=4, levels=3, split=2, rope_theta=100.0, eps=1e-6, dropout=0.0),
    # The classroom size: seven models that all learn within a few minutes on a laptop CPU.
    "tiny": dict(vocab_size=128, context=64, layers=2, heads=4, kv_heads=1, head_dim=16, hidden=96,
                 mlp_mult=4, levels=3, split=2, rope_theta=100.0, eps=1e-6, dropout=0.0),
    # The Sierpinski picture: every model holds three children.
    "sierpinski": dict(vocab_size=128, context=64, layers=2, heads=3, kv_heads=1, head_dim=18, hidden=108,
                       mlp_mult=2, levels=3, split=3, rope_theta=100.0, eps=1e-6, dropout=0.0),
    # Small enough for unit tests to run in milliseconds.
    "micro": dict(vocab_size=128, context=16, layers=1, heads=2, kv_heads=1, head_dim=8, hidden=16,
                  mlp_mult=2, levels=2, split=2, rope_theta=100.0, eps=1e-6, dropout=0.0),
}

# The prototype's choice for each model option that `python -m tinyfractal.study tax` measures.
FAITHFUL = dict(logit_scale="none", node_gains=False, nested_init=False)
# The prototype exactly: the original shape with its output and init (no logit scale, the root's init).
PRESETS["seed"] = {**PRESETS["original"], **FAITHFUL}

_INT_FIELDS = ("vocab_size", "context", "layers", "heads", "kv_heads", "head_dim", "hidden", "mlp_mult",
               "levels", "split")
_FLOAT_FIELDS = ("rope_theta", "eps", "dropout", "coupling_scale_init")
_BOOL_FIELDS = ("coupling_cumulative", "coupling_sublayer", "node_gains", "nested_init")
COUPLINGS = ("none", "upstream", "downstream")
LOGIT_SCALES = ("none", "sqrt", "learned")
TOKENIZERS = ("bpe", "bytes")


def _is_int(x):
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _show(x):
    """An index for an error message: NumPy integers print as plain numbers."""
    return int(x) if _is_int(x) else repr(x)


def _coerce(name, value):
    """Parse a command-line string (or JSON value) into the field's type, or explain why not."""
    if name in _INT_FIELDS:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"config field {name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name} must be an integer, got {value!r}") from None
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool):
            raise ValueError(f"config field {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name} must be a number, got {value!r}") from None
    if name in _BOOL_FIELDS and isinstance(value, str):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if value.strip().lower() not in words:
            raise ValueError(f"config field {name} must be true or false, got {value!r}")
        return words[value.strip().lower()]
    return value


# Sizes beyond these are refused as absurd rather than attempted: a NumPy engine on a CPU cannot
# hold or train them, and a typo (vocab_size=1e12) should not start allocating terabytes.
MAX_FIELD = 1 << 24        # any one integer field (context, hidden, vocab_size, ...)
MAX_PARAMS = 1 << 31       # numbers in the shared arrays: 8 GiB as float32, 32 GiB with gradients and AdamW


def validate(cfg):
    """Raise ValueError naming the first broken constraint of a config."""
    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"config field {name} must be an integer, got {v!r}")
        if v <= 0:
            raise ValueError(f"config field {name} must be positive, got {v}")
        if v > MAX_FIELD:
            raise ValueError(f"config field {name}={v} is absurdly large; the limit is {MAX_FIELD} (2**24)")
    for name in ("rope_theta", "eps"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"config field {name} must be a positive finite number, got {v!r}")
    if cfg.eps > 1:   # rmsnorm divides by sqrt(mean(x^2) + eps); a huge eps flattens every activation to 0
        raise ValueError(f"config field eps must be a positive number <= 1 (it is added to the mean square of "
                         f"unit-scale activations; typical values are 1e-6 to 1e-5), got {cfg.eps!r}")
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1:
        raise ValueError(f"config field dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"config field tokenizer must be one of {list(TOKENIZERS)}, got {cfg.tokenizer!r}")
    if cfg.split < 2:
        raise ValueError(f"split must be an integer >= 2, got {cfg.split}")
    smallest = cfg.split ** (cfg.levels - 1)
    if cfg.hidden % smallest:
        raise ValueError(f"hidden={cfg.hidden} must be divisible by split**(levels-1) = {smallest} "
                         f"so every level has a whole width")
    if cfg.head_dim % smallest:
        raise ValueError(f"head_dim={cfg.head_dim} must be divisible by split**(levels-1) = {smallest} "
                         f"so every level has a whole head dim")
    leaf_head = cfg.head_dim // smallest
    if leaf_head < 2 or leaf_head % 2:
        raise ValueError(f"the head dim at the smallest level is {leaf_head} (head_dim={cfg.head_dim} / {smallest}); "
                         f"RoPE needs it even and >= 2")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"heads={cfg.heads} must be a multiple of kv_heads={cfg.kv_heads}")
    if cfg.logit_scale not in LOGIT_SCALES:
        raise ValueError(f"config field logit_scale must be one of {list(LOGIT_SCALES)}, got {cfg.logit_scale!r}")
    if cfg.coupling not in COUPLINGS:
        raise ValueError(f"config field coupling must be one of {list(COUPLINGS)}, got {cfg.coupling!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"config field {name} must be true or false, got {getattr(cfg, name)!r}")
    v = cfg.coupling_scale_init
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) < float("inf"):
        raise ValueError(f"config field coupling_scale_init must be a finite number, got {v!r}")
    from tinyfractal.variants import variant_of
    variant_of(cfg).validate(cfg)
    n = parameter_count(cfg)
    if n > MAX_PARAMS:
        raise ValueError(f"this config has {n:.3g} parameters ({4 * n / 2 ** 30:.3g} GiB as float32); the limit "
                         f"is 2**31 = {MAX_PARAMS:.3g} (vocab_size={cfg.vocab_size}, hidden={cfg.hidden}, "
                         f"layers={cfg.layers}, mlp_mult={cfg.mlp_mult}, heads={cfg.heads}, head_dim={cfg.head_dim})")
