"""Lesson 4, merging: grow a FractalFormer from small models trained apart, and train only what is new.

Run: python -m tinyfractal.lessons.merging [--quick] [--out DIR] [--steps-per-stage A,B,C] [--joint-steps N]
     [--off-diagonal zero|random]
"""
import dataclasses
import json
import re
import time

import numpy as np

from tinyfractal import Config, Tokenizer
from tinyfractal.core.formulas import rmsnorm, rope, rope_tables, softmax
from tinyfractal.api import init_params
from tinyfractal.core.model import cross_entropy, embed, forward, layer, logits_of, output_gain, output_table
from tinyfractal.core.tree import nodes
from tinyfractal.lessons._common import (conclude, forget_saved, note_saved, output_gain_words, pyplot, run, save_figure,
                                         section, train_with_checkpoints, uninterrupted)
from tinyfractal.training.checkpoint import atomic_write_json, exists, load, save
from tinyfractal.training.data import batch_at, load_tokens
from tinyfractal.training.grow import chunk_data, grow, parse_steps, step_flops, union
from tinyfractal.training.merge import extract, merge, root_loss
from tinyfractal.training.train import TrainConfig, evaluate, format_duration, node_key, one_model_settings

FULL_STEPS = "600,500,1000"     # leaves, the two level-1 merges, the root merge
FULL_JOINT = 800
QUICK_STEPS = "3,2,2"
QUICK_JOINT = 3


def main(argv=None):
    return run("merging", __doc__, lesson, argv, trains=True, arguments=arguments)


def arguments(p):
    p.add_argument("--steps-per-stage", default=None, help=f"leaves first (default {FULL_STEPS}, {QUICK_STEPS} "
                                                           f"with --quick)")
    p.add_argument("--joint-steps", type=int, default=None, help=f"steps of the jointly trained model "
                                                                 f"(default {FULL_JOINT}, {QUICK_JOINT} with --quick)")
    p.add_argument("--off-diagonal", choices=["zero", "random"], default="zero",
                   help="how the new blocks start (random: 0.1 of the usual init)")


def lesson(args):
    if args.joint_steps is not None and args.joint_steps < 1:
        raise ValueError(f"--joint-steps must be >= 1, got {args.joint_steps}")
    cfg, tc, steps, joint_steps, tokens, chunks = the_plan(args)
    grown, stages, leaves = growing(args, cfg, tc, steps, tokens)
    s = cfg.split
    demo = why_a_parent_starts_worse(cfg, tc, leaves, chunks)
    figures = [parent_loss_falls(args, cfg, stages)]
    metrics, budgets, val, alone_steps = baselines(args, cfg, tc, grown, stages, steps, joint_steps, chunks)
    reach, figure = compute_saved(args, cfg, stages, metrics, budgets)
    atomic_write_json(args.out / "summary.json", {
        "config": cfg.to_dict(), "quick": args.quick, "steps_per_stage": steps, "joint_steps": joint_steps,
        "alone_steps": alone_steps, "split": s, "budgets": budgets,
        "val": {name: {node_key(n): v for n, v in losses.items()} for name, losses in val.items()},
        "root_val_curves": {name: [m["eval_step"], m["val"]["0.0"]] for name, m in metrics.items()},
        "reach": reach, "coupling_demo": demo, "figures": [str(f) for f in figures + [figure]]})


