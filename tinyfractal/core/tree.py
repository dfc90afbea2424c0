"""The fractal tree: which models exist, and how each one is cut out of the shared arrays.

Every parameter array has, for each of its axes, a *role*:
  "R"  residual coordinates  (length D at level 0, d_l = D/s^l for one model at level l)
  "M"  MLP coordinates       (length F, f_l = F/s^l)
  "C"  coordinates inside one head (length hd, h_l = hd/s^l)
  "L"  levels of the tree, for per-level arrays (coupled models' scales, per-node output gains):
       model (l, j) sees rows [l:], because as a tree of its own its level 0 is level l of the whole
       tree; with an "R" axis too, row l's columns R belong to node (l, j) and to no other node
  "G"  slots of the byte groups of a byte model (concepts.py): level k of L owns g_k = s^(L-1-k) rows
       starting at slot_offset(k) (leaves, g = 1, own none); model (l, j) sees rows [slot_offset(l):],
       the slots of its own level and of the levels below it, for the same reason as "L"
  None an axis every model shares whole (vocabulary, heads)
Model (l, j) owns the j-th block of length d_l, f_l or h_l along every role axis, so its weights are
basic slices of the full arrays, which NumPy returns as views: no copies, one set of numbers.
"""
import numpy as onp
from autograd.extend import primitive, defvjp


ROLES = {
    "E": (None, "R"),
    "emb_norm": ("R",), "final_norm": ("R",), "out_norm": ("R",),
    "coupling_scale": ("L", None),   # (levels, layers), only in coupled models (coupling.py)
    "P": ("G", "R"), "Q": ("G", "R"),  # (slots, D) input and output gain per byte slot, only in byte models
    # (levels, D), only with logit_scale="learned" / node_gains: node (l, j) owns row l, columns R, alone
    "logit_gain": ("L", "R"), "node_gain": ("L", "R"),
}
LAYER_ROLES = {
    "attn_norm": ("R",), "mlp_norm": ("R",),
    "Wq": ("R", None, "C"), "Wk": ("R", None, "C"), "Wv": ("R", None, "C"),
    "Wo": (None, "C", "R"),
    "Wgate": ("R", "M"), "Wup": ("R", "M"), "bgate": ("M",), "bup": ("M",),
    "Wdown": ("M", "R"), "bdown": ("R",),
}
NO_DECAY = {"emb_norm", "final_norm", "out_norm", "attn_norm", "mlp_norm", "bgate", "bup", "bdown",
            "coupling_scale", "P", "Q", "logit_gain", "node_gain"}
BLOCK_ROLES = ("R", "M", "C")
LEVEL_ROLES = ("L", "G")


def nodes(cfg):
    """Every (level, index) of the tree, level by level: [(0,0), (1,0), (1,1), (2,0), ...]."""
    return [(level, j) for level in range(cfg.levels) for j in range(cfg.split ** level)]


