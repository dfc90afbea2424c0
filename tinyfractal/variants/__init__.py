"""The variants of FractalFormer behind one interface, and the one place that asks which one a config is.

A variant is the base tree, or the base tree changed in one way:

  base        every node runs alone (variants/base.py)
  upstream    after each layer a parent adds its children's states (variants/coupled.py)
  downstream  after each layer a child adds its slice of its parent's state (variants/coupled.py)
  bytes       the leaves read bytes and each level up reads groups of bytes, "concepts" (variants/byte_model.py)

Every variant answers the same questions (the methods of `Variant`), so generic code (training,
evaluation, sampling, speculative decoding, ensembles, merging, growing, tracing) never branches on a
config field: it asks `variant_of(cfg)` and calls the answer. A variant that cannot do something says
so with `unsupported`, a ValueError that names the variant.

Modules are imported only when a config of that variant is first used (as tinygrad's device table does),
so `import tinyfractal` stays light. The interface itself, `Variant`, lives in variants/interface.py, which
the variant modules import: they never import this registry (that would be an import cycle), so code that
must ask "which variant is this config?" sits above them (api.py and the generic code that uses it).
"""
import importlib

from tinyfractal.variants.interface import FEATURES, Variant, unsupported  # noqa: F401  (re-exported)

# name -> (module, class): the registry. Order is the order of the docs and of the parametrized tests.
REGISTRY = {
    "base": ("tinyfractal.variants.base", "Base"),
    "upstream": ("tinyfractal.variants.coupled", "Upstream"),
    "downstream": ("tinyfractal.variants.coupled", "Downstream"),
    "bytes": ("tinyfractal.variants.byte_model", "Bytes"),
}
NAMES = tuple(REGISTRY)
_loaded = {}


def name_of(cfg):
    """The variant's name, read off the config: THE place where config fields choose the variant."""
    if cfg.tokenizer == "bytes":
        return "bytes"
    return "base" if cfg.coupling == "none" else cfg.coupling


def get(name):
    """The variant object registered under `name` (its module is imported on first use)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown variant {name!r}; the variants are {list(NAMES)}")
    if name not in _loaded:
        module, cls = REGISTRY[name]
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def variant_of(cfg):
    """The variant that runs this config."""
    return get(name_of(cfg))
