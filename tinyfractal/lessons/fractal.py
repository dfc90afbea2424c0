"""Lesson 7, is Shakespeare fractal? The self-similarity of language, measured with the tree's own models.

Run: python -m tinyfractal.lessons.fractal [--quick] [--out DIR] [--ckpt DIR] [--steps N] [--seed N] [--resume]

The model comes from --ckpt, else from the base lesson's output (lesson_output/base/checkpoint), else
from this lesson's earlier output (OUT/checkpoint), else it trains the 'tiny' preset here (--steps,
default 600, with a checkpoint at every evaluation that --resume continues from). A --quick run trains
its own 20-step model and measures short slices of text: it checks that everything runs, and a full
run never takes its model for a trained one.
"""
import time

import numpy as np

from tinyfractal import Config, Tokenizer, init_params, nodes
from tinyfractal import fractal
from tinyfractal.lessons._common import (OUTPUT, conclude, pyplot, run, save_figure, trained_model, section,
                                         train_with_checkpoints)
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import load_tokens, train_val_split
from tinyfractal.training.train import TrainConfig, format_duration

PAPER = {"S": (0.59, 0.08), "H": (0.70, 0.09), "D": (1.41, 0.08), "J": (0.49, 0.08)}
TEMPERATURES = (0.5, 0.8, 1.0, 1.2)
KEYS = ("H", "S", "D", "J", "H_dfa")
STEPS = (600, 20)     # if no trained model is found: full run, --quick
BASE_CHECKPOINT = OUTPUT / "base" / "checkpoint"


def main(argv=None):
    return run("fractal", __doc__, lesson, argv, steps=STEPS, trains=True, arguments=arguments)


def arguments(p):
    p.add_argument("--ckpt", default=None, help="a trained checkpoint (a base or coupled tree, BPE tokens) to measure")


def lesson(args):
    tokenizer = Tokenizer.default()
    results = {"quick": args.quick, "seed": args.seed}
    the_question()
    params, cfg, keep, use, train_tokens, val = the_observers(args, tokenizer)
    results["calibration"] = estimators_on_fgn(args)
    bits, z, lengths, root, skip = surprisal_series(args, params, cfg, tokenizer, val, use, keep)
    fits, shuffled = four_power_laws(args, root)
    rows, corr = per_node(args, cfg, use, bits, z, lengths, skip, shuffled, train_tokens, val)
    results["per_node"], results["corr_bits_per_char_H"] = rows, corr
    results["real_vs_generated"], summary = real_against_generated(args, params, cfg, tokenizer, root, keep)
    section("7. Figures")
    calibration = {float(h): v for h, v in results["calibration"].items()}
    for path in save_figures(root, shuffled, fits, rows, use, summary, calibration, cfg, args.out):
        print(f"saved {path}")
    atomic_write_json(args.out / "results.json", finite(results))
    print(f"saved {args.out / 'results.json'}")


