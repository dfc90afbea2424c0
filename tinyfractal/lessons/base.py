"""Lesson 1, the base model: one set of arrays, a tree of models, every one of them trained.

Run: python -m tinyfractal.lessons.base [--quick] [--out DIR] [--steps N] [--seed S] [--resume]
"""
import time

import numpy as np

from tinyfractal import Config, Tokenizer, count_params, forward, generate, init_params, nodes, view
from tinyfractal.lessons._common import conclude, run, section, train_with_checkpoints
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import load_tokens, train_val_split, unigram_entropy
from tinyfractal.training.train import TrainConfig, format_duration, level_weights_at, loss_table, node_key

PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou R"
STEPS = (1000, 4)     # full run, --quick


def main(argv=None):
    return run("base", __doc__, lesson, argv, steps=STEPS, trains=True)


def lesson(args):
    cfg, params = the_tree(args)
    one_weight_many_views(cfg, params)
    tokenizer = Tokenizer.default()
    same_forward_everywhere(cfg, params, tokenizer)
    metrics, entropy, seconds = training(args, cfg, params, tokenizer)
    per_node_loss(args, cfg, metrics, entropy)
    samples = sample_every_node(args, cfg, params, tokenizer)
    figures(cfg, params, metrics, entropy, args.out)
    atomic_write_json(args.out / "summary.json", {
        "steps": args.steps, "quick": args.quick, "train_seconds": seconds, "unigram_entropy": entropy,
        "val": {k: v[-1] for k, v in metrics["val"].items()}, "samples": samples})


def the_tree(args):
    """Section 1: the 'tiny' config, the size of each level's models, the tree."""
    section("1. The config and the tree of models")
    cfg = Config.preset("tiny")
    print(f"The 'tiny' preset: {cfg}")
    print(f"\nlevels={cfg.levels}, split={cfg.split}: level l holds split**l models of width hidden/split**l.")
    params = init_params(cfg, args.seed)
    print(f"\n{'level':>5} {'models':>6} {'width d':>7} {'head dim':>8} {'mlp f':>6} {'params/model':>12}")
    for level in range(cfg.levels):
        n = count_params(view(params, cfg, level, 0))
        print(f"{level:5d} {cfg.n_models(level):6d} {cfg.width(level):7d} {cfg.head_width(level):8d} "
              f"{cfg.mlp_width(level):6d} {n:12,d}")
    print(f"\nAll {cfg.n_nodes} models together own {count_params(params):,} numbers: the root's.")
    if cfg.logit_scale == "learned" or cfg.node_gains:
        print(f"Among them two small ({cfg.levels}, {cfg.hidden}) tables: each node's logits get its own learned "
              "temperature\n(logit_scale='learned', starts at 1/sqrt(d)) and output gain per coordinate "
              "(node_gains=True, starts at 1).")
    print("Every smaller model is a block of the root's arrays, not a copy. The tree:")
    for level, j in nodes(cfg):
        print("    " * level + f"({level},{j}) width {cfg.width(level)}")
    return cfg, params


def one_weight_many_views(cfg, params):
    """Section 2: every model's block of one weight is a view of the root's array."""
    section("2. One weight, many models: views into the shared arrays")
    W = params["layers"][0]["Wgate"]
    print(f"layers[0]['Wgate'] of the root has shape {W.shape} (D x F).")
    for level, j in nodes(cfg):
        sub = view(params, cfg, level, j)["layers"][0]["Wgate"]
        rows, cols = cfg.width(level), cfg.mlp_width(level)
        print(f"  model ({level},{j}) sees Wgate[{j * rows}:{(j + 1) * rows}, {j * cols}:{(j + 1) * cols}]"
              f" shape {sub.shape}, shares memory: {np.shares_memory(sub, W)}")
    leaf = view(params, cfg, cfg.levels - 1, 1)["layers"][0]["Wgate"]
    before = float(W[cfg.width(cfg.levels - 1), cfg.mlp_width(cfg.levels - 1)])
    leaf[0, 0] += 1.0
    after = float(W[cfg.width(cfg.levels - 1), cfg.mlp_width(cfg.levels - 1)])
    leaf[0, 0] -= 1.0
    print(f"Adding 1 to leaf ({cfg.levels - 1},1)'s Wgate[0,0] changes the root's entry from {before:+.4f} "
          f"to {after:+.4f}: one set of numbers.")
    print("Attention weights keep their head axis: Wq has shape (D, H, hd) and model (l,j) takes\n"
          "Wq[R, :, C], a slice of the head dim inside EVERY head, so all models keep all heads.")


