"""Coupled trees: residual connections between the levels (docs/design.md, "variants").

In the base model every node runs alone. Here the nodes talk after every layer i:

  upstream    each parent (l, j) adds  scale[l, i] * concat(states of its children, in order).
              The children's widths add up to the parent's, and their slices tile the parent's
              slice, so child r lands on coordinates [r*d_(l+1), (r+1)*d_(l+1)) of the parent.
              Leaves receive nothing. Running node (l, j) means running its whole subtree.
  downstream  each child (l, k) adds  scale[l, i] * (slice R of its parent (l-1, k//s)'s state),
              the parent's coordinates [r*d_l, (r+1)*d_l) with r = k mod s. The root receives
              nothing. Running node (l, k) means running its chain of ancestors.

What is sent is, by default, the sender's state after layer i's attention and MLP and before this
layer's coupling. Options (Config fields):
  coupling_cumulative  send the state after its own coupling, so one layer carries a signal across
                       several levels (upstream works bottom-up, downstream top-down);
  coupling_sublayer    send only the layer's attention + MLP outputs, not the whole state;
  coupling_scale_init  the learnable scale `coupling_scale` (levels, layers), indexed by the receiving
                       level, starts here: 0 gives exactly the base model at step 0.

The two directions differ only in which nodes a node needs (`members`), the order levels are visited
(senders before receivers) and how a level's received states are gathered (`receive`). Everything
else is shared: the level-batched path (`forward_tree`, states of level l as one (N_l, ..., d_l) array,
so gathering children is a reshape), the node-by-node reference (`forward_nodes_reference`, with
model.py's layer), and the decoder hooks. A set of members is {level: sorted model indices}.
"""
import numpy as onp
import autograd.numpy as np

from tinyfractal.core import fast, flops, model
from tinyfractal.core.tree import children, level_view, map_roles, nodes, parent, view
from tinyfractal.variants.interface import FEATURES, unsupported
from tinyfractal.variants.base import Base


def concat_children(x, s):
    """Each parent's s children's states side by side. (s*N, ..., d) -> (N, ..., s*d)."""
    N, rest, d = x.shape[0] // s, x.shape[1:-1], x.shape[-1]
    x = np.reshape(x, (N, s) + rest + (d,))                                  # (N,s,...,d)
    order = (0,) + tuple(range(2, 2 + len(rest))) + (1, 2 + len(rest))       # (N,...,s,d)
    return np.reshape(np.transpose(x, order), (N,) + rest + (s * d,))


def split_to_children(x, s):
    """Each parent's state cut into s slices, one per child, in order. (N, ..., s*d) -> (s*N, ..., d)."""
    N, rest, d = x.shape[0], x.shape[1:-1], x.shape[-1] // s
    x = np.reshape(x, (N,) + rest + (s, d))                                  # (N,...,s,d)
    order = (0, 1 + len(rest)) + tuple(range(1, 1 + len(rest))) + (2 + len(rest),)   # (N,s,...,d)
    return np.reshape(np.transpose(x, order), (N * s,) + rest + (d,))


def rows(x, positions):
    """x[positions] along the models axis, skipping the copy when the positions are all of x in order."""
    if len(positions) == x.shape[0] and all(p == i for i, p in enumerate(positions)):
        return x
    return x[onp.asarray(positions)]