def the_plan(args):
    """Section 1: the stages, their steps, the cost of one step of each, and the corpus cut in chunks."""
    section("1. The plan: train small models apart, then merge them")
    cfg = Config.preset("tiny")
    if args.quick:
        cfg = cfg.override(hidden=24, head_dim=8, context=16)
    steps = parse_steps(args.steps_per_stage or (QUICK_STEPS if args.quick else FULL_STEPS), cfg.levels)
    joint_steps = args.joint_steps or (QUICK_JOINT if args.quick else FULL_JOINT)
    tc = TrainConfig(batch_size=4 if args.quick else 16, eval_interval=1 if args.quick else 50,
                     eval_batches=1 if args.quick else 4, log_interval=200, seed=args.seed,
                     warmup=0 if args.quick else 50)
    L, s = cfg.levels, cfg.split
    print(f"Config: {cfg}")
    print(f"The jointly trained model (lesson 1) learns all {cfg.n_nodes} models at once. Growing does it in "
          f"{L} stages:\n"
          f"  stage 1: {s ** (L - 1)} standalone leaf models of width {cfg.width(L - 1)}, each on its own "
          f"contiguous quarter of the corpus;\n"
          f"  stage 2..{L}: merge each {s} of them into the level above (they become its diagonal blocks), freeze "
          f"them,\n           and train only the new entries (the off-diagonal blocks{own_rows(cfg)})\n"
          f"           on the union of their chunks.")
    print(f"Steps per stage (leaves first): {steps}; the joint model: {joint_steps} steps.")
    print("\nCost of one training step (batch {0}, context {1}), matmul FLOPs (3x forward):".format(
        tc.batch_size, cfg.context))
    costs = {"leaf (stage 1)": step_flops(cfg.sub(L - 1), tc.batch_size)}
    for t in range(1, L):
        costs[f"new parent, width {cfg.width(L - 1 - t)} (stage {t + 1})"] = step_flops(cfg.sub(L - 1 - t),
                                                                                     tc.batch_size)
    costs[f"joint: all {cfg.n_nodes} nodes"] = step_flops(cfg, tc.batch_size, levels=range(L))
    for name, flops in costs.items():
        print(f"  {name:<34} {gflop(flops):>8} GFLOP")
    print("A merged stage trains with the new parent's loss alone: its children are frozen, so their losses "
          "cannot move.")
    tokens = load_tokens(Tokenizer.default())
    chunks = chunk_data(tokens, s ** (L - 1), cfg.context)
    print(f"Corpus: {len(tokens):,} tokens in {len(chunks)} chunks of ~{len(tokens) // len(chunks):,}, each split "
          f"90/10.")
    return cfg, tc, steps, joint_steps, tokens, chunks


def gflop(flops):
    """FLOPs as GFLOP, with decimals only where the number is small (a quick run's)."""
    return f"{flops / 1e9:.0f}" if flops >= 1e10 else f"{flops / 1e9:.3f}"


def show_merged(t, record, s):
    """One merge, as it happens: the children kept exactly, and the val losses at the moment of merging."""
    level, g = record["node"]
    kids = ", ".join(f"({level + 1},{s * g + r})" for r in range(s))
    at = record["val_at_merge"]
    width = record.get("width", "?")
    print(f"\n  merged {kids} -> ({level},{g}), width {width}; it trains on chunks "
          f"{record['chunks'][0]}..{record['chunks'][1] - 1}")
    print("    each child still gives exactly its standalone logits: max abs diff = " +
          ", ".join(str(d) for d in record["logit_max_abs_diff"]))
    print(f"    val loss at the moment of merging: parent {at['0.0']:.4f}   children " +
          "  ".join(f"{at[f'1.{r}']:.4f}" for r in range(s)))


def show_trained(t, record, s):
    """One model of a stage, trained: a leaf's val loss, or a parent's with its (unchanged) children's."""
    level, g = record["node"]
    if t == 0:
        print(f"  leaf ({level},{g}) trained on chunk {g}: val loss {record['final_val']['0.0']:.4f} "
              f"on its own chunk ({format_duration(record['seconds'])})")
        return
    print(f"    after {record['steps']} steps on the {record['new_entries']:,} new entries: parent "
          f"{record['final_val']['0.0']:.4f}   children " +
          "  ".join(f"{record['final_val'][f'1.{r}']:.4f}" for r in range(s)) +
          f"   (children bit for bit unchanged: {record['children_unchanged']})")


