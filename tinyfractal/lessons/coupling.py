"""Lesson 5, coupling: the levels talk to each other (upstream and downstream residuals) vs the base model.

Run: python -m tinyfractal.lessons.coupling [--quick] [--out DIR] [--steps N] [--seed S] [--resume]
"""
import time

import numpy as np
from autograd import value_and_grad

from tinyfractal import Config, Tokenizer, init_params, nodes
from tinyfractal.api import needed_nodes, node_run_flops, tree_loss
from tinyfractal.core import fast
from tinyfractal.core.flops import coupling_add_flops
from tinyfractal.inference import decoder
from tinyfractal.inference.sample import generate
from tinyfractal.lessons.base import STEPS as BASE_STEPS
from tinyfractal.lessons._common import conclude, pyplot, run, save_figure, section, train_with_checkpoints
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import batch_at, load_tokens, train_val_split, unigram_entropy
from tinyfractal.training.train import TrainConfig, format_duration, node_key
from tinyfractal.variants import coupled as C
from tinyfractal.variants import variant_of

PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou R"
VARIANTS = ("base", "upstream", "downstream")
BASE_LESSON_STEPS = BASE_STEPS[0]   # three models at the base lesson's step count would take too long here
STEPS = (500, 6)           # per variant: full run, --quick


def main(argv=None):
    return run("coupling", __doc__, lesson, argv, steps=STEPS, trains=True)


def configs():
    """The three variants of 'tiny': same shapes, different links between the levels."""
    tiny = Config.preset("tiny")
    return {"base": tiny, "upstream": tiny.override(coupling="upstream"),
            "downstream": tiny.override(coupling="downstream")}


def name(node):
    return f"({node[0]},{node[1]})"


def lesson(args):
    cfgs = configs()
    cfg = cfgs["base"]
    tokenizer = Tokenizer.default()
    ids = np.array([tokenizer.encode(PROMPT)[-12:]])
    what_flows_where(cfgs)
    a_level_is_a_reshape(args, cfgs, ids)
    flops_step, run_flops = what_it_costs(cfgs, ids)
    trained, metrics, seconds, tc, train_tokens = training(args, cfgs, tokenizer)
    entropy = unigram_entropy(train_tokens, cfg.vocab_size)
    final = per_node_table(args, cfg, trained, metrics, entropy)
    samples = samples_from_each(args, cfgs, trained, tokenizer)
    step_time, in_training = step_times(args, cfgs, trained, train_tokens, tc, seconds)
    section("8. Figures")
    for f in save_figures(cfg, metrics, final, run_flops, args.out):
        print(f"saved {f}")
    atomic_write_json(args.out / "summary.json", {
        "steps": tc.steps, "quick": args.quick, "batch_size": tc.batch_size, "train_seconds": seconds,
        "unigram_entropy": entropy, "val": {v: {node_key(n): x for n, x in final[v].items()} for v in VARIANTS},
        "step_seconds_median": step_time, "step_seconds_in_training": in_training,
        "train_step_flops": flops_step,
        "node_run_flops": {node_key(n): f for n, f in run_flops.items()},
        "coupling_scale": {v: np.asarray(trained[v]["coupling_scale"]).tolist() for v in ("upstream", "downstream")},
        "samples": samples})


def what_flows_where(cfgs):
    """Section 1: the three variants, and which nodes each must run to run one node."""
    section("1. Three ways to run a tree of models")
    cfg = cfgs["base"]
    print(f"The 'tiny' preset: levels={cfg.levels}, split={cfg.split}, widths "
          f"{[cfg.width(l) for l in range(cfg.levels)]}, {cfg.layers} layers.")
    print("""
base        every node runs alone. Node (l,j) reads only its own blocks of the shared arrays.
upstream    after every layer, each parent adds scale[l,i] * (its children's residual states, side by
            side). Child r fills coordinates [r*d, (r+1)*d) of the parent: the same coordinates its
            weights own. Leaves receive nothing. To run a node you must run its whole subtree.
downstream  after every layer, each child (l,k) adds scale[l,i] * (its slice of the parent's state):
            the parent's coordinates that the child owns. The root receives nothing. To run a node
            you must run its chain of ancestors.
scale       coupling_scale, one learnable number per (receiving level, layer), starting at 1.0.""")
    print(f"\n{'node':>6}  {'base runs':<12} {'upstream runs':<44} downstream runs")
    for node in ((0, 0), (1, 1), (cfg.levels - 1, cfg.n_models(cfg.levels - 1) - 1)):
        runs = {v: " ".join(name(n) for n in needed_nodes(c, *node)) for v, c in cfgs.items()}
        print(f"{name(node):>6}  {runs['base']:<12} {runs['upstream']:<44} {runs['downstream']}")


