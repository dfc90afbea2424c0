"""Lesson 3, fast inference: a KV cache, the sub-models drafting for the big model, all experts at once.

Run: python -m tinyfractal.lessons.speculative [--quick] [--out DIR] [--ckpt DIR] [--steps N] [--resume]

The model comes from --ckpt, else from this lesson's earlier output (OUT/checkpoint), else from the
base lesson's output (lesson_output/base/checkpoint), else it is trained here (--steps, default 600).
A --quick run trains its own 3-step model, and a full run never takes a --quick run's model.
"""
import time

import numpy as np

from tinyfractal import Config, Tokenizer, init_params
from tinyfractal.inference import decoder as infer
from tinyfractal.inference.ensemble import ensemble_losses, ensemble_table
from tinyfractal.inference.sample import generate, generate_reference
from tinyfractal.inference.speculative import parse_drafters, speculative_ids
from tinyfractal.lessons._common import (OUTPUT, conclude, pyplot, run, save_figure, trained_model,
                                         section, train_with_checkpoints)
from tinyfractal.tools.infer_bench import call_times, cache_vs_recompute, default_choices, spec_table, timed
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import load_tokens, train_val_split
from tinyfractal.training.train import TrainConfig, evaluate, format_duration

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
STEPS = (600, 3)      # if no trained model is found: full run, --quick
BASE_CHECKPOINT = OUTPUT / "base" / "checkpoint"


def main(argv=None):
    return run("speculative", __doc__, lesson, argv, steps=STEPS, trains=True, arguments=arguments)


def arguments(p):
    p.add_argument("--ckpt", default=None, help="a trained checkpoint to use instead of finding or training one")


def lesson(args):
    tokenizer = Tokenizer.default()
    params, cfg, val_tokens = a_trained_model(args, tokenizer)
    results = {"cache": kv_cache(args, params, cfg, tokenizer)}
    one_speculative_run(args, params, cfg, tokenizer)
    results.update(drafter_table(args, params, cfg, tokenizer, val_tokens))
    results["curves"], figure = acceptance_against_k(args, params, cfg, tokenizer, val_tokens)
    results["ensemble"] = all_experts(args, params, cfg, val_tokens)
    section("7. Figures and results")
    atomic_write_json(args.out / "results.json", results)
    print(f"saved {figure}\nsaved {args.out / 'results.json'}")