def same_forward_everywhere(cfg, params, tokenizer):
    """Section 3: one forward function runs every node, given its view and its sub-config."""
    section("3. The same forward code runs every model")
    ids = np.array([tokenizer.encode(PROMPT)[-16:]])
    print(f"Input ids, shape {ids.shape}: {ids[0].tolist()}")
    for level, j in nodes(cfg):
        sub_cfg = cfg.sub(level)
        logits = forward(view(params, cfg, level, j), sub_cfg, ids)
        print(f"  forward(view(params, cfg, {level}, {j}), cfg.sub({level}), ids): width {sub_cfg.hidden:3d}, "
              f"head dim {sub_cfg.head_dim:2d}, logits {logits.shape}, dtype {logits.dtype}")


def training(args, cfg, params, tokenizer):
    """Section 4: one optimizer on the mean loss of all nodes; a checkpoint at every evaluation."""
    section("4. Training: one optimizer, one set of arrays, every node's loss")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=3e-3, min_lr=3e-4, warmup=min(50, steps // 10),
                     eval_interval=max(1, steps // 10), eval_batches=1 if args.quick else 8,
                     log_interval=max(1, steps // 30), seed=args.seed)
    if tc.loss_weights == "nodes":
        print(f"The loss is the mean cross-entropy over all {cfg.n_nodes} models, so every node learns.")
    else:
        first, last = (level_weights_at(tc, cfg, step) for step in (0, steps - 1))
        print(f"The loss is a weighted mean of the cross-entropies of all {cfg.n_nodes} models, so every node learns.")
        print(f"loss_weights={tc.loss_weights!r}: one node's weight per level is "
              f"{', '.join(f'{w:.3f}' for w in first)} at step 0,\n"
              f"{', '.join(f'{w:.3f}' for w in last)} at the last step (the weights over all nodes sum to 1).")
    print(f"Settings: {tc}")
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    entropy = unigram_entropy(train_tokens, cfg.vocab_size)
    print(f"Corpus: {len(train_tokens):,} train and {len(val_tokens):,} val tokens (a 90/10 split).")
    print(f"A checkpoint is saved to {args.out / 'checkpoint'} at every evaluation (--resume continues from it).")
    t0 = time.perf_counter()
    _, metrics = train_with_checkpoints(args, args.out / "checkpoint", params, cfg, tc, train_tokens, val_tokens)
    seconds = time.perf_counter() - t0
    print(f"Trained {steps} steps in {format_duration(seconds)}.")
    atomic_write_json(args.out / "metrics.json", {"config": cfg.to_dict(), "unigram_entropy": entropy, **metrics})
    return metrics, entropy, seconds


def per_node_loss(args, cfg, metrics, entropy):
    """Section 5: every node's validation loss against the unigram entropy, and the levels compared."""
    section("5. How well does each model predict the next token?")
    print(f"Unigram entropy of the tokens: {entropy:.3f} nats (a model that ignores context).")
    print("\n".join(loss_table(metrics, cfg, entropy)))
    means = [np.mean([metrics["val"][node_key((level, j))][-1] for j in range(cfg.n_models(level))])
             for level in range(cfg.levels)]
    print("Mean val loss per level: " + ", ".join(f"level {l}: {m:.3f}" for l, m in enumerate(means)))
    beaten = [node for node in nodes(cfg) if metrics["val"][node_key(node)][-1] <= entropy - 0.5]
    ordered = all(means[level] < means[level + 1] for level in range(cfg.levels - 1))
    conclude(args, f"{len(beaten)} of {cfg.n_nodes} models are at least 0.5 nats below the unigram entropy.")
    conclude(args, "Each level beats the next, smaller one on average." if ordered else
             "The levels are not yet ordered by width: train longer (--steps) to see wider models win.")


def sample_every_node(args, cfg, params, tokenizer):
    """Section 6: every node continues the same prompt."""
    section("6. A sample from every node")
    samples = {}
    for level, j in nodes(cfg):
        text = generate(params, cfg, tokenizer, PROMPT, level=level, index=j,
                        max_new_tokens=6 if args.quick else 60, temperature=0.8, top_k=40, seed=args.seed)
        samples[node_key((level, j))] = text
        print(f"--- model ({level},{j}), width {cfg.width(level)} ---\n{text}\n")
    stuck = [key for key, text in samples.items() if len(set(text[len(PROMPT):])) <= 1]
    conclude(args, "The prototype's untrained models printed 'RRRR...'. Here, models whose sample is one repeated "
                   f"character: {stuck if stuck else 'none'}.")
    return samples


def figures(cfg, params, metrics, entropy, out):
    """Section 7: loss curves (with the unigram baseline), who owns which weight entry, the tree."""
    section("7. Figures")
    from tinyfractal.tools.plots import loss_curves, ownership_maps, tree_figure
    paths = [loss_curves(metrics, cfg, out / "loss_curves.png", unigram=entropy)]
    paths += ownership_maps(cfg, out, kinds=["Wgate_Wup", "Wdown", "Wq", "Wo"])
    paths.append(tree_figure(cfg, out / "tree.png", params))
    for path in paths:
        print(f"saved {path}")


if __name__ == "__main__":
    raise SystemExit(main())