def a_level_is_a_reshape(args, cfgs, ids):
    """Section 2: the coupling of a whole level is a reshape; with scale 0 the coupled tree is the base model."""
    section("2. The coupling for a whole level is a reshape")
    cfg, up = cfgs["base"], cfgs["upstream"]
    params = init_params(up, args.seed)
    still = dict(params, coupling_scale=np.zeros_like(params["coupling_scale"]))   # scale 0: the base states
    states, _ = variant_of(up).run_states(still, up, ids, C.all_models(up))
    x2, x1 = states[2], states[1]
    joined = C.concat_children(x2, up.split)
    by_hand = np.stack([np.concatenate([x2[2 * j], x2[2 * j + 1]], axis=-1) for j in range(2)])
    print(f"Training keeps the states of one level in one array: level 2 is {x2.shape} (N, B, T, d).")
    print(f"concat_children: reshape to (2, 2, B, T, 24), move the child axis next to d, reshape:"
          f" {x2.shape} -> {joined.shape},")
    print(f"exactly level 1's shape {x1.shape}. Equal to concatenating each pair by hand: "
          f"{np.array_equal(joined, by_hand)}")
    pieces = C.split_to_children(x1, up.split)
    print(f"split_to_children is the inverse: {x1.shape} -> {pieces.shape}; "
          f"child 3 gets parent 1's second half: {np.array_equal(pieces[3], x1[1][..., 24:])}")
    zero = up.override(coupling_scale_init=0.0)
    p0 = init_params(zero, args.seed)
    base_params = {k: v for k, v in p0.items() if k != "coupling_scale"}
    worst = max(float(np.abs(C.forward_tree(p0, zero, ids)[l] - fast.forward_level(base_params, cfg, l, ids)).max())
                for l in range(cfg.levels))
    print(f"With coupling_scale_init=0 the coupled tree IS the base model at step 0: max |logit difference| "
          f"over all nodes = {worst}")


def what_it_costs(cfgs, ids):
    """Section 3: FLOPs of a training step per variant, and FLOPs to run one node, checked by the decoder."""
    section("3. What it costs: FLOPs")
    cfg = cfgs["base"]
    leaf = (cfg.levels - 1, 0)
    B, T = 16, cfg.context
    flops_step = {v: variant_of(c).train_step_flops(c, B) for v, c in cfgs.items()}
    print(f"One training step (batch {B} x {T} tokens, forward + backward ~ 3 x forward) runs the whole tree in")
    print("every variant; the coupling only adds a multiply and an add per coordinate per layer:")
    for v in VARIANTS:
        print(f"  {v:<10} {flops_step[v] / 1e9:8.4f} GFLOP per step  ({flops_step[v] / flops_step['base']:.5f} x base)")
    print(f"\nRunning ONE node on {T} tokens is where the variants differ (its own logits only):")
    print(f"{'node':>6} {'width':>5}  " + "  ".join(f"{v:>18}" for v in VARIANTS))
    run_flops = {}
    for node in nodes(cfg):
        run_flops[node] = {v: node_run_flops(c, *node, T) for v, c in cfgs.items()}
        cells = [f"{run_flops[node][v] / 1e6:8.2f} M ({run_flops[node][v] / run_flops[node]['base']:4.2f}x)"
                 for v in VARIANTS]
        print(f"{name(node):>6} {cfg.width(node[0]):5d}  " + "  ".join(f"{c:>18}" for c in cells))
    down = cfgs["downstream"]
    counted = decoder.node_decoder(init_params(down, 0), down, *leaf)
    decoder.prefill(counted, ids[:, :1].repeat(T, axis=1))
    adds = sum(coupling_add_flops(down, m, T) for m, _ in needed_nodes(down, *leaf) if m > 0)
    print(f"Check: the decoder counted {counted.flops:,} matmul FLOPs for leaf {name(leaf)} under downstream;"
          f" the formula says {run_flops[leaf]['downstream'] - adds:,} (+ {adds:,} for the coupling adds).")
    print("Upstream makes the root cost its whole subtree; downstream makes every leaf pay for its\n"
          "ancestors, the root included, so a leaf is no longer the cheap model to run.")
    return flops_step, run_flops