def parent(cfg, level, index):
    """The node one level up that holds (level, index), or None for the root."""
    cfg.check_node(level, index)
    return None if level == 0 else (level - 1, index // cfg.split)


def children(cfg, level, index):
    """The split nodes one level down, in the order their slices tile this node's slices."""
    cfg.check_node(level, index)
    if level == cfg.levels - 1:
        return []
    return [(level + 1, cfg.split * index + r) for r in range(cfg.split)]


def group_size(cfg, level):
    """Bytes per position of a byte model at this level: g_l = split^(L-1-l) (1 at the leaves)."""
    return cfg.split ** (cfg.levels - 1 - level)


def slot_offset(cfg, level):
    """First row of this level's slots in a byte model's P and Q: g_0 + ... + g_(l-1)."""
    return sum(group_size(cfg, k) for k in range(level))


def level_rows(cfg, level, role):
    """The rows of an "L" or "G" axis that a model at `level` reads: its own level's and those below."""
    return slice(level, None) if role == "L" else slice(slot_offset(cfg, level), None)


def block_sizes(cfg, level):
    """Length of one model's block along each role axis at this level."""
    return {"R": cfg.width(level), "M": cfg.mlp_width(level), "C": cfg.head_width(level)}


def map_roles(fn, params, *rest):
    """Apply fn(array, roles, *matching arrays of `rest`) to every array, keeping the params structure."""
    out = {}
    for key, value in params.items():
        if key == "layers":
            out["layers"] = [
                {k: fn(layer[k], LAYER_ROLES[k], *(r["layers"][i][k] for r in rest)) for k in layer}
                for i, layer in enumerate(value)]
        else:
            out[key] = fn(value, ROLES[key], *(r[key] for r in rest))
    return out


def flatten(params):
    """{'E': .., 'layers.0.Wq': ..}: the flat name -> array dict that checkpoints and the optimizer use."""
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(params.get("layers", [])):
        flat.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return flat


def unflatten(flat):
    """The inverse of `flatten`."""
    params, layers = {}, {}
    for name, value in flat.items():
        if name.startswith("layers."):
            _, i, k = name.split(".", 2)
            layers.setdefault(int(i), {})[k] = value
        else:
            params[name] = value
    params["layers"] = [layers[i] for i in sorted(layers)]
    return params


def roles_of(name):
    """Roles of a flat parameter name such as 'layers.3.Wq'."""
    return LAYER_ROLES[name.split(".")[-1]] if name.startswith("layers.") else ROLES[name]


def node_slices(cfg, level, index, roles):
    """The index of model (level, index) inside an array with these axis roles: a tuple of slices."""
    cfg.check_node(level, index)
    sizes = block_sizes(cfg, level)
    return tuple(level_rows(cfg, level, r) if r in LEVEL_ROLES else
                 slice(index * sizes[r], (index + 1) * sizes[r]) if r else slice(None) for r in roles)


def view(params, cfg, level, index):
    """The parameters of model (level, index) as views of the shared arrays.

    The result is a params dict for `cfg.sub(level)`, so the same forward code runs it.
    """
    level, index = cfg.check_node(level, index)
    return map_roles(lambda a, roles: a[node_slices(cfg, level, index, roles)], params)


def _stacked_shape_strides(a, roles, n):
    """Shape and strides of the n diagonal blocks of `a`, stacked on a new leading axis.

    Block j starts at offset j * (sum over role axes of stride * block length), so one extra
    stride on the front turns the full array into the stack of its diagonal blocks: a view.
    """
    shape = tuple(s // n if r in BLOCK_ROLES else s for s, r in zip(a.shape, roles))
    step = sum(st * (s // n) for st, s, r in zip(a.strides, a.shape, roles) if r in BLOCK_ROLES)
    return (n,) + shape, (step,) + a.strides


def stacked_blocks_np(a, roles, n):
    """(.., X, ..) -> (n, .., X/n, ..): the n diagonal blocks of a plain ndarray, as a writeable view."""
    shape, strides = _stacked_shape_strides(a, roles, n)
    return onp.lib.stride_tricks.as_strided(a, shape, strides)


@primitive
def stacked_blocks(a, roles, n):
    """Differentiable `stacked_blocks_np`: the gradient lands on the diagonal blocks, zeros elsewhere."""
    return stacked_blocks_np(a, roles, n)


def _stacked_blocks_vjp(ans, a, roles, n):
    def vjp(g):
        if not any(r in BLOCK_ROLES for r in roles):
            return onp.sum(g, axis=0)        # all n entries are the same memory: their gradients add
        full = onp.zeros(a.shape, dtype=g.dtype)
        stacked_blocks_np(full, roles, n)[...] = g
        return full
    return vjp


defvjp(stacked_blocks, _stacked_blocks_vjp)


def level_view(params, cfg, level):
    """All models of one level at once: every array becomes (N, ...) with N = split**level.

    Entry [j] of each stacked array is the same memory as `view(params, cfg, level, j)`.
    """
    level = cfg.check_level(level)
    n = cfg.n_models(level)

    def stack(a, roles):
        if any(r in LEVEL_ROLES for r in roles):   # every model of the level shares these rows
            a = a[tuple(level_rows(cfg, level, r) if r in LEVEL_ROLES else slice(None) for r in roles)]
        return stacked_blocks(a, roles, n)
    return map_roles(stack, params)


def index_mask(params, cfg, level, index):
    """Boolean arrays, True where model (level, index) owns the entry: its index set."""
    def mark(a, roles):
        m = onp.zeros(a.shape, dtype=bool)
        m[node_slices(cfg, level, index, roles)] = True
        return m
    return map_roles(mark, params)