def get_model(args, tokenizer):
    """(params, cfg, where it came from): --ckpt, else a trained checkpoint found on disk, else one trained here.

    A --quick run's checkpoint is never taken for a trained model (unless this run is quick too), and a
    quick run trains its own model.
    """
    own = args.out / "checkpoint"
    found = trained_model(args, [BASE_CHECKPOINT, own])
    if found:
        return found
    cfg = Config.preset("tiny")
    steps = args.steps
    # --quick: 20 large steps, just enough for samples that are not one token repeated
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=1e-2 if args.quick else 3e-3,
                     min_lr=1e-3 if args.quick else 3e-4, warmup=min(50, steps // 10),
                     eval_interval=max(1, steps // 4), eval_batches=1 if args.quick else 8,
                     log_interval=max(1, steps // 12), seed=args.seed)
    params = init_params(cfg, args.seed)
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    print(f"No trained model found: training the 'tiny' preset for {steps} steps (every node at once),\n"
          f"saving {own} at every evaluation.")
    t0 = time.perf_counter()
    train_with_checkpoints(args, own, params, cfg, tc, train_tokens, val_tokens)
    return params, cfg, f"trained here in {format_duration(time.perf_counter() - t0)}, saved to {own}"


def the_question():
    """Section 0: the paper's four numbers, and what H > 0.5 means."""
    section("0. The question: is language self-similar?")
    print("Alabdulmohsin, Tran and Dehghani (2024) read text through a language model: every token w_t\n"
          "gets its surprisal z_t = -log2 p(w_t | text before it), in bits. Standardise the series,\n"
          "x_t = (z_t - mean) / std, and add it up, X_t = x_1 + ... + x_t: a random walk whose steps are\n"
          "surprises. If language had no memory, X would be plain Brownian motion. Their medians over many\n"
          "domains and PaLM-scale models:")
    for k, (m, s) in PAPER.items():
        print(f"    {k} = {m:.2f} +- {s:.2f}")
    print("H > 0.5 is long-range dependence: a surprising stretch is followed by more surprise, at every\n"
          "scale. This lesson measures the same four numbers for Shakespeare with every model of our tree.")


def the_observers(args, tokenizer):
    """Section 1: the trained tree whose nodes read the text, and the slice of text they read."""
    section("1. The observers: a trained tree of models")
    params, cfg, source = get_model(args, tokenizer)
    keep = fractal.check_keep(None, cfg)              # a byte model is refused here, naming its variant
    if cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model reads {cfg.vocab_size} token ids, the BPE tokenizer has {tokenizer.vocab_size}")
    print(f"Model: {source}\n{cfg}")
    tree = list(nodes(cfg))
    use = tree if not args.quick else [(0, 0), (cfg.levels - 1, 0)]
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    val = val_tokens if not args.quick else val_tokens[:1500]
    print(f"The val split (the last 10% of input.txt, never trained on): {len(val_tokens):,} tokens; "
          f"measuring {len(val):,} of them with {len(use)} of the {cfg.n_nodes} nodes.")
    return params, cfg, keep, use, train_tokens, val


def estimators_on_fgn(args):
    """Section 2: every estimator on exact fractional Gaussian noise of known H. Returns the calibration."""
    section("2. First, do the estimators work? Fractional Gaussian noise with a known H")
    print("fGn is the textbook self-similar noise: its sum is fractional Brownian motion, for which\n"
          "S = H = J exactly. fractal.fgn draws it exactly (Davies-Harte: circulant embedding + FFT).\n"
          "Each estimator on many draws, as long as the pieces of text compared in section 6:")
    n_cal, cal_seeds = (256, 2) if args.quick else (4096, 20)
    hursts = (0.3, 0.7) if args.quick else (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    calibration = calibrate(hursts, n_cal, cal_seeds, args.seed)
    print(f"\n  n = {n_cal}, mean +- sd over {cal_seeds} seeds")
    print(f"  {'true H':>6} " + " ".join(f"{k:>13}" for k in ("H (R/S)", "S", "J", "H (DFA)")))
    for h in hursts:
        print(f"  {h:6.1f} " + " ".join(f"{calibration[h][k][0]:7.3f}+-{calibration[h][k][1]:.3f}"
                                        for k in ("H", "S", "J", "H_dfa")))
    conclude(args, "R/S is pulled towards the middle (about +0.04 for white noise, H = 0.5, at this length): keep\n"
                   "that in mind when you compare with 0.5. DFA is the least biased; S is the noisiest.")
    return {str(h): v for h, v in calibration.items()}


def surprisal_series(args, params, cfg, tokenizer, val, use, keep):
    """Section 3: every node's surprisal of the val text, in bits per character."""
    section("3. Reading Shakespeare: the surprisal of every token, in bits per character")
    print(f"Each node runs over the text with its KV cache and a sliding window: when {cfg.context} tokens\n"
          f"are cached, the window restarts from the last {keep}, so every token is predicted from\n"
          f"{keep} to {cfg.context} tokens before it. Each token's bits are divided by the characters it\n"
          "decodes to (the paper divides by bytes; input.txt is ASCII, so they are the same).")
    bits = {}
    t0 = time.perf_counter()
    for level, j in use:
        bits[(level, j)] = fractal.surprisal_bits(params, cfg, val, level, j, keep)
    print(f"Scored {len(use)} node(s) x {len(val) - 1:,} tokens in {time.perf_counter() - t0:.1f} s.")
    lengths = fractal.token_lengths(tokenizer)[val[1:]]
    z = {node: b / lengths for node, b in bits.items()}
    start = int(np.flatnonzero(val[1:] == tokenizer.encode("\n\n")[0])[0]) + 1 if not args.quick else 0
    print(f"\nTen tokens of the val text under the root (0,0):\n  {'token':>8} {'chars':>5} {'bits':>6} {'z_t':>6}")
    for t in range(start, start + 10):
        print(f"  {tokenizer.decode([int(val[t + 1])])!r:>8} {lengths[t]:5d} {bits[(0, 0)][t]:6.2f} {z[(0, 0)][t]:6.2f}")
    skip = cfg.context     # the first window's tokens see less context than the rest
    root = z[(0, 0)][skip:]
    print(f"\nThe series z_t of the root has {len(root):,} points (the first {skip} dropped: shorter context).")
    return bits, z, lengths, root, skip


def four_power_laws(args, root):
    """Section 4: the four fits of the root's series, and the same values shuffled in time."""
    section("4. The integral process X_t and its four power laws")
    fits = fractal.fits(root)
    for name, fit in fits.items():
        print(f"  {fit.name:<22} fitted over scales {int(fit.scales[0]):>4} .. {int(fit.scales[-1]):<5} "
              f"slope {fit.slope:+.3f}  ->  {name} = {fit.exponent:.3f}")
    print(f"  D = 2 - S = {2 - fits['S'].exponent:.3f}")
    rng = np.random.default_rng(args.seed)
    shuffled = rng.permutation(root)
    print(f"Zooming in 8x on X shrinks its wiggles by about 8^J = {8 ** fits['J'].exponent:.2f}; for the same values\n"
          f"shuffled in time (no memory: Brownian motion) by 8^0.5 = {8 ** 0.5:.2f}. integral_process.png shows it:\n"
          "each row zooms 8x into the red part of the row above.")
    sensitivity = {eps: fractal.self_similarity(root, eps).exponent for eps in (0.05, 0.1, 0.2, 0.4)}
    print(("S at other sizes of the ball eps: " if args.quick else
           "S barely depends on the size of the ball eps (the paper's check): ")
          + ", ".join(f"eps {eps}: S {v:.3f}" for eps, v in sensitivity.items()))
    return fits, shuffled


def per_node(args, cfg, use, bits, z, lengths, skip, shuffled, train_tokens, val):
    """Section 5: the parameters per node, next to the shuffled series and a reader with no context."""
    section("5. Does a leaf see the same fractal structure as the root?")
    table, rows = [], {}
    for node in use:
        series = z[node][skip:]
        bpc = bits[node][skip:].sum() / lengths[skip:].sum()
        rows[node_name(node)] = {"width": cfg.width(node[0]), "bits_per_char": float(bpc), **fractal.parameters(series)}
    unigram = unigram_bits(train_tokens, val, cfg.vocab_size)
    rows["(0,0) shuffled"] = {"width": cfg.width(0), "bits_per_char": rows["(0,0)"]["bits_per_char"],
                              **fractal.parameters(shuffled)}
    rows["unigram"] = {"width": 0, "bits_per_char": float(unigram[skip:].sum() / lengths[skip:].sum()),
                       **fractal.parameters(unigram[skip:] / lengths[skip:])}
    print(f"  {'observer':<24} {'width':>5} {'bits/char':>9} " + " ".join(f"{k:>6}" for k in KEYS))
    for name, r in rows.items():
        label = {"unigram": "unigram (no context)", "(0,0) shuffled": "(0,0), shuffled in time"}.get(name, name)
        table.append(f"  {label:<24} {r['width'] or '-':>5} {r['bits_per_char']:9.3f} "
                     + " ".join(f"{r[k]:6.3f}" for k in KEYS))
    print("\n".join(table))
    print(f"  {'paper (PaLM-scale)':<24} {'':>5} {'':>9} " + " ".join(
        f"{PAPER[k][0]:6.2f}" if k in PAPER else f"{'-':>6}" for k in KEYS))
    hs = [rows[node_name(node)]["H"] for node in use]
    bpcs = [rows[node_name(node)]["bits_per_char"] for node in use]
    r = float(np.corrcoef(bpcs, hs)[0, 1]) if len(use) > 2 else float("nan")
    print(f"\nH across the {len(use)} node(s): {min(hs):.3f} .. {max(hs):.3f}.")
    if len(use) > 2:
        print(f"Its correlation with bits/char over the nodes: r = {r:+.2f}" + (
            " (negative: the better the reader,\nthe more memory it finds in the same text)." if r < 0 else "."))
    conclude(args, "The shuffled row is the no-memory baseline (R/S reads about 0.53 there). The unigram row reads\n"
                   "the text with no context at all: its H is the memory of which tokens occur where (names, scenes,\n"
                   "the lengths of tokens), before any prediction.")
    return rows, r


def real_against_generated(args, params, cfg, tokenizer, root, keep):
    """Section 6: the root reads text each node writes at four temperatures, against real text."""
    section("6. Real text against text the models write, at four temperatures")
    length = 256 if args.quick else 4096
    seeds = tuple(args.seed + i for i in range(1 if args.quick else 3))
    gen_nodes = [(0, 0)] if args.quick else list(nodes(cfg))
    jobs = len(gen_nodes) * len(TEMPERATURES) * len(seeds)
    print(f"Each of {len(gen_nodes)} node(s) writes {len(seeds)} sample(s) of {length} tokens at each temperature\n"
          f"{TEMPERATURES}; the root reads every sample. The real text is the root's series of section 3, cut\n"
          f"into pieces of the same {length} tokens. {jobs} samples to write:")
    t0 = time.perf_counter()

    def progress(done, total, row):
        elapsed = time.perf_counter() - t0
        if done == 1 or done % max(1, total // 8) == 0 or done == total:
            print(f"  sample {done:3d}/{total}: node {row['source']} T={row['temperature']} seed {row['seed']}  "
                  f"H {row['H']:.3f}  {elapsed:5.0f} s, left {format_duration(elapsed / done * (total - done))}")

    compared = fractal.real_vs_generated(params, cfg, tokenizer, root, gen_nodes, TEMPERATURES, length,
                                         seeds, keep=keep, log=progress)
    summary = summarise(compared)
    print(f"\n  {'text':<14} {'mean z':>12} " + " ".join(f"{k:>12}" for k in ("H", "S", "J", "H_dfa")))
    for (source, temperature), stats in summary.items():
        label = "real" if source == "real" else f"{source} T={temperature}"
        print(f"  {label:<14} " + " ".join(f"{stats[k][0]:6.3f}+-{stats[k][1]:.3f}"
                                           for k in ("mean_z", "H", "S", "J", "H_dfa")))
    real = summary[("real", None)]
    print(f"\n(mean +- sd: over {int(real['n'])} real pieces, over {len(seeds)} seed(s) per generated row)")
    by_t = {t: [r["H"] for r in compared if r["temperature"] == t] for t in TEMPERATURES}
    print("Mean H of generated text per temperature (all nodes, all seeds), against real "
          f"{real['H'][0]:.3f} +- {real['H'][1]:.3f}:")
    for t, h in by_t.items():
        m, sd = mean_sd(h)
        below = sum(v < real["H"][0] for v in h)
        print(f"  T={t}: H {m:.3f} (spread of the samples {sd:.3f}); {below} of {len(h)} below the real mean")
    failed = [r for r in compared if "failed" in r]
    if failed:
        print(f"{len(failed)} sample(s) could not be measured (NaN above), e.g. {failed[0]['source']} "
              f"T={failed[0]['temperature']}: {failed[0]['failed']}")
    return compared, summary


def node_name(node):
    """(level, index) -> "(l,j)", the name of a node in tables and results.json."""
    return f"({node[0]},{node[1]})"


def calibrate(hursts, n, seeds, seed):
    """{H: {estimator: (mean, sd)}} of each estimator on `seeds` draws of fGn of length n."""
    out = {}
    for h in hursts:
        draws = [fractal.parameters(fractal.fgn(n, h, np.random.default_rng([seed, s]))) for s in range(seeds)]
        out[h] = {k: (float(np.mean([d[k] for d in draws])), float(np.std([d[k] for d in draws]))) for k in KEYS}
    return out


def unigram_bits(train_tokens, val, vocab_size):
    """-log2 of each val token's frequency in the train split (add-one smoothed): a reader with no context."""
    counts = np.bincount(train_tokens, minlength=vocab_size) + 1.0
    return -np.log2(counts / counts.sum())[val[1:]]


def finite(obj):
    """A copy for JSON: NaN (an unmeasurable sample) becomes null, tuples become lists."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def mean_sd(values):
    """(mean, sd) of the finite values, (nan, nan) if there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))


def summarise(rows):
    """{(source, temperature): {key: (mean, sd), "n": count, "failed": count}} over seeds (or real pieces)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["source"], r["temperature"]), []).append(r)
    return {g: {"n": len(rs), "failed": sum("failed" in r for r in rs),
                **{k: mean_sd([r[k] for r in rs]) for k in ("mean_z",) + KEYS}} for g, rs in groups.items()}


def save_figures(root, shuffled, fits, rows, use, summary, calibration, cfg, out):
    """Integral process at three zooms, the four log-log fits, per-node parameters, real vs generated, fGn check."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    paths = []
    fig, axes = plt.subplots(3, 2, figsize=(11, 7.5))
    for col, (series, title) in enumerate([(root, "Shakespeare read by the root (0,0)"),
                                           (shuffled, "the same surprisals, shuffled in time")]):
        X = np.cumsum((series - series.mean()) / series.std())
        lo, hi = 0, len(X)
        for row in range(3):
            ax = axes[row, col]
            t = np.arange(lo, hi)
            ax.plot(t, X[lo:hi], lw=0.6, color="black")
            width = (hi - lo) // 8
            zoom_lo = lo + (hi - lo) // 2 - width // 2
            if row < 2:
                ax.axvspan(zoom_lo, zoom_lo + width, color="red", alpha=0.2)
            ax.set_ylabel(f"X_t, {hi - lo:,} tokens")
            if row == 0:
                ax.set_title(title)
            lo, hi = zoom_lo, zoom_lo + width
        axes[2, col].set_xlabel("token t")
    fig.suptitle("The integral process at three zoom levels (each row: the red part of the row above, 8x)")
    paths.append(save_figure(fig, out / "integral_process.png"))

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    labels = {"H": ("window n", "mean R/S"), "S": ("tau", "P(|X(t+tau)-X(t)| <= eps)"),
              "J": ("tau", "std of X(t+tau)-X(t)"), "DFA": ("window n", "F(n)")}
    for ax, (key, fit) in zip(axes, fits.items()):
        ax.loglog(fit.scales, fit.values, "o", ms=4, color="black")
        ax.loglog(fit.scales, fit.line(fit.scales), "-", color="red", label=f"slope {fit.slope:+.3f}")
        ax.set_xlabel(labels[key][0])
        ax.set_ylabel(labels[key][1])
        ax.set_title(f"{fit.name}: {fit.exponent:.3f}")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    fig.suptitle("The root's surprisal of the val text: four power laws")
    paths.append(save_figure(fig, out / "loglog_fits.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [node_name(node) for node in use] + ["(0,0) shuffled", "unigram"]
    x = np.arange(len(names))
    for i, key in enumerate(("H", "S", "J", "H_dfa")):
        ax.bar(x + (i - 1.5) * 0.2, [rows[n][key] for n in names], 0.2, label=key)
    for key, (m, _) in PAPER.items():
        if key in ("H", "S", "J"):
            ax.axhline(m, ls=":", lw=1, color={"H": "C0", "S": "C1", "J": "C2"}[key])
    ax.axhline(0.5, color="grey", lw=1)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("exponent")
    ax.set_title("Fractal parameters of the val text, per observer (dotted: the paper's medians)")
    ax.legend(ncol=4)
    paths.append(save_figure(fig, out / "per_node.png"))

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    real = summary[("real", None)]
    sources = sorted({s for s, _ in summary if s != "real"})
    colors = plt.cm.viridis(np.linspace(0, 0.85, cfg.levels))
    for ax, key in zip(axes, ("mean_z", "H", "J", "H_dfa")):
        ax.axhspan(real[key][0] - real[key][1], real[key][0] + real[key][1], color="grey", alpha=0.3,
                   label="real text (+- sd)")
        for source in sources:
            level = int(source.strip("()").split(",")[0])
            ts = sorted(t for s, t in summary if s == source)
            ax.errorbar(ts, [summary[(source, t)][key][0] for t in ts], [summary[(source, t)][key][1] for t in ts],
                        marker="o", ms=3, capsize=2, color=colors[level], label=f"level {level}"
                        if source == f"({level},0)" else None)
        ax.set_xlabel("temperature")
        ax.set_title({"mean_z": "mean z (bits/char, read by the root)"}.get(key, key))
    axes[0].legend(fontsize=8)
    fig.suptitle("Text generated by each node, read by the root, against real text")
    paths.append(save_figure(fig, out / "real_vs_generated.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    hs = sorted(calibration)
    for key, label in (("H", "R/S"), ("S", "S"), ("J", "J"), ("H_dfa", "DFA")):
        ax.errorbar(hs, [calibration[h][key][0] for h in hs], [calibration[h][key][1] for h in hs], marker="o",
                    ms=3, capsize=2, label=label)
    ax.plot([0.25, 0.95], [0.25, 0.95], color="grey", lw=1, ls=":")
    ax.set_xlabel("true H of the fGn")
    ax.set_ylabel("estimate")
    ax.set_title("The estimators on fractional Gaussian noise")
    ax.legend()
    paths.append(save_figure(fig, out / "estimators_on_fgn.png"))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