def training(args, cfgs, tokenizer):
    """Section 4: the three variants trained with the same seed, batches and steps; checkpoints in OUT/VARIANT."""
    section("4. Training base, upstream and downstream: same seed, same batches, same steps")
    steps = args.steps
    batch = 8 if args.quick else 16
    tc = TrainConfig(steps=steps, batch_size=batch, lr=3e-3, min_lr=3e-4, warmup=min(50, steps // 10),
                     eval_interval=max(1, steps // 10), eval_batches=1 if args.quick else 8,
                     log_interval=max(1, steps // 5), seed=args.seed)
    if not args.quick and steps < BASE_LESSON_STEPS:
        print(f"{steps} steps per variant (the base lesson trains {BASE_LESSON_STEPS}; three runs of "
              f"{BASE_LESSON_STEPS} would take too long).")
    print(f"Settings: {tc}")
    print(f"Each variant saves a checkpoint at every evaluation in {args.out}/VARIANT (--resume continues).")
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    trained, metrics, seconds = {}, {}, {}
    for v in VARIANTS:
        print(f"\n--- {v} ---")
        trained[v] = init_params(cfgs[v], args.seed)
        t0 = time.perf_counter()
        _, metrics[v] = train_with_checkpoints(args, args.out / v, trained[v], cfgs[v], tc, train_tokens, val_tokens)
        seconds[v] = time.perf_counter() - t0
        print(f"{v}: {steps} steps in {format_duration(seconds[v])} (evaluations included)")
    return trained, metrics, seconds, tc, train_tokens


def per_node_table(args, cfg, trained, metrics, entropy):
    """Section 5: every node's final val loss under the three variants, level means, the learned scales."""
    section("5. Validation loss of every node, side by side")
    print(f"After {args.steps} steps; unigram entropy {entropy:.3f} nats. Lower is better.")
    print(f"{'node':>6} {'width':>5} " + " ".join(f"{v:>10}" for v in VARIANTS) + "   up-base  down-base")
    final = {v: {node: metrics[v]["val"][node_key(node)][-1] for node in nodes(cfg)} for v in VARIANTS}
    for node in nodes(cfg):
        row = [final[v][node] for v in VARIANTS]
        print(f"{name(node):>6} {cfg.width(node[0]):5d} " + " ".join(f"{x:10.4f}" for x in row)
              + f"   {row[1] - row[0]:+7.4f}  {row[2] - row[0]:+9.4f}")
    for level in range(cfg.levels):
        means = [np.mean([final[v][(level, j)] for j in range(cfg.n_models(level))]) for v in VARIANTS]
        print(f"{'level ' + str(level):>12} " + " ".join(f"{x:10.4f}" for x in means) + "   (mean)")
    print("\nThe learned coupling scales (rows: receiving level, columns: layer):")
    for v in ("upstream", "downstream"):
        print(f"  {v:<10} " + "  ".join("[" + " ".join(f"{x:+.3f}" for x in row) + "]"
                                        for row in np.asarray(trained[v]["coupling_scale"])))
    print("Upstream leaves are untouched (row 2 unused) and the downstream root is untouched (row 0 unused):\n"
          "those scales get no gradient and stay at 1.")
    return final


def samples_from_each(args, cfgs, trained, tokenizer):
    """Section 6: a sample from a leaf and from the root under each variant."""
    section("6. A sample from a leaf and from the root under each")
    cfg = cfgs["base"]
    samples = {}
    for v in VARIANTS:
        for node in ((cfg.levels - 1, 0), (0, 0)):
            text = generate(trained[v], cfgs[v], tokenizer, PROMPT, level=node[0], index=node[1],
                            max_new_tokens=12 if args.quick else 60, temperature=0.8, top_k=40, seed=args.seed)
            samples[f"{v} {node_key(node)}"] = text
            print(f"--- {v}, node {name(node)} (width {cfg.width(node[0])}) ---\n{text[len(PROMPT):]!r}\n")
    return samples


def step_times(args, cfgs, trained, train_tokens, tc, seconds):
    """Section 7: one training step of each variant timed side by side, and the wall time per step in training."""
    section("7. Training step time relative to base (measured side by side)")
    step_time = time_steps(cfgs, trained, train_tokens, tc.batch_size, args.seed, repeats=1 if args.quick else 5)
    in_training = {v: seconds[v] / tc.steps for v in VARIANTS}
    print(f"{'variant':<11} {'step (median)':>14} {'x base':>7}   {'in training*':>12} {'x base':>7}")
    for v in VARIANTS:
        print(f"{v:<11} {step_time[v] * 1000:11.1f} ms {step_time[v] / step_time['base']:7.3f}   "
              f"{in_training[v] * 1000:9.1f} ms {in_training[v] / in_training['base']:7.3f}")
    print("* wall time of the training run per step, evaluations included (with --resume: of this run only);\n"
          "  on a shared machine the side-by-side median (one step of each variant in turn, same batch) is\n"
          "  the fairer number.")
    conclude(args, "The FLOPs per step are the same (section 3), so any difference comes from the reshapes and\n"
                   "adds between levels, and from running the levels layer by layer together instead of one\n"
                   "after another; a ratio within a few percent of 1 is noise on a shared machine.")
    return step_time, in_training


def time_steps(cfgs, trained, tokens, batch, seed, repeats):
    """Median seconds of one value-and-gradient step per variant, the variants taking turns."""
    ids, targets = batch_at(tokens, batch, cfgs["base"].context, seed, 0)
    steps = {}
    for v, c in cfgs.items():
        steps[v] = value_and_grad(lambda p, c=c: tree_loss(p, c, ids, targets))
        steps[v](trained[v])                                                  # warm up
    times = {v: [] for v in cfgs}
    for _ in range(repeats):
        for v in cfgs:
            t0 = time.perf_counter()
            steps[v](trained[v])
            times[v].append(time.perf_counter() - t0)
    return {v: float(np.median(t)) for v, t in times.items()}


def save_figures(cfg, metrics, final, run_flops, out):
    """Val loss per level over training for the three variants; final per-node loss; FLOPs to run a node."""
    plt = pyplot()
    paths, colors = [], {"base": "#444444", "upstream": "#d95f02", "downstream": "#1b9e77"}
    fig, axes = plt.subplots(1, cfg.levels, figsize=(4 * cfg.levels, 3.8), sharey=True)
    for level, ax in enumerate(axes):
        for v in VARIANTS:
            curve = np.mean([metrics[v]["val"][node_key((level, j))] for j in range(cfg.n_models(level))], axis=0)
            ax.plot(metrics[v]["eval_step"], curve, color=colors[v], label=v)
        ax.set_title(f"level {level} (width {cfg.width(level)}), mean of {cfg.n_models(level)}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("val loss (nats/token)")
    axes[0].legend()
    paths.append(save_figure(fig, out / "loss_curves.png"))

    all_nodes = nodes(cfg)
    x = np.arange(len(all_nodes))
    for fname, values, ylabel, title in (
            ("node_val_loss.png", {v: [final[v][n] for n in all_nodes] for v in VARIANTS},
             "val loss (nats/token)", "Final validation loss of every node"),
            ("node_run_flops.png", {v: [run_flops[n][v] / 1e6 for n in all_nodes] for v in VARIANTS},
             "MFLOP for one sequence", f"FLOPs to run one node on {cfg.context} tokens")):
        fig, ax = plt.subplots(figsize=(8, 3.8))
        for k, v in enumerate(VARIANTS):
            ax.bar(x + (k - 1) * 0.27, values[v], width=0.27, color=colors[v], label=v)
        ax.set_xticks(x, [name(n) for n in all_nodes])
        ax.set_xlabel("node (level, index)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if fname == "node_val_loss.png":
            low = min(min(vals) for vals in values.values())
            ax.set_ylim(bottom=max(0.0, low - 0.3))
        ax.legend()
        paths.append(save_figure(fig, out / fname))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