def saved_growth(args, cfg, steps, folder):
    """With --resume, a finished growth saved in `folder` by this lesson: (params, stages), else None."""
    if not args.resume or not exists(folder):
        return None
    params, saved_cfg, meta = load(folder)
    grown = meta.get("grow", {})
    if saved_cfg != cfg or meta.get("quick") != args.quick or grown.get("steps_per_stage") != steps \
            or grown.get("off_diagonal") != args.off_diagonal:
        raise ValueError(f"cannot resume: {folder} holds another growth (other config, steps or options); "
                         f"run without --resume to start over")
    stages = [json.loads((folder / f"stage{t}.json").read_text(encoding="utf-8"))["models"]
              for t in range(cfg.levels)]
    return params, stages


def saved_growing(folder):
    """on_checkpoint for grow: the Ctrl-C line names the growing model's latest checkpoint."""
    def note(path, step, steps):
        forget_saved(lambda kept: kept.startswith(str(folder / "growing")))
        note_saved(path, step, steps)
    return note


def growing(args, cfg, tc, steps, tokens):
    """Section 2: grow the tree stage by stage (training.grow); with --resume a finished growth is reused,
    and an interrupted one continues: every model is checkpointed as it trains (OUT/grown/growing/).

    Returns (grown params, stage records, the trained leaves).
    """
    section("2. Growing, stage by stage")
    s, folder = cfg.split, args.out / "grown"
    done = saved_growth(args, cfg, steps, folder)
    if done is not None:
        grown, stages = done
        print(f"--resume: reusing the finished growth in {folder}.")
        for t, records in enumerate(stages):
            for record in records:
                if t > 0:
                    show_merged(t, record, s)
                show_trained(t, record, s)
    else:
        def on_merge(t, record, params, model_cfg):
            record["width"] = model_cfg.hidden
            show_merged(t, record, s)

        def progress(msg):
            """Training progress, without the first-step lines (the stage headers say what starts)."""
            if "--resume" in msg or (not args.quick and "step" in msg and not re.search(r"step\s+1/", msg)):
                print("    " + msg)

        grown, stages = grow(cfg, tc, steps, tokens=tokens, off_diagonal=args.off_diagonal, out=folder,
                             log=progress, on_stage=lambda t, record, params, c: show_trained(t, record, s),
                             on_merge=on_merge, resume=args.resume, on_checkpoint=saved_growing(folder))
        _, _, meta = load(folder)          # record the lesson and the kind of run with the grown model
        with uninterrupted():
            save(folder, grown, cfg, {**meta, "lesson": args.name, "quick": args.quick})
    L = cfg.levels
    leaves = [extract(grown, cfg, L - 1, r) for r in range(s)]   # frozen since stage 1: the trained leaves
    return grown, stages, leaves


def why_a_parent_starts_worse(cfg, tc, leaves, chunks):
    """Section 3: re-make the first merge and measure the three couplings of its zero off-diagonal blocks."""
    section("3. Why a parent does not start as the sum of its children")
    L, s = cfg.levels, cfg.split
    child_cfg = cfg.sub(L - 1)
    parent, pcfg = merge(leaves, child_cfg, s)
    print(f"Re-making the first merge (leaves (2,0) and (2,1) -> a model of width {pcfg.hidden}) to look inside it.")
    print("Its off-diagonal blocks are zero, so the children's numbers never mix through a weight. Yet:")
    ids, targets = batch_at(union(chunks, 0, s)[1], tc.batch_size, cfg.context, 99, 0)
    return coupling_demo(parent, pcfg, leaves, child_cfg, ids, targets)


def parent_loss_falls(args, cfg, stages):
    """Section 4: each merged parent's val loss from the merge on, against its best child's; the figure."""
    section("4. How the parent's loss falls while only the new entries train")
    figure = plot_parent_losses(stages, args.out / "parent_loss.png")
    print(f"saved {figure}")
    for t in range(1, cfg.levels):
        for r in stages[t]:
            v = r["metrics"]["val"]["0.0"]
            print(f"  stage {t + 1} parent ({r['node'][0]},{r['node'][1]}): at merge {r['val_at_merge']['0.0']:.4f}"
                  f" -> {v[0]:.4f} after {r['metrics']['eval_step'][0]} steps -> {v[-1]:.4f} after {r['steps']}; "
                  f"best child {min(r['val_at_merge'][f'1.{c}'] for c in range(cfg.split)):.4f}")
    return figure