class Coupled(Base):
    """What upstream and downstream share. Subclasses give `members`, `senders_first` and `receive`."""
    features = tuple(f for f in FEATURES if f not in ("merge", "grow", "trace"))
    why_not = {
        "merge": "merged children would start coupled to a parent that never trained with them",
        "grow": "growing merges standalone models, and a coupled node is not standalone",
        "trace": "the shape trace follows one node's own ops, and a coupled node also reads its relatives' states",
    }
    extra_roles = {"coupling_scale": ("L", None)}

    def extra_params(self, cfg):
        """One learnable scale per (receiving level, layer)."""
        return {"coupling_scale": onp.full((cfg.levels, cfg.layers), cfg.coupling_scale_init, dtype=onp.float32)}

    def scale(self, params, cfg):
        scale = params.get("coupling_scale")
        if scale is None or tuple(np.shape(scale)) != (cfg.levels, cfg.layers):
            got = None if scale is None else tuple(np.shape(scale))
            raise ValueError(f"the {self.name} variant needs params['coupling_scale'] of shape "
                             f"({cfg.levels}, {cfg.layers}) (levels, layers), got {got}; init_params(cfg) makes one")
        return scale

    def couple(self, cfg, layer, scale, out, delta, members):
        """One layer's coupling for every member level. out, delta: {level: (N, ..., d)} -> new states.

        out[m] is level m's state after this layer's attention and MLP, delta[m] those two outputs alone.
        Senders are visited before receivers, so with `coupling_cumulative` what a level sends already
        includes what it received in this layer.
        """
        sent, new = {}, dict(out)
        for m in sorted(members, reverse=self.senders_first == "deepest"):
            own = delta[m] if cfg.coupling_sublayer else out[m]
            got = self.receive(cfg, sent, members, m)
            if got is not None:
                add = scale[m, layer] * got
                new[m] = out[m] + add
                if cfg.coupling_cumulative:
                    own = own + add if cfg.coupling_sublayer else new[m]
            sent[m] = own
        return new

    # the level-batched path

    def stacked_params(self, params, cfg, members):
        """{level m: its member models stacked on a leading axis} (views of the arrays)."""
        out = {}
        for m, idx in members.items():
            stacked = level_view(params, cfg, m)
            if idx != list(range(cfg.n_models(m))):
                stacked = map_roles(lambda a, roles: a[onp.asarray(idx)], stacked)
            out[m] = stacked
        return out

    def run_states(self, params, cfg, ids, members, rng=None):
        """Final residual states of the members, coupled: ({level: (N,B,T,d)}, stacked params)."""
        ids = onp.asarray(ids)
        scale = self.scale(params, cfg)
        stacked = self.stacked_params(params, cfg, members)
        subs = {m: cfg.sub(m) for m in members}
        x = {m: fast.norm(fast.embed(stacked[m], ids), stacked[m]["emb_norm"], cfg.eps) for m in members}
        for i in range(cfg.layers):
            out, delta = {}, {}
            for m in members:
                out[m], delta[m] = fast.block_with_delta(x[m], stacked[m]["layers"][i], subs[m], rng)
            x = self.couple(cfg, i, scale, out, delta, members)
        return x, stacked

    def forward_tree(self, params, cfg, ids, rng=None):
        """Logits of every node, the whole tree at once: [(1,B,T,V), (s,B,T,V), (s^2,B,T,V), ...]."""
        x, stacked = self.run_states(params, cfg, ids, all_models(cfg), rng)
        return [fast.output_logits(x[m], stacked[m], cfg.sub(m)) for m in range(cfg.levels)]

    def level_logits(self, params, cfg, level, ids, rng=None):
        cfg.check_level(level)
        members = self.members(cfg, level, range(cfg.n_models(level)))
        x, stacked = self.run_states(params, cfg, ids, members, rng)
        return fast.output_logits(x[level], stacked[level], cfg.sub(level))

    def node_losses(self, params, cfg, ids, targets, rng=None):
        return [fast.cross_entropy_per_model(logits, targets) for logits in self.forward_tree(params, cfg, ids, rng)]

    def forward(self, params, cfg, ids, rng=None):
        """The root of this (sub)tree, with every node it needs (params must hold them all)."""
        return self.forward_node(params, cfg, 0, 0, ids)

    # the reference path: node by node, with model.py's layer

    def forward_nodes_reference(self, params, cfg, ids, run=None):
        """{node: logits (B,T,V)} for the nodes in `run` (default: all), each node its own model, coupled
        node by node after every layer. `run` must hold every node the coupling sends from (members)."""
        run = sorted(nodes(cfg) if run is None else set(run))
        ids, eps = onp.asarray(ids), cfg.eps
        scale = self.scale(params, cfg)
        p = {n: view(params, cfg, *n) for n in run}
        x = {n: model.embed(p[n]["E"], p[n]["emb_norm"], ids, eps) for n in run}     # (B,T,d_l)
        for i in range(cfg.layers):
            out, delta = {}, {}
            for n in run:
                w, sub = p[n]["layers"][i], cfg.sub(n[0])
                a = model.attention(model.norm(x[n], w["attn_norm"], eps), w, sub)
                y = x[n] + a
                b = model.mlp(model.norm(y, w["mlp_norm"], eps), w)
                out[n], delta[n] = y + b, a + b
            x, sent = dict(out), {}
            for n in sorted(run, key=lambda n: n[0], reverse=self.senders_first == "deepest"):
                own = delta[n] if cfg.coupling_sublayer else out[n]
                got = self.receive_node(cfg, sent, n)
                if got is not None:
                    x[n] = out[n] + scale[n[0], i] * got
                    if cfg.coupling_cumulative:
                        own = own + scale[n[0], i] * got
                sent[n] = own
        return {n: model.output(x[n], p[n], cfg.sub(n[0])) for n in run}

    def forward_node(self, params, cfg, level, index, ids):
        """Logits of node (level, index) by the reference path, running every node it needs."""
        cfg.check_node(level, index)
        run = [(m, j) for m, idx in self.members(cfg, level, [index]).items() for j in idx]
        return self.forward_nodes_reference(params, cfg, ids, run)[(level, index)]

    def own_flops(self, cfg, level, T):
        """One model's layers and output, plus the coupling adds it receives."""
        return flops.model_flops(cfg, level, T) + (flops.coupling_add_flops(cfg, level, T) if self.receives(cfg, level) else 0)

    def node_flops(self, cfg, level, T):
        """Every needed node's layers and coupling adds, and one output projection (the node's own)."""
        members = self.members(cfg, level, [0])
        return sum(len(idx) * (flops.model_flops(cfg, m, T, logits=(m == level))
                               + (flops.coupling_add_flops(cfg, m, T) if self.receives(cfg, m) else 0))
                   for m, idx in members.items())

    # decoding

    def decoder_state(self, params, cfg, dec):
        return onp.asarray(self.scale(params, cfg), dtype=onp.float32)

    def decoder_couple(self, dec, layer, out, delta):
        return self.couple(dec.cfg, layer, dec.extra, out, delta, dec.members)


