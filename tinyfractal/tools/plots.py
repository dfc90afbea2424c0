"""Pictures of the fractal tree, drawn from the real arrays: who owns which weight, the tree, losses, attention.

The ownership maps are computed with `view` itself: every node, level by level, writes its number
through its own view of a marker copy of the arrays, so deeper nodes overwrite their parents. A bug in
the views would show up in the picture (and in tests/test_plots.py, which checks the maps against
`index_mask`).

    python -m tinyfractal figures --preset tiny --out figures/tiny
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as onp  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tinyfractal.api import init_params, param_shapes  # noqa: E402
from tinyfractal.core.model import count_params, forward  # noqa: E402
from tinyfractal.core.tree import map_roles, nodes, parent, view  # noqa: E402

# Each kind is one figure: its panels are (title, flat name of layer 0's array or a top-level array).
KINDS = {
    "E": ["E"],
    "Wq": ["layers.0.Wq"],
    "Wkv": ["layers.0.Wk", "layers.0.Wv"],
    "Wo": ["layers.0.Wo"],
    "Wgate_Wup": ["layers.0.Wgate", "layers.0.Wup"],
    "Wdown": ["layers.0.Wdown"],
    "vectors": ["emb_norm", "layers.0.attn_norm", "layers.0.mlp_norm", "final_norm", "out_norm",
                "layers.0.bdown", "layers.0.bgate", "layers.0.bup"],
}
DPI = 120


def _save(fig, path):
    """Save a figure atomically (temp file in the same folder, then os.replace) and close it."""
    import os
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def owners(cfg):
    """The deepest owner of every entry of every array: a params dict of int arrays holding the
    node's position in `nodes(cfg)` (0 is the root).

    Computed through `view`: each node, level by level, writes its number into its own view of a
    marker copy of the arrays, so a child overwrites its parent where it owns the entry.
    """
    marker = map_roles(lambda shape, roles: onp.full(shape, -1, dtype=onp.int32), param_shapes(cfg))
    for number, (level, j) in enumerate(nodes(cfg)):
        map_roles(lambda block, roles: block.fill(number), view(marker, cfg, level, j))
    return marker


def level_owners(cfg, level):
    """Like `owners`, but only the models of one level write: -1 where no model of that level owns
    the entry (the off-diagonal blocks)."""
    marker = map_roles(lambda shape, roles: onp.full(shape, -1, dtype=onp.int32), param_shapes(cfg))
    for number, (l, j) in enumerate(nodes(cfg)):
        if l == level:
            map_roles(lambda block, roles: block.fill(number), view(marker, cfg, l, j))
    return marker


def _flat_owner(marker, name):
    if name.startswith("layers."):
        _, i, key = name.split(".", 2)
        return marker["layers"][int(i)][key]
    return marker[name]


def node_colours(cfg):
    """An RGB colour per node (in `nodes(cfg)` order).

    The root is light grey. Every level-1 subtree has its own hue; a node is paler the shallower it
    is, and siblings at one level alternate between lighter and darker shades, so that neighbouring
    diagonal blocks stay apart.
    """
    hues = plt.get_cmap("tab10").colors
    colours = []
    for level, j in nodes(cfg):
        if level == 0:
            colours.append((0.86, 0.86, 0.86))
            continue
        hue = onp.array(hues[(j // cfg.split ** (level - 1)) % len(hues)])
        depth = (level - 1) / max(1, cfg.levels - 2)            # 0 at level 1, 1 at the leaves
        c = hue + (1 - hue) * 0.6 * (1 - depth)                 # mix with white: paler near the root
        if level > 1:
            c = c * (1 - 0.22 * (j % cfg.split))                # mix with black: sibling shades
        colours.append(tuple(float(v) for v in c))
    return colours


def _legend_handles(cfg, colours, present=None):
    handles = []
    for number, (level, j) in enumerate(nodes(cfg)):
        if present is not None and number not in present:
            continue
        label = f"({level},{j})  level {level}, width {cfg.width(level)}"
        handles.append(Patch(facecolor=colours[number], edgecolor="black", linewidth=0.4, label=label))
    return handles


def _as_image(owner_ids, colours):
    """Owner numbers -> RGB; -1 (no owner) is white."""
    table = onp.array(list(colours) + [(1.0, 1.0, 1.0)])
    return table[owner_ids]


def _matrix_of(name, owner_ids, cfg):
    """How a weight is drawn: (2-D owner ids, row label, column label, head lines (axis, positions))."""
    key = name.split(".")[-1]
    if key == "E":
        return owner_ids, "vocabulary (V)", "residual coordinate (D)", None
    if key in ("Wq", "Wk", "Wv"):
        D, H, hd = owner_ids.shape
        return (owner_ids.reshape(D, H * hd), "residual coordinate (D)",
                f"head x coordinate in head ({H} x {hd})", ("x", [h * hd for h in range(1, H)], hd, H))
    if key == "Wo":
        H, hd, D = owner_ids.shape
        return (owner_ids.reshape(H * hd, D), f"head x coordinate in head ({H} x {hd})",
                "residual coordinate (D)", ("y", [h * hd for h in range(1, H)], hd, H))
    if key in ("Wgate", "Wup"):
        return owner_ids, "residual coordinate (D)", "MLP coordinate (F)", None
    if key == "Wdown":
        return owner_ids, "MLP coordinate (F)", "residual coordinate (D)", None
    return owner_ids[None, :], "", "coordinate", None


def _draw_matrix(ax, name, owner_ids, cfg, colours):
    ids2d, ylabel, xlabel, heads = _matrix_of(name, owner_ids, cfg)
    ax.imshow(_as_image(ids2d, colours), interpolation="nearest", aspect="auto")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}  {tuple(owner_ids.shape)}", fontsize=10)
    if heads is not None:
        axis, lines, hd, H = heads
        for pos in lines:
            (ax.axvline if axis == "x" else ax.axhline)(pos - 0.5, color="black", linewidth=1.6)
        centres = [h * hd + (hd - 1) / 2 for h in range(H)]
        labels = [f"head {h}" for h in range(H)]
        if axis == "x":
            top = ax.secondary_xaxis("top")
            top.set_xticks(centres)
            top.set_xticklabels(labels, fontsize=8)
        else:
            right = ax.secondary_yaxis("right")
            right.set_yticks(centres)
            right.set_yticklabels(labels, fontsize=8)
    return set(onp.unique(ids2d).tolist())


def _draw_by_level(ax, cfg, name, colours, length):
    """One row per level: which model of that level owns each coordinate of a vector (or of E's columns)."""
    rows = []
    for level in range(cfg.levels):
        ids = _flat_owner(level_owners(cfg, level), name)
        rows.append(ids[0] if ids.ndim == 2 else ids)
    ax.imshow(_as_image(onp.array(rows), colours), interpolation="nearest", aspect="auto",
              extent=(-0.5, len(rows[0]) - 0.5, cfg.levels - 0.5, -0.5))
    ax.set_xlim(-0.5, length - 0.5)
    ax.set_yticks(range(cfg.levels))
    ax.set_yticklabels([f"level {level}" for level in range(cfg.levels)], fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{name}: the slice of every model, level by level", fontsize=9)


def _draw_vectors(fig, names, marker, cfg, colours):
    longest = max(_flat_owner(marker, n).shape[0] for n in names)
    by_level = [n for n in ("emb_norm", "layers.0.bgate") if n in names]
    axes = fig.subplots(len(by_level) + len(names), 1,
                        gridspec_kw={"height_ratios": [cfg.levels] * len(by_level) + [1] * len(names)})
    for ax, name in zip(axes, by_level):
        _draw_by_level(ax, cfg, name, colours, longest)
    axes = axes[len(by_level):]
    axes[0].set_title("every vector: each coordinate coloured by its deepest owner", fontsize=9)
    present = set()
    for ax, name in zip(onp.atleast_1d(axes), names):
        ids = _flat_owner(marker, name)
        ax.imshow(_as_image(ids[None, :], colours), interpolation="nearest", aspect="auto",
                  extent=(-0.5, ids.shape[0] - 0.5, 0, 1))
        ax.set_xlim(-0.5, longest - 0.5)
        ax.set_yticks([])
        ax.set_ylabel(f"{name} ({ids.shape[0]})", rotation=0, ha="right", va="center", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        present |= set(onp.unique(ids).tolist())
    return present


def ownership_figure(cfg, kind, path, marker=None):
    """One figure: the ownership map of one weight kind (a key of KINDS). Returns the path."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; choose from {list(KINDS)}")
    marker = owners(cfg) if marker is None else marker
    colours = node_colours(cfg)
    names = KINDS[kind]
    if kind == "vectors":
        fig = plt.figure(figsize=(12, 0.55 * len(names) + 0.45 * 2 * cfg.levels + 2.6))
        present = _draw_vectors(fig, names, marker, cfg, colours) | set(range(cfg.n_nodes))
        what = "gain and bias vectors"
    else:
        shapes = [_matrix_of(n, _flat_owner(marker, n), cfg)[0].shape for n in names]
        rows, cols = shapes[0]
        width = min(13.0, max(6.0, 3.0 + cols / 28))
        height = min(9.0, max(3.0, 1.5 + rows / 28)) * (len(names) if rows < cols else 1)
        fig = plt.figure(figsize=(width + 3.5, height))
        stack = (len(names), 1) if rows < cols else (1, len(names))
        if kind == "E":  # E's columns are nested all the way down: also show every level's slices
            fig.set_size_inches(width + 3.5, height + 0.35 * cfg.levels + 0.6)
            axes = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(3, rows // 10), cfg.levels]})
            _draw_by_level(axes[1], cfg, "E", colours, cols)
            axes = axes[:1]
        else:
            axes = onp.atleast_1d(fig.subplots(*stack))
        present = set(range(cfg.n_nodes)) if kind == "E" else set()
        for ax, name in zip(axes, names):
            present |= _draw_matrix(ax, name, _flat_owner(marker, name), cfg, colours)
        what = " and ".join(n.split(".")[-1] for n in names)
    fig.suptitle(f"Who owns {what}? Each entry coloured by the deepest model that owns it\n"
                 f"(computed with view; levels={cfg.levels}, split={cfg.split}, D={cfg.hidden}, "
                 f"heads={cfg.heads}, hd={cfg.head_dim}, F={cfg.mlp_hidden})", fontsize=11)
    fig.legend(handles=_legend_handles(cfg, colours, present), loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=8,
               title="model (level, index)", title_fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    return _save(fig, path)


def ownership_maps(cfg, out_dir, kinds=None):
    """Ownership maps of the weight kinds (default: all of KINDS) as out_dir/ownership_KIND.png."""
    kinds = list(KINDS) if kinds is None else list(kinds)
    marker = owners(cfg)
    return [ownership_figure(cfg, kind, Path(out_dir) / f"ownership_{kind}.png", marker) for kind in kinds]


def tree_figure(cfg, path, params=None):
    """The tree of models: one box per node with its width, head dim, MLP width and parameter count."""
    params = init_params(cfg, 0) if params is None else params
    colours = node_colours(cfg)
    leaves = cfg.n_models(cfg.levels - 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.55 * leaves + 1.5), 1.9 * cfg.levels + 1.4))
    position = {}
    for number, (level, j) in enumerate(nodes(cfg)):
        span = leaves / cfg.n_models(level)                      # leaves under one node of this level
        position[(level, j)] = ((j + 0.5) * span, -level)
    for node, (x, y) in position.items():
        up = parent(cfg, *node)
        if up is not None:
            px, py = position[up]
            ax.plot([px, x], [py - 0.28, y + 0.28], color="grey", linewidth=1, zorder=1)
    shared = count_params(params)
    for number, (level, j) in enumerate(nodes(cfg)):
        x, y = position[(level, j)]
        n = count_params(view(params, cfg, level, j))
        text = (f"({level},{j})\nd={cfg.width(level)} h={cfg.head_width(level)}\nf={cfg.mlp_width(level)}\n"
                f"{n:,} params")
        ax.text(x, y, text, ha="center", va="center", fontsize=8 if leaves <= 9 else 6.5, zorder=2,
                bbox=dict(boxstyle="round,pad=0.35", facecolor=colours[number], edgecolor="black", linewidth=0.6))
    for level in range(cfg.levels):
        share = count_params(view(params, cfg, level, 0)) / shared
        ax.text(-0.15, -level, f"level {level}\n{cfg.n_models(level)} model{'s' if level else ''}\n"
                f"{share:.1%} each", ha="right", va="center", fontsize=9)
    ax.set_xlim(-1.3, leaves + 0.1)
    ax.set_ylim(-cfg.levels + 0.45, 0.55)
    ax.axis("off")
    ax.set_title(f"{cfg.n_nodes} models in one set of arrays ({shared:,} parameters): each holds "
                 f"{cfg.split} children on its diagonal blocks\n"
                 f"d = width, h = head dim (in each of {cfg.heads} heads), f = MLP width", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _load_metrics(metrics):
    if isinstance(metrics, (str, Path)):
        import json
        with open(metrics, encoding="utf-8") as f:
            return json.load(f)
    return metrics


def loss_curves(metrics, cfg, path, unigram=None):
    """Loss curves from a metrics dict or metrics.json path (train.save_run's format):
    the tree loss per step, and every node's train (dashed) and val (solid) loss per eval.

    `unigram` (default: the metrics' "unigram_entropy", if any) draws the loss of a model that ignores
    context as a dotted line: a node below it has learned something from the context."""
    metrics = _load_metrics(metrics)
    unigram = metrics.get("unigram_entropy") if unigram is None else unigram
    for key in ("step", "loss", "eval_step", "train", "val"):
        if key not in metrics:
            raise ValueError(f"metrics lack {key!r}; expected the keys step, loss, eval_step, train, val "
                             f"written by train.save_run")
    if cfg is None:
        from tinyfractal.config import Config
        cfg = Config.from_dict(metrics["config"])
    colours = node_colours(cfg)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    left.plot(metrics["step"], metrics["loss"], color="black", linewidth=0.8)
    left.set_xlabel("step")
    left.set_ylabel("tree loss (mean over nodes, nats/token)")
    left.set_title("training loss of the whole tree, per step")
    for number, (level, j) in enumerate(nodes(cfg)):
        key = f"{level}.{j}"
        if key not in metrics["val"]:
            raise ValueError(f"metrics have no losses for node {key}; their nodes are {sorted(metrics['val'])}")
        colour = onp.array(colours[number]) * (0.8 if level else 0.0)  # the root in black; others a bit darker
        width = 2.6 - 0.6 * level
        right.plot(metrics["eval_step"], metrics["val"][key], color=colour, linewidth=width,
                   label=f"({level},{j}) width {cfg.width(level)}")
        right.plot(metrics["eval_step"], metrics["train"][key], color=colour, linewidth=width * 0.6,
                   linestyle="--")
    if unigram is not None:
        for ax in (left, right):
            ax.axhline(unigram, color="grey", linestyle=":", linewidth=1.2,
                       label=f"unigram entropy {unigram:.3f} (ignores context)")
        left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("loss (nats/token)")
    right.set_title("every node: val (solid), train (dashed)")
    right.legend(fontsize=8, ncol=2 if cfg.n_nodes > 8 else 1)
    fig.tight_layout()
    return _save(fig, path)


def attention_probs(params, cfg, ids, level, index):
    """Attention probabilities of model (level, index) for ids (B,T): one (B,H,T,T) array per layer,
    caught from the reference forward by tracing it."""
    from tinyfractal.tools.trace import Tracer, tracing
    with tracing(Tracer(params, cfg, level, index, keep_outputs=True)) as tracer:
        forward(view(params, cfg, level, index), cfg.sub(level), ids)
    return [onp.asarray(step.output) for step in tracer.steps if step.op.startswith("softmax")]


def attention_maps(params, cfg, tokenizer, prompt, level, path, layers=None):
    """Attention maps of every node of one level for one prompt: a row per node, a column per
    (layer, head). `layers` picks layers (default: all if that makes at most 12 columns, else the
    first and the last)."""
    cfg.check_level(level)
    ids = onp.array([tokenizer.encode(prompt)])
    T = ids.shape[1]
    if T == 0 or T > cfg.context:
        raise ValueError(f"the prompt is {T} tokens; it must be 1..{cfg.context} (the context)")
    if layers is None:
        layers = list(range(cfg.layers)) if cfg.layers * cfg.heads <= 12 else sorted({0, cfg.layers - 1})
    layers = list(layers)
    for layer in layers:
        if not 0 <= layer < cfg.layers:
            raise ValueError(f"layer {layer} is out of range; this config has layers 0..{cfg.layers - 1}")
    labels = [repr(tokenizer.decode([t]))[1:-1] for t in ids[0]]
    n, cols = cfg.n_models(level), len(layers) * cfg.heads
    cell = 1.6 if T <= 16 else 2.2
    fig, axes = plt.subplots(n, cols, figsize=(cell * cols + 1.2, cell * n + 1.2), squeeze=False)
    for j in range(n):
        probs = attention_probs(params, cfg, ids, level, j)
        for c, (layer, head) in enumerate((layer, head) for layer in layers for head in range(cfg.heads)):
            ax = axes[j, c]
            ax.imshow(probs[layer][0, head], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(f"layer {layer} head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"({level},{j})", fontsize=9)
            if j == n - 1 and c == 0 and T <= 16:
                ax.set_xticks(range(T))
                ax.set_xticklabels(labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T))
                ax.set_yticklabels(labels, fontsize=6)
    fig.suptitle(f"Attention of every model at level {level} (rows: query token, columns: key token)\n"
                 f"prompt {prompt!r}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def merge_counts(merges, path, label_first=63):
    """Bar chart of BPE merge frequency against merge rank. merges: [(rank, (a, b), count), ...]."""
    if not merges:
        raise ValueError("no merges to draw")
    ranks = [m[0] for m in merges]
    counts = [m[2] for m in merges]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.17 * len(merges) + 2), 4.8))
    ax.bar(ranks, counts, color="tab:blue", width=0.8)
    for rank, (a, b), count in merges[:label_first]:
        label = repr(a + b)[1:-1].replace(" ", "_")
        ax.text(rank, count, " " + label, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("merge rank (0 = first merge)")
    ax.set_ylabel("times the pair was merged")
    ax.set_ylim(0, max(counts) * 1.25)
    ax.set_title("BPE merge frequency against rank (label: the new token, _ is a space)")
    fig.tight_layout()
    return _save(fig, path)


def arguments(p):
    """The arguments of `python -m tinyfractal figures` (cli.py's command table names this function)."""
    p.add_argument("--preset", default="tiny")
    p.add_argument("--ckpt", default=None, help="draw a trained checkpoint (and its metrics.json if present)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--prompt", default="ROMEO:\nWhat light")
    p.add_argument("--level", type=int, default=None, help="level of the attention maps (default: deepest)")
    p.set_defaults(run=run_figures, overrides=True)


def run_figures(args, extra):
    from tinyfractal.cli_args import parse_overrides
    from tinyfractal.config import Config
    from tinyfractal.text.bpe import Tokenizer
    metrics = None
    if args.ckpt:
        if extra:
            raise ValueError("--key=value config overrides apply to a fresh --preset, not to a --ckpt")
        from tinyfractal.training.checkpoint import load
        params, cfg, _ = load(args.ckpt)
        if (Path(args.ckpt) / "metrics.json").exists():
            metrics = Path(args.ckpt) / "metrics.json"
    else:
        cfg = Config.preset(args.preset).override(**parse_overrides(extra))
        params = init_params(cfg, 0)
    level = cfg.levels - 1 if args.level is None else args.level
    out = Path(args.out)
    paths = ownership_maps(cfg, out)
    paths.append(tree_figure(cfg, out / "tree.png", params))
    paths.append(attention_maps(params, cfg, Tokenizer.default(), args.prompt, level, out / f"attention_level{level}.png"))
    if metrics is not None:
        paths.append(loss_curves(metrics, cfg, out / "loss_curves.png"))
    for path in paths:
        print(f"saved {path}")
    return 0