def baselines(args, cfg, tc, grown, stages, steps, joint_steps, chunks):
    """Section 5: the tree trained jointly and the root trained alone, at the grown tree's FLOPs.

    Both save a checkpoint at every evaluation (OUT/joint, OUT/alone) and continue with --resume.
    """
    section("5. Baselines at the same compute: the tree trained jointly, and the root alone")
    L = cfg.levels
    train_all, val_all = union(chunks, 0, len(chunks))
    joint_step_flops = step_flops(cfg, tc.batch_size, levels=range(L))
    root_step_flops = step_flops(cfg, tc.batch_size)
    alone_steps = max(1, round(joint_steps * joint_step_flops / root_step_flops))
    weighting = (f"the mean loss of all {cfg.n_nodes} nodes" if tc.loss_weights == "nodes" else
                 f"all {cfg.n_nodes} nodes' losses, loss_weights={tc.loss_weights!r}")
    print(f"joint: lesson 1's training ({weighting}), {joint_steps} steps.")
    if tc.loss_weights == "sqrtwidth>nodes":
        print("       (the default: each node's loss weighs sqrt(its width) at step 0, moving linearly to equal\n"
              "       weights at the last step)")
    print(f"alone: the root trained from scratch with its own loss only (what model-growth papers compare\n"
          f"       with), {alone_steps} steps: the same FLOPs, as its step is cheaper.")
    print("Both read the same data as the grown root: the union of the chunks' train parts.")
    budgets = {"grown": {"optimizer steps": sum(r["steps"] for st in stages for r in st),
                         "parallel steps": sum(steps),
                         "flops": sum(r["train_flops"] for st in stages for r in st),
                         "cpu": sum(r["cpu_seconds"] for st in stages for r in st),
                         "wall": sum(r["seconds"] for st in stages for r in st)}}
    runs, metrics = {"grown": grown}, {}
    quiet = (lambda msg: None) if args.quick else (lambda msg: print("    " + msg))
    for name, n, loss_fn in (("joint", joint_steps, None), ("alone", alone_steps, root_loss)):
        params = init_params(cfg, args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        run_tc = dataclasses.replace(tc if loss_fn is None else one_model_settings(tc), steps=n)   # root alone: one model
        _, metrics[name] = train_with_checkpoints(args, args.out / name, params, cfg, run_tc,
                                                  train_all, val_all, loss_fn=loss_fn, log=quiet)
        budgets[name] = {"optimizer steps": n, "parallel steps": n,
                         "flops": n * (joint_step_flops if loss_fn is None else root_step_flops),
                         "cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
        runs[name] = params
    print("\nBudgets (training only; evaluation not counted" + ("; --resume: times of this run only)" if args.resume
                                                             else ")") + ":")
    print(f"  {'':<6} {'optimizer steps':>15} {'parallel steps':>14} {'GFLOP':>8} {'CPU s':>6} {'wall s':>6}")
    for name, b in budgets.items():
        print(f"  {name:<6} {b['optimizer steps']:15d} {b['parallel steps']:14d} {gflop(b['flops']):>8} "
              f"{b['cpu']:6.0f} {b['wall']:6.0f}")
    print("  optimizer steps: every model's steps added up; parallel steps: the models of a stage are\n"
          "  independent, so with enough cores a stage takes as long as one of them. Equal steps and equal\n"
          f"  FLOPs cannot both hold: a joint step runs all {cfg.n_nodes} models, a grown step one.")
    batches = 2 if args.quick else 16
    val = {name: evaluate(params, cfg, val_all, tc.batch_size, batches) for name, params in runs.items()}
    print(f"\nPer-node val loss on the same {batches} batches of the union of the chunks' val parts:")
    print(f"  {'node':>6} {'width':>5} {'grown':>8} {'joint':>8} {'alone':>8} {'grown - joint':>14}")
    for node in nodes(cfg):
        print(f"  {str(node).replace(' ', ''):>6} {cfg.width(node[0]):5d} {val['grown'][node]:8.4f} "
              f"{val['joint'][node]:8.4f} {val['alone'][node]:8.4f} {val['grown'][node] - val['joint'][node]:+14.4f}")
    print("  The 'alone' run trains the root's loss only: its sub-models never learn.")
    conclude(args, "  Only a FractalFormer trained as a tree (jointly or by growing) gives useful models at every node.")
    return metrics, budgets, val, alone_steps


def compute_saved(args, cfg, stages, metrics, budgets):
    """Section 6: the compute the grown root needs to reach each baseline root's loss, and the other way; figure."""
    section("6. How much compute does growing save?")
    reach = {name: steps_to_reach(args, stages, metrics[name], budgets[name]["flops"], name)
             for name in ("joint", "alone")}
    print("\nModel-growth papers (bert2BERT, LiGO) warm-start a large model from smaller trained ones, then train\n"
          "ALL of it, and report 45-50% less compute than training the large model from scratch at equal loss.\n"
          "Here the children stay frozen, so a parent learns only through its new entries (its off-diagonal\n"
          f"blocks{own_rows(cfg)}), and the grown tree holds {cfg.n_nodes} trained models,\n"
          f"as the joint one does; the root alone is one model.")
    for name, r in reach.items():
        conclude(args, f"  against the {name} run: " + (f"{r['saving']:.0%} of the compute saved to reach its root's "
                                                        f"loss" if r["reached"] else "its root's loss is not reached"))
    figure = plot_root_vs_flops(stages, metrics, budgets, args.out / "root_vs_flops.png")
    print(f"saved {figure}")
    return reach, figure


def own_rows(cfg):
    """', and its own rows of logit_gain and node_gain' (the per-node tables a merge adds new), or ''."""
    tables = [name for name, on in (("logit_gain", cfg.logit_scale == "learned"), ("node_gain", cfg.node_gains)) if on]
    return f", and its own row{'s' if len(tables) > 1 else ''} of {' and '.join(tables)}" if tables else ""


def attention_probs(x, Wq, Wk, h, theta):
    """Layer-0 attention probabilities of one model on its normalised input x: (B,H,T,T)."""
    B, T, D = x.shape
    H, K = Wq.shape[1], Wk.shape[1]
    q = np.reshape(np.reshape(x, (B * T, D)) @ np.reshape(Wq, (D, H * h)), (B, T, H, h))
    k = np.reshape(np.reshape(x, (B * T, D)) @ np.reshape(Wk, (D, K * h)), (B, T, K, h))
    cos, sin = rope_tables(T, h, theta)
    q, k = rope(q, cos, sin), np.repeat(rope(k, cos, sin), H // K, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(h)
    return softmax(np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -1e30))


def coupling_demo(parent, pcfg, children, child_cfg, ids, targets):
    """The three couplings of a merge with zero off-diagonals, measured on one batch (section 3)."""
    s, d, h = pcfg.split, child_cfg.hidden, child_cfg.head_dim
    x = rmsnorm(parent["E"][ids], parent["emb_norm"], pcfg.eps)                # (B,T,D), full width
    xs = [rmsnorm(c["E"][ids], c["emb_norm"], child_cfg.eps) for c in children]  # (B,T,d) each
    print("\n(a) RMSNorm divides by the RMS over the FULL width, which mixes the children's scales.")
    print("    After the first norm, child r's slice of the parent's state is child r's own state times")
    print("    rms(child r) / rms(all): one factor per token, 1 only by chance.")
    norm_ratios = []
    for r in range(s):
        ratio = (x[..., r * d:(r + 1) * d] / xs[r])[..., 0]
        norm_ratios.append([float(ratio.min()), float(ratio.mean()), float(ratio.max())])
        print(f"    child {r}: factor min {ratio.min():.3f}  mean {ratio.mean():.3f}  max {ratio.max():.3f}")

    print("\n(b) RoPE pairs component m with m + head_dim/2 of the SAME head, at angle pos * theta^(-2m/hd).")
    hp = pcfg.head_dim
    print(f"    child (head dim {h}): pairs " + ", ".join(f"({m},{m + h // 2})" for m in range(h // 2)) +
          f"; frequencies " + ", ".join(f"{pcfg.rope_theta ** (-2 * m / h):.3g}" for m in range(h // 2)))
    print(f"    parent (head dim {hp}): pairs " + ", ".join(f"({m},{m + hp // 2})" for m in range(hp // 2)) +
          f"; frequencies " + ", ".join(f"{pcfg.rope_theta ** (-2 * m / hp):.3g}" for m in range(hp // 2)))
    print(f"    So the parent rotates child 0's component m together with child 1's component m, at a")
    print(f"    different speed. On the layer-0 queries of this batch:")
    p0 = parent["layers"][0]
    B, T, D = x.shape
    H = pcfg.heads
    q = np.reshape(np.reshape(x, (B * T, D)) @ np.reshape(p0["Wq"], (D, H * hp)), (B, T, H, hp))
    cos, sin = rope_tables(T, hp, pcfg.rope_theta)
    cos_c, sin_c = rope_tables(T, h, pcfg.rope_theta)
    merged_rope = rope(q, cos, sin)
    apart_rope = np.concatenate([rope(q[..., r * h:(r + 1) * h], cos_c, sin_c) for r in range(s)], axis=-1)
    rope_diff = float(np.abs(merged_rope - apart_rope).max())
    print(f"    max |parent's RoPE(q) - each child's RoPE on its own slice| = {rope_diff:.3f} "
          f"(|q| max {np.abs(q).max():.3f})")

    print("\n(c) Merged heads: the parent's head holds every child's slice of that head, so its score is")
    print(f"    the SUM of the children's q.k, divided by sqrt({hp}) instead of sqrt({h}); one softmax over the")
    print("    sum replaces a softmax per child. Layer-0 attention, parent vs each child (same input slice):")
    parent_att = attention_probs(x, p0["Wq"], p0["Wk"], hp, pcfg.rope_theta)
    tv = []
    for r in range(s):
        c0 = children[r]["layers"][0]
        child_att = attention_probs(x[..., r * d:(r + 1) * d], c0["Wq"], c0["Wk"], h, pcfg.rope_theta)
        tv.append(float(0.5 * np.abs(parent_att - child_att).sum(-1)[..., 1:].mean()))
        print(f"    child {r}: mean total-variation distance between the attention rows = {tv[-1]:.3f} "
              f"(0 = same, 1 = disjoint)")

    print("\n(d) The parent's logits against the sum of its children's, and the losses on this batch.")
    plog = forward(parent, pcfg, ids)
    clogs = [forward(c, child_cfg, ids) for c in children]
    total = sum(clogs)
    # Every node multiplies its normalised final state by its own output gain (output_gain) before the tied
    # output. Without the couplings, the parent's slice r would be child r's final state, so the parent
    # would give the sum over r of child r's logits computed with the PARENT's gain on slice r in place of
    # child r's own. Under logit_scale="sqrt" alone that is a fixed 1/sqrt(s) x the sum; with the learned
    # temperature and node_gains the ratio is per coordinate and depends on what each child learned.
    D = pcfg.hidden
    gain_p = np.broadcast_to(np.asarray(output_gain(parent, pcfg), dtype=np.float64), (D,))     # (D,)
    ratios, at_parent = [], 0.0
    for r, c in enumerate(children):
        gain_c = np.broadcast_to(np.asarray(output_gain(c, child_cfg), dtype=np.float64), (d,))  # (d,)
        ratio = gain_p[r * d:(r + 1) * d] / gain_c
        ratios.append([float(ratio.min()), float(ratio.mean()), float(ratio.max())])
        at_parent = at_parent + logits_at_gain(c, child_cfg, ids, gain_p[r * d:(r + 1) * d].astype(np.float32))
    print("    Every node scales its normalised final state by its own output gain, from its own table rows:")
    print("\n".join("    " + line for line in output_gain_words(pcfg)))
    if pcfg.logit_scale == "learned" or pcfg.node_gains:
        print("    The parent's own rows of those tables are new at a merge and start at 0; each child's rows were")
        print(f"    trained with the child. The parent's gain at merge: min {gain_p.min():.4f}  max {gain_p.max():.4f}"
              f" (1/sqrt({D}) = {1 / np.sqrt(D):.4f}).")
    print("    The parent's gain divided by child r's, coordinate by coordinate, on child r's slice:")
    for r, (lo, mean, hi) in enumerate(ratios):
        print(f"    child {r}: ratio min {lo:.3f}  mean {mean:.3f}  max {hi:.3f}")
    fixed = all(abs(hi - lo) <= 1e-6 * abs(mean) for lo, mean, hi in ratios) and \
        max(m for _, m, _ in ratios) - min(m for _, m, _ in ratios) <= 1e-6
    losses = {"parent at merge": float(cross_entropy(plog, targets))}
    for r, lg in enumerate(clogs):
        losses[f"child {r}"] = float(cross_entropy(lg, targets))
    losses["sum of the children's logits"] = float(cross_entropy(total, targets))
    losses["the sum at the parent's gains"] = float(cross_entropy(at_parent, targets))
    losses["mean of the children's logits"] = float(cross_entropy(total / s, targets))
    print(f"    max |parent logits - the children's logits summed at the parent's gains| = "
          f"{np.abs(plog - at_parent).max():.3f} (|logits| max {np.abs(at_parent).max():.3f})")
    for name, value in losses.items():
        print(f"    {name:<32} loss {value:.4f}")
    print("    The output is rmsnorm(x) . rmsnorm_rows(E)^T over the full width, times the node's own output gain:")
    print("    with the couplings removed the parent WOULD give the sum of its children's logits, each computed")
    if fixed:
        print(f"    at the parent's gain, here a fixed {ratios[0][1]:.3f} x the child's: a product of experts that counts")
        print(f"    each child's confidence at {ratios[0][1]:.3f} of its strength.")
    else:
        print("    at the parent's gain in place of its own: a product of experts weighted by the parent's untrained")
        print("    gain, which undoes each child's learned temperature and per-coordinate gain.")
    print("    Training the new entries (the off-diagonal blocks and the parent's own gain rows) calibrates the parent.")
    return {"norm_factor_min_mean_max": norm_ratios, "rope_max_abs_diff": rope_diff, "attention_tv": tv,
            "gain_ratio_min_mean_max": ratios, "losses": losses}


def logits_at_gain(params, cfg, ids, gain):
    """One model's logits with `gain` in place of its own output gain (model.output, another gain):
    ids (B,T) -> (B,T,V). With gain = output_gain(params, cfg) this is forward(params, cfg, ids)."""
    x = embed(params["E"], params["emb_norm"], np.asarray(ids), cfg.eps)      # (B,T,d)
    for p in params["layers"]:
        x = layer(x, p, cfg)
    return logits_of(x, params["final_norm"], output_table(params["E"], params["out_norm"], cfg.eps), cfg.eps, gain)


def steps_to_reach(args, stages, baseline, baseline_flops, name):
    """Root steps and FLOPs the grown root needs to reach a baseline root's final val loss (section 6),
    and the baseline's steps to reach the grown root's final val loss. Curves are read at every eval."""
    root = stages[-1][0]
    target = baseline["val"]["0.0"][-1]
    before = sum(r["train_flops"] for st in stages[:-1] for r in st)
    curve = list(zip(root["metrics"]["eval_step"], root["metrics"]["val"]["0.0"]))
    print(f"\nTarget: the {name} root's final val loss {target:.4f} ({baseline['eval_step'][-1]} steps, "
          f"{gflop(baseline_flops)} GFLOP). The grown root's stage starts after {gflop(before)} GFLOP.")
    hit = next(((step, v) for step, v in curve if v <= target), None)
    result = {"target": target, "before_root_flops": before, "baseline_flops": baseline_flops}
    if hit is None:
        best_step, best = min(curve, key=lambda c: c[1])
        conclude(args, f"  The grown root does NOT reach it in {root['steps']} steps: best {best:.4f} at step {best_step}.")
        result.update(reached=False, best=best, best_step=best_step)
    else:
        step, v = hit
        spent = before + root["step_flops"] * step
        result.update(reached=True, root_step=step, spent_flops=spent, saving=1 - spent / baseline_flops)
        conclude(args, f"  The grown root reaches it at root step {step} (val {v:.4f}; evals every "
                       f"{curve[1][0] - curve[0][0] if len(curve) > 1 else step} steps), after {gflop(spent)} GFLOP "
                       f"in all: {result['saving']:.0%} of the {name} run's compute saved.")
    grown_final, grown_flops = root["final_val"]["0.0"], before + root["train_flops"]
    back = next((step for step, v in zip(baseline["eval_step"], baseline["val"]["0.0"]) if v <= grown_final), None)
    if back is None:
        conclude(args, f"  The other way round: the {name} root never reaches the grown root's final "
                       f"{grown_final:.4f} in its {baseline['eval_step'][-1]} steps.")
    else:
        needed = baseline_flops * back / baseline["eval_step"][-1]
        conclude(args, f"  The other way round: the {name} root reaches the grown root's final {grown_final:.4f} at "
                       f"step {back}, after {gflop(needed)} GFLOP; growing spent {grown_flops / needed:.2f}x that.")
        result["baseline_flops_to_grown_final"] = needed
    result["baseline_step_to_grown_final"] = back
    return result


def plot_parent_losses(stages, path):
    """Val loss of every merged parent from the moment of merging, with its children's as dashed lines."""
    plt = pyplot()
    merged = [r for st in stages[1:] for r in st]
    fig, axes = plt.subplots(1, len(merged), figsize=(4.2 * len(merged), 3.6), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], merged):
        steps = [0] + r["metrics"]["eval_step"]
        ax.plot(steps, [r["val_at_merge"]["0.0"]] + r["metrics"]["val"]["0.0"], "o-", ms=3, label="parent")
        for key, value in sorted(r["val_at_merge"].items()):
            if key.startswith("1."):
                ax.axhline(value, ls="--", lw=1, color="gray")
        ax.plot([], [], ls="--", color="gray", label="children (frozen)")
        ax.set_title(f"parent ({r['node'][0]},{r['node'][1]})")
        ax.set_xlabel("steps on the new blocks")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("val loss (nats/token)")
    fig.suptitle("Each merged parent's val loss while only its new blocks train")
    return save_figure(fig, path)


def plot_root_vs_flops(stages, metrics, budgets, path):
    """Root val loss against training FLOPs spent so far: grown (its root stage) and the baselines."""
    root = stages[-1][0]
    before = sum(r["train_flops"] for st in stages[:-1] for r in st)
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    grown = [root["val_at_merge"]["0.0"]] + root["metrics"]["val"]["0.0"]
    ax.plot([(before + root["step_flops"] * s) / 1e9 for s in [0] + root["metrics"]["eval_step"]], grown, "o-", ms=3,
            label="grown root")
    curves = [grown]
    for (name, m), marker in zip(metrics.items(), "s^"):
        per_step = budgets[name]["flops"] / budgets[name]["optimizer steps"]
        ax.plot([per_step * s / 1e9 for s in m["eval_step"]], m["val"]["0.0"], marker + "-", ms=3,
                label=f"{name} root")
        curves.append(m["val"]["0.0"])
    ax.axvline(before / 1e9, ls=":", color="gray", label="leaves + level-1 merges done")
    # From the data: every curve's end and the whole grown curve stay in view; a baseline's first
    # evaluations, far above (tens of nats), may be cut off at the top so the ends can be compared.
    low = min(min(c) for c in curves)
    high = max(max(grown), max(c[-1] for c in curves))
    margin = 0.08 * (high - low) or 0.1
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("training GFLOP spent (matmuls, 3x forward)")
    ax.set_ylabel("root val loss (nats/token)")
    ax.set_title("The root's loss against the compute spent to get it")
    ax.legend()
    return save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