class Upstream(Coupled):
    name = "upstream"
    senders_first = "deepest"

    def receives(self, cfg, level):
        return level < cfg.levels - 1

    def members(self, cfg, level, indices):
        """Each model's whole subtree: {m: the models under `indices`} for m = level .. L-1."""
        s = cfg.split
        return {m: sorted({j * s ** (m - level) + r for j in indices for r in range(s ** (m - level))})
                for m in range(level, cfg.levels)}

    def receive(self, cfg, sent, members, level):
        """What the members of `level` receive: their children's states side by side, or None."""
        if level + 1 not in members:
            return None
        s, position = cfg.split, {j: r for r, j in enumerate(members[level + 1])}
        try:
            order = [position[s * j + r] for j in members[level] for r in range(s)]
        except KeyError:
            raise ValueError(f"upstream: the models {members[level]} of level {level} need all their children "
                             f"at level {level + 1}, got {members[level + 1]}") from None
        return concat_children(rows(sent[level + 1], order), s)

    def receive_node(self, cfg, sent, node):
        """What one node receives in the reference path: its children's states concatenated, or None."""
        kids = children(cfg, *node)
        return np.concatenate([sent[c] for c in kids], axis=-1) if kids else None


class Downstream(Coupled):
    name = "downstream"
    senders_first = "shallowest"

    def receives(self, cfg, level):
        return level > 0

    def members(self, cfg, level, indices):
        """Each model's chain of ancestors and itself: {m: the ancestors at level m} for m = 0 .. level."""
        s = cfg.split
        return {m: sorted({j // s ** (level - m) for j in indices}) for m in range(level + 1)}

    def receive(self, cfg, sent, members, level):
        """What the members of `level` receive: their slice of their parent's state, or None."""
        if level - 1 not in members:
            return None
        s, position = cfg.split, {j: r for r, j in enumerate(members[level - 1])}
        try:
            order = [position[k // s] * s + k % s for k in members[level]]
        except KeyError:
            raise ValueError(f"downstream: the models {members[level]} of level {level} need their parents "
                             f"at level {level - 1}, got {members[level - 1]}") from None
        return rows(split_to_children(sent[level - 1], s), order)

    def receive_node(self, cfg, sent, node):
        """What one node receives in the reference path: its slice R of its parent's state, or None."""
        if node[0] == 0:
            return None
        d, r = cfg.width(node[0]), node[1] % cfg.split
        return sent[parent(cfg, *node)][..., r * d:(r + 1) * d]

    def forward(self, params, cfg, ids, rng=None):
        """The root: it receives nothing under downstream. A view of a deeper node is refused, because that
        node's logits depend on its ancestors' states, which a view does not hold."""
        if is_partial_view(params):
            raise unsupported(self, "forward of a view of a node below the root",
                              "a downstream node adds its ancestors' states, which its view does not hold; "
                              "use tinyfractal.forward_node(params, cfg, level, index, ids) on the whole tree")
        return super().forward(params, cfg, ids, rng)


def all_models(cfg):
    """Every model of every level as members: {m: [0 .. s^m - 1]}."""
    return {m: list(range(cfg.n_models(m))) for m in range(cfg.levels)}


def is_partial_view(params):
    """True if the embedding is a view into a larger array (params came from `view` of a deeper node)."""
    E = params["E"]
    base = getattr(E, "base", None)
    return isinstance(base, onp.ndarray) and base.size > E.size


# Module-level shortcuts for lessons and tests: the coupled variant of `cfg`, asked directly. (The
# shortcuts that serve every variant, such as the nodes a node needs and its FLOPs, are in api.py:
# this module may not ask the registry, which imports it.)

COUPLED = {"upstream": Upstream(), "downstream": Downstream()}


def coupled_variant(cfg):
    """The variant object of a coupled config; ValueError for any other."""
    v = COUPLED.get(cfg.variant)
    if v is None:
        raise ValueError(f"this is a coupled-model function, but the config is the {cfg.variant} variant; "
                         f"use coupling='upstream' or 'downstream'")
    return v


def forward_tree(params, cfg, ids, rng=None):
    """Logits of every node of a coupled tree, level-batched: [(1,B,T,V), (s,B,T,V), ...]."""
    return coupled_variant(cfg).forward_tree(params, cfg, ids, rng)


def forward_node(params, cfg, level, index, ids, rng=None):
    """Logits of node (level, index), level-batched, running only the nodes it needs. (B,T) -> (B,T,V)."""
    v = coupled_variant(cfg)
    level, index = cfg.check_node(level, index)
    x, stacked = v.run_states(params, cfg, ids, v.members(cfg, level, [index]), rng)
    return fast.output_logits(x[level], stacked[level], cfg.sub(level))[0]


def forward_nodes_reference(params, cfg, ids, run=None):
    """{node: logits} by the node-by-node reference path (see Coupled.forward_nodes_reference)."""
    return coupled_variant(cfg).forward_nodes_reference(params, cfg, ids, run)


def forward_node_reference(params, cfg, level, index, ids):
    """Logits of node (level, index) by the reference path, running needed_nodes."""
    return coupled_variant(cfg).forward_node(params, cfg, level, index, ids)