def get_model(args, tokenizer):
    """(params, cfg, where it came from): --ckpt, else a trained checkpoint found on disk, else one trained here.

    A --quick run's checkpoint is never taken for a trained model (unless this run is quick too).
    """
    own = args.out / "checkpoint"
    found = trained_model(args, [own, BASE_CHECKPOINT])
    if found:
        return found
    cfg = Config.preset("tiny")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, warmup=min(50, steps // 10),
                     eval_interval=max(1, steps // 4), eval_batches=1 if args.quick else 8,
                     log_interval=max(1, steps // 12), seed=args.seed)
    params = init_params(cfg, args.seed)
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))
    print(f"No trained model found: training the 'tiny' preset for {steps} steps (every node at once),\n"
          f"saving {own} at every evaluation.")
    t0 = time.perf_counter()
    train_with_checkpoints(args, own, params, cfg, tc, train_tokens, val_tokens)
    return params, cfg, f"trained here in {format_duration(time.perf_counter() - t0)}, saved to {own}"


def shown(tokenizer, ids):
    """Tokens as text, one '·' between tokens, newlines made visible."""
    return "·".join(tokenizer.decode([int(t)]) for t in ids).replace("\n", "⏎")


def a_trained_model(args, tokenizer):
    """Section 1: the model, and every node's val loss."""
    section("1. A trained FractalFormer: seven models in one set of arrays")
    params, cfg, source = get_model(args, tokenizer)
    print(f"Model: {source}\n{cfg}")
    _, val_tokens = train_val_split(load_tokens(tokenizer))
    losses = evaluate(params, cfg, val_tokens, 4 if args.quick else 16, 1 if args.quick else 8)
    print(f"\n{'node':>6} {'width':>5} {'val loss':>8}")
    for (level, j), v in losses.items():
        print(f"{f'({level},{j})':>6} {cfg.width(level):5d} {v:8.3f}")
    conclude(args, "The small models are worse, but they are not random: they often guess the same next token as\n"
                   "the root. That is what makes them useful drafters, for free: they ARE the root's own weights.")
    return params, cfg, val_tokens


def kv_cache(args, params, cfg, tokenizer):
    """Section 2: the KV cache against recomputing the window, within one window and past it."""
    section("2. The KV cache: never recompute the past")
    quick = args.quick
    print("Without a cache, every new token re-runs the whole window: generating n tokens costs about\n"
          "n^2/2 token-rows of work. With a cache, each layer keeps the keys and values it has computed;\n"
          "a new token costs one row per matmul plus one read of the cache. One cache per node, or one for\n"
          "all the models of a level at once (a leading N axis):")
    for level in range(cfg.levels):
        m = infer.Decoder(params, cfg, level, range(cfg.n_models(level)))
        cache = m.new_cache(1)
        print(f"  level {level}: {m.N} model(s), K and V per layer of shape {cache.k[level][0].shape} "
              f"(N, batch, kv heads, context, head dim)")
    print("RoPE rotates q and k by the token's position in the window, exactly as the full forward does.\n"
          f"When the window ({cfg.context} tokens) is full, decoding slides: the cache is rebuilt from the\n"
          "last `keep` tokens (default: all of them, which reproduces the full-recompute reference).")
    prompt_len = len(tokenizer.encode(PROMPT))
    new = 8 if quick else cfg.context - prompt_len
    print(f"\nWithin one window: greedy, {new} new tokens after the {prompt_len}-token prompt, from the root,\n"
          "cached `generate` vs `generate_reference` (which re-runs the window for every token):")
    results = cache_vs_recompute(params, cfg, tokenizer, PROMPT, new, 1 if quick else 3)
    longer = 16 if quick else 4 * cfg.context
    print(f"\nPast the window: {longer} new tokens. With keep = context every step after the window fills\n"
          "is a full recompute (exactly the reference, and about as slow); keep = context/2 recomputes\n"
          "once every context/2 tokens, so the text can differ from the reference after the first slide:")
    for keep_rule in (None, cfg.context // 2):
        seconds, text = timed(lambda: generate(params, cfg, tokenizer, PROMPT, max_new_tokens=longer,
                                               temperature=0, keep=keep_rule))
        print(f"  keep={keep_rule or cfg.context:3d}: cached {seconds:6.3f} s ({longer / seconds:5.0f} tok/s)")
        results[f"keep_{keep_rule or cfg.context}_s"] = seconds
    seconds, reference = timed(lambda: generate_reference(params, cfg, tokenizer, PROMPT, max_new_tokens=longer,
                                                          temperature=0))
    print(f"  full recompute: {seconds:6.3f} s ({longer / seconds:5.0f} tok/s); keep=context/2 text equals it: "
          f"{text == reference}")
    return results


def one_speculative_run(args, params, cfg, tokenizer):
    """Section 3: one self-speculative run, round by round: drafts, what the root kept, its own token."""
    section("3. Self-speculative decoding: the small models draft, the root checks")
    quick = args.quick
    drafters, k = "2", 4
    print(f"Verifier: the root (0,0). Drafters: every level-2 model ({drafters!r}), each proposing k={k}\n"
          "tokens greedily from its own cache, all four in one batched computation. The root checks every\n"
          "distinct draft in ONE batched pass over k+1 positions, keeps the longest prefix that equals its\n"
          "own greedy choice, and adds its own next token. [kept] tokens are in brackets; after | refused;\n"
          "a dot separates tokens.")
    ids = tokenizer.encode(PROMPT)
    keep = cfg.context // 2
    rounds = []
    new_ids, stats = speculative_ids(params, cfg, ids, 16 if quick else 60, (0, 0),
                                     parse_drafters(cfg, (0, 0), drafters), k, keep=keep, on_round=rounds.append)
    for n, r in enumerate(rounds[:6 if quick else 12]):
        print(f"round {n + 1}:")
        for row, (draft, owners) in enumerate(zip(r["drafts"], r["owners"])):
            names = "".join(f"({l},{j})" for l, j in owners)
            kept = r["accepted"] if row == r["row"] else None
            if kept is None:
                text = shown(tokenizer, draft)
            else:
                text = f"[{shown(tokenizer, draft[:kept])}]|{shown(tokenizer, draft[kept:])}"
            print(f"    {names:<24} {text!s:<30} {'<- chosen' if kept is not None else ''}")
        print(f"    kept {r['accepted']} drafted token(s), then the root's own: {shown(tokenizer, [r['token']])!r}")
    plain = infer.greedy_ids(params, cfg, ids, len(new_ids), keep=keep)
    print(f"\nText: {PROMPT + tokenizer.decode(new_ids)!r}")
    print(f"Same as the root's own greedy text: {new_ids == plain}. Acceptance {stats.acceptance_rate:.2f}, "
          f"{stats.mean_accepted:.2f} drafted tokens kept per round, {stats.verifier_calls_per_token:.2f} "
          f"root calls per token (plain decoding: 1.00).")


def drafter_table(args, params, cfg, tokenizer, val_tokens):
    """Section 4: acceptance and speed-ups for every choice of drafters and k, greedy and sampled."""
    section("4. Which drafters, how many tokens? Acceptance and speed-up")
    quick = args.quick
    keep = cfg.context // 2
    prompts = [tokenizer.encode(PROMPT)] + ([] if quick else [val_tokens[5000:5024].tolist()])
    choices = ["1.0", "2"] if quick else default_choices(cfg, (0, 0))
    ks = [1, 2] if quick else [1, 2, 4]
    n_new = 12 if quick else 120
    print(f"{len(prompts)} prompt(s) x {n_new} greedy tokens, window keep={keep}; every run's output is checked\n"
          "to equal the root's own greedy output. Columns: accept = drafted tokens kept / drafted;\n"
          "1st acc = rounds whose first drafted token was kept; FLOP x = matmul FLOPs of plain decoding /\n"
          "speculative; latency x = the same with each forward pass costing ONE token row (hardware that is\n"
          "bound by reading the weights); wall x = measured time ratio on this machine.")
    rows, _ = spec_table(params, cfg, prompts, choices, ks, n_new, keep, repeats=1 if quick else 3)
    print("\nWhy is 'FLOP x' always below 1? The root must score every token it keeps (plus the refused\n"
          "ones), so it never does less work than plain decoding, and the drafters add theirs. Speculation\n"
          "saves SEQUENTIAL passes, not arithmetic: 'latency x' is the gain where a pass over k+1 rows costs\n"
          "no more than a pass over one. In NumPy on a CPU a pass costs mostly Python overhead, the same\n"
          "for a small model as for the big one, which is why 'wall x' stays near or under 1 here:")
    times = call_times(params, cfg, (0, 0), max(ks), calls=20 if quick else 200)
    for name, t in times.items():
        print(f"    one cached call, {name:<28} {t:8.0f} us")
    best_of_n(args, rows)
    print("\nGreedy text from a small model soon loops ('the some the some ...'), and in a loop every model\n"
          "agrees, which flatters the acceptance above. Sampling does not loop. At temperature 0.8 the\n"
          "root's distribution is kept exactly (one drafter: accept with min(1, p/q); several: each in\n"
          "turn against what the refusals left of p):")
    sampled, _ = spec_table(params, cfg, prompts, ["1.0"] if quick else ["1.0", "1", "2.0", "2", "1+2"],
                            [1] if quick else [1, 2], n_new, keep, repeats=1, temperature=0.8)
    best_of_n(args, sampled)
    return {"table": rows, "table_sampled": sampled, "call_us": times}


def acceptance_against_k(args, params, cfg, tokenizer, val_tokens):
    """Section 5: sampled acceptance and tokens per root call against the draft length k; the figure."""
    section("5. Acceptance against the draft length k")
    quick = args.quick
    keep = cfg.context // 2
    prompts = [tokenizer.encode(PROMPT)] + ([] if quick else [val_tokens[5000:5024].tolist()])
    n_new = 12 if quick else 120
    curve_choices = ["1.0", "2"] if quick else ["1.0", "1", "2.0", "2", "1+2"]
    curve_ks = [1, 2] if quick else [1, 2, 3, 4, 6, 8]
    seeds = 1 if quick else 3
    print(f"Sampled at temperature 0.8 (no greedy loops), {len(prompts)} prompt(s) x {seeds} seed(s) x {n_new} tokens:")
    curves = {}
    for choice in curve_choices:
        curves[choice] = []
        for kk in curve_ks:
            total = [0, 0, 0, 0]
            for p, seed in [(p, seed) for p in prompts for seed in range(seeds)]:
                _, st = speculative_ids(params, cfg, p, n_new, (0, 0), parse_drafters(cfg, (0, 0), choice), kk,
                                        temperature=0.8, seed=seed, keep=keep)
                total = [total[0] + st.accepted, total[1] + st.drafted, total[2] + st.new_tokens,
                         total[3] + st.verifier_calls]
            curves[choice].append((total[0] / max(1, total[1]), total[2] / max(1, total[3])))
        print(f"  drafters {choice:>5}: acceptance " + " ".join(f"k={kk}:{a:.2f}" for kk, (a, _) in
                                                            zip(curve_ks, curves[choice])))
    conclude(args, "Longer drafts are accepted less often per token (one miss ends the run), but each root call\n"
                   "yields more tokens: see the right panel.")
    results = {c: {"k": curve_ks, "acceptance": [a for a, _ in v], "tokens_per_root_call": [t for _, t in v]}
               for c, v in curves.items()}
    return results, save_acceptance_figure(curve_ks, curves, args.out / "acceptance_vs_k.png")


def all_experts(args, params, cfg, val_tokens):
    """Section 6: every model of a level answers at once, pooled two ways, against its members and parent."""
    section("6. All experts at once: pooling every model of a level")
    print("A mixture of experts picks a few experts per token with a gate. Here every model of a level is\n"
          "an expert and ALL of them answer, in one batched pass, with no gate and no new weights:\n"
          "  ens:logprob  the mean of their log-probabilities, renormalised (a product of experts)\n"
          "  ens:prob     the mean of their probabilities (a mixture)")
    nodes_loss, levels, families = ensemble_losses(params, cfg, val_tokens, 4 if args.quick else 16,
                                                   1 if args.quick else 8)
    print("\n".join(ensemble_table(cfg, nodes_loss, levels, families)))
    print("Pooling always beats the members' MEAN loss (a law: Jensen's inequality). Whether it beats the\n"
          "best member, or the parent whose weights contain all of them, is what the table shows.")
    return {"nodes": {f"{l}.{j}": v for (l, j), v in nodes_loss.items()},
            "levels": {f"{l}:{h}": v for (l, h), v in levels.items()},
            "families": {f"{l}.{j}": v for (l, j), v in families.items()}}


def best_of_n(args, rows):
    """Print the mean first-token acceptance of single drafters against that of drafter sets."""
    singles = [r["first_accept"] for r in rows if "." in r["drafters"]]
    sets = [r["first_accept"] for r in rows if "." not in r["drafters"]]
    if singles and sets and not args.quick:
        print(f"Best-of-N: mean first-token acceptance with ONE drafter {np.mean(singles):.3f}, "
              f"with a whole level (or more) {np.mean(sets):.3f}.")


def save_acceptance_figure(ks, curves, path):
    """Acceptance rate and tokens per root call against k, one line per drafter choice."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for choice, values in curves.items():
        left.plot(ks, [a for a, _ in values], marker="o", label=f"drafters {choice}")
        right.plot(ks, [t for _, t in values], marker="o", label=f"drafters {choice}")
    left.set_xlabel("draft length k")
    left.set_ylabel("acceptance (kept / drafted)")
    left.set_ylim(0, 1.05)
    right.set_xlabel("draft length k")
    right.set_ylabel("tokens per root call")
    left.set_title("Acceptance against k")
    right.set_title("Tokens per verifier call")
    left.legend()
    return save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
