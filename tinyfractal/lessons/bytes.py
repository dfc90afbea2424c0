"""Lesson 6, bytes and concepts: small models read bytes, bigger ones read groups of bytes.

Run: python -m tinyfractal.lessons.bytes [--quick] [--out DIR] [--steps N] [--seed S]

The byte model (tokenizer="bytes", concepts.py) and the BPE base model are trained for the same
steps on the same text, and compared in bits per byte (= bits per character on this ASCII corpus).
"""
import argparse
import time
from pathlib import Path

import numpy as np

from tinyfractal import Config, Tokenizer, count_params, init_params, nodes, view
from tinyfractal.variants import byte_model as C
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.core.flops import model_flops
from tinyfractal.inference.sample import generate
from tinyfractal.training.data import batch_at, unigram_entropy
from tinyfractal.paths import CORPUS
from tinyfractal.training.train import TrainConfig, evaluate, format_duration, node_key, train
from tinyfractal.core.tree import group_size, slot_offset

PROMPT = "JULIET:\n"
QUERIES = ["the ", "and ", "you ", " the", "that", "lord", "king", "love"]


def section(title):
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tinyfractal.lessons.bytes", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lesson_output/bytes", help="folder for figures and metrics.json")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check that everything runs")
    p.add_argument("--steps", type=int, default=None, help="training steps of each model (default 800, 4 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def frequent_groups(byte_ids, g, n):
    """The n most frequent runs of g bytes at any offset of the text, most frequent first: [bytes]."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(byte_ids, dtype=np.int64), g)
    codes = np.zeros(len(windows), dtype=np.int64)
    for m in range(g):
        codes = codes * 256 + windows[:, m]
    values, counts = np.unique(codes, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:n]]
    return [bytes(int(c) >> (8 * (g - 1 - m)) & 255 for m in range(g)) for c in top]


def concept_vectors(params, cfg, groups):
    """Top-level concept embeddings of byte groups, unit length: [bytes] -> (n, D)."""
    ids = np.array([list(grp) for grp in groups])[None]                       # (1, n, g_0)
    vecs = np.concatenate([C.concept_embedding(params, cfg, ids[:, i:i + cfg.context])[0]
                           for i in range(0, ids.shape[1], cfg.context)])
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def show(group):
    return repr(group.decode("utf-8", errors="replace"))


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # %% 1. Bytes as tokens
    section("1. Bytes as tokens: 256 ids, and every string works")
    tok = C.ByteTokenizer()
    example = "Café ☕, thou"
    ids = tok.encode(example)
    print(f"{example!r} -> {len(example)} characters, {len(ids)} UTF-8 bytes: {ids}")
    print(f"decode(encode(text)) == text: {tok.decode(ids) == example}")
    try:
        Tokenizer.default().encode(example)
    except ValueError as e:
        print(f"The BPE tokenizer of the base model cannot: ValueError: {e}")
    print(f"decode of bytes that are not UTF-8, [67, 97, 102, 195]: {tok.decode([67, 97, 102, 195])!r}")
    print(f"  ({C.DECODE_NOTE})")

    # %% 2. Groups per level
    section("2. Each level up reads groups split times longer")
    bpe_cfg = Config.preset("tiny")
    cfg = bpe_cfg.override(tokenizer="bytes", vocab_size=256)
    params = init_params(cfg, args.seed)
    print(f"The 'tiny' preset with tokenizer='bytes', vocab_size=256: {cfg.levels} levels, split {cfg.split}.")
    print("Every level has context = {0} positions, so a level that reads g bytes per position sees {0}*g bytes."
          .format(cfg.context))
    print(f"\n{'level':>5} {'models':>6} {'width':>5} {'g bytes':>7} {'positions':>9} {'context bytes':>13} "
          f"{'params/model':>12} {'slot rows':>9}")
    for level in range(cfg.levels):
        print(f"{level:5d} {cfg.n_models(level):6d} {cfg.width(level):5d} {group_size(cfg, level):7d} "
              f"{cfg.context:9d} {C.context_bytes(cfg, level):13d} {count_params(view(params, cfg, level, 0)):12,d} "
              f"{group_size(cfg, level) if group_size(cfg, level) > 1 else 0:9d}")
    print(f"\nP and Q hold the slot gains of all levels in one ({params['P'].shape[0]}, {cfg.hidden}) array each: "
          f"rows {', '.join(f'[{slot_offset(cfg, l)}:{slot_offset(cfg, l) + group_size(cfg, l)}) level {l}' for l in range(cfg.levels - 1))}.")
    print("A leaf reads single bytes and has no slot gains: it is exactly the base model on bytes.")
    text = "First Citizen:\n"
    for level in range(cfg.levels):
        g = group_size(cfg, level)
        groups = [text[i:i + g] for i in range(0, len(text) - len(text) % g, g)]
        print(f"  level {level} reads {' | '.join(repr(x) for x in groups)}")

    # %% 3. The concept embedding
    section("3. A concept: rmsnorm(sum_m E[b_m] * (1 + P[m]), emb_norm)")
    print("With P = 0 (the start) a concept is a plain sum, blind to order; P makes order matter.")
    the, eht = (np.array([list(s.encode())])[None] for s in ("the ", "eht "))
    def cosine(p):
        a, b = C.concept_embedding(p, cfg, the)[0, 0], C.concept_embedding(p, cfg, eht)[0, 0]
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    cos_init = cosine(params)
    print(f"cosine('the ', 'eht ') at init: {cos_init:.6f}")
    print("The model predicts the next group's g bytes, one distribution per slot: slot m reads the final")
    print("state through its own gain, (rmsnorm(x, final_norm) * (1 + Q[m])) . rmsnorm_rows(E, out_norm)^T.")

    # %% 4. Training the byte model
    section("4. Training the byte model: every node, loss in bits per byte")
    steps = args.steps or (4 if args.quick else 800)
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=3e-3, min_lr=3e-4,
                     warmup=min(50, steps // 10), eval_interval=max(1, steps // 8),
                     eval_batches=1 if args.quick else 4, log_interval=max(1, steps // 10), seed=args.seed)
    final_batches = 1 if args.quick else 24
    text = CORPUS.read_text(encoding="utf-8")
    byte_ids = tok.encode_array(text)
    split = int(len(byte_ids) * 0.9)
    ascii_only = len(byte_ids) == len(text)
    print(f"input.txt: {len(text):,} characters, {len(byte_ids):,} bytes"
          + (" (ASCII: one byte per character)." if ascii_only else "."))
    train_rows, val_rows = C.group_rows(byte_ids[:split], cfg), C.group_rows(byte_ids[split:], cfg)
    print(f"Train on bytes [0, {split:,}), validate on [{split:,}, {len(byte_ids):,}); "
          f"stored as rows of g_0 = {group_size(cfg, 0)} bytes.")
    print(f"Settings: {tc}")
    t0 = time.perf_counter()
    _, byte_metrics = train(params, cfg, tc, train_rows, val_rows)
    byte_seconds = time.perf_counter() - t0
    byte_val = evaluate(params, cfg, val_rows, tc.batch_size, final_batches)
    print(f"Trained {steps} steps in {format_duration(byte_seconds)}; final val over {final_batches} batches.")

    # %% 5. The BPE base model at equal steps
    section("5. The BPE base model: same steps, same batch, same text")
    bpe = Tokenizer.default()
    bpe_train, bpe_val = (np.asarray(bpe.encode_array(t), dtype=np.int32) for t in (text[:split], text[split:]))
    chars_per_token = (len(text) - split) / len(bpe_val)
    print(f"The val text is {len(text) - split:,} characters = {len(bpe_val):,} BPE tokens: "
          f"{chars_per_token:.3f} characters per token.")
    print("bits per character = (nats per token) * (tokens / characters) / ln 2.")
    bpe_params = init_params(bpe_cfg, args.seed)
    t0 = time.perf_counter()
    _, bpe_metrics = train(bpe_params, bpe_cfg, tc, bpe_train, bpe_val)
    bpe_seconds = time.perf_counter() - t0
    bpe_val_loss = evaluate(bpe_params, bpe_cfg, bpe_val, tc.batch_size, final_batches)
    print(f"Trained {steps} steps in {format_duration(bpe_seconds)}.")

    section("Per node: bits per byte (byte model) next to bits per character (BPE model)")
    unigram = C.bits(unigram_entropy(byte_ids[:split], 256))
    rows = []
    print(f"{'node':>6} {'width':>5} | {'bytes: bits/B':>13} {'context B':>9} {'FLOPs/B':>8} | "
          f"{'BPE: bits/char':>14} {'context ch':>10} {'FLOPs/ch':>8}")
    for level, j in nodes(cfg):
        key = node_key((level, j))
        b_bits = C.bits(byte_val[(level, j)])
        p_bits = C.bits(bpe_val_loss[(level, j)]) / chars_per_token
        b_flops = C.flops_per_byte(cfg, level)
        p_flops = model_flops(bpe_cfg, level, bpe_cfg.context) / bpe_cfg.context / chars_per_token
        rows.append({"node": key, "width": cfg.width(level), "byte_bits_per_byte": b_bits,
                     "byte_context_bytes": C.context_bytes(cfg, level), "byte_flops_per_byte": b_flops,
                     "bpe_bits_per_char": p_bits, "bpe_context_chars": bpe_cfg.context * chars_per_token,
                     "bpe_flops_per_char": p_flops})
        print(f"({level},{j})".rjust(6) + f" {cfg.width(level):5d} | {b_bits:13.3f} {C.context_bytes(cfg, level):9d} "
              f"{b_flops / 1e3:7.0f}k | {p_bits:14.3f} {bpe_cfg.context * chars_per_token:10.0f} {p_flops / 1e3:7.0f}k")
    print(f"\nUnigram entropy of the train bytes: {unigram:.3f} bits per byte (a model that ignores context).")
    print(f"Wall time of {steps} steps: bytes {format_duration(byte_seconds)}, BPE {format_duration(bpe_seconds)} "
          f"(ratio {byte_seconds / bpe_seconds:.2f}, same run, shared machine).")
    for level in range(cfg.levels):
        b = np.mean([r["byte_bits_per_byte"] for r in rows if r["node"].startswith(f"{level}.")])
        p = np.mean([r["bpe_bits_per_char"] for r in rows if r["node"].startswith(f"{level}.")])
        print(f"level {level}: bytes {b:.3f} bits/byte vs BPE {p:.3f} bits/char "
              f"(byte model sees {C.context_bytes(cfg, level)} bytes, BPE {bpe_cfg.context * chars_per_token:.0f} chars)")
    print("\nWhere an upper level pays: slot m of a group is predicted m bytes further ahead, from the same state.")
    slot_bits = [np.zeros(group_size(cfg, level)) for level in range(cfg.levels)]
    for b in range(final_batches):
        ids_b, targets_b = batch_at(val_rows, tc.batch_size, cfg.context, 1234, b)
        for level, losses in enumerate(C.slot_losses(params, cfg, ids_b, targets_b)):
            slot_bits[level] += C.bits(np.asarray(losses).mean(axis=0)) / final_batches
    for level in range(cfg.levels):
        print(f"level {level}: val bits per byte at slots 0..{group_size(cfg, level) - 1} (mean of its models): "
              + " ".join(f"{v:.3f}" for v in slot_bits[level]))

    # %% 6. Samples
    section("6. A sample from every node, group by group, slot by slot")
    print(f"Prompts are padded on the left with {chr(C.PAD_BYTE)!r} to whole groups. The g slots of a group")
    print(f"are drawn one after another from distributions computed together, so given the past they are")
    print(f"independent: an upper level can write 'tha ' where 'the ' and 'that' were both likely.")
    print(f"Note: {C.DECODE_NOTE}.")
    samples = {}
    for level, j in nodes(cfg):
        sample = generate(params, cfg, C.ByteTokenizer(), PROMPT, level, j, 24 if args.quick else 160,
                          temperature=0.8, seed=args.seed)
        samples[node_key((level, j))] = sample
        print(f"--- node ({level},{j}), groups of {group_size(cfg, level)} byte(s), "
              f"{sample.count(chr(0xFFFD))} x U+FFFD ---\n{sample}\n")

    # %% 7. Which groups the top level puts together
    section("7. The top level's concepts: nearest neighbours by cosine similarity")
    g0 = group_size(cfg, 0)
    candidates = frequent_groups(byte_ids[:split], g0, 300 if args.quick else 3000)
    queries = [q.encode() for q in QUERIES if len(q.encode()) == g0 and q.encode() in candidates] or candidates[:6]
    vecs = concept_vectors(params, cfg, candidates)
    neighbours = {}
    print(f"Among the {len(candidates)} most frequent {g0}-byte groups of the train text:")
    for q in queries:
        sims = vecs @ vecs[candidates.index(q)]
        order = [i for i in np.argsort(-sims) if candidates[i] != q][:6]
        neighbours[q.decode()] = [(candidates[i].decode("utf-8", errors="replace"), float(sims[i])) for i in order]
        print(f"  {show(q):8} " + "  ".join(f"{show(candidates[i])} {sims[i]:.2f}" for i in order))
    cos_trained = cosine(params)
    print(f"\ncosine('the ', 'eht '): {cos_init:.4f} at init, {cos_trained:.4f} after training.")
    print("|P| per level (0 at init): " + ", ".join(
        f"level {l}: {np.abs(params['P'][slot_offset(cfg, l):slot_offset(cfg, l) + group_size(cfg, l)]).mean():.3f}"
        for l in range(cfg.levels - 1)))

    # %% 8. Figures
    section("8. Figures")
    figures = save_figures(cfg, rows, byte_metrics, bpe_metrics, chars_per_token, out)
    for f in figures:
        print(f"saved {f}")
    atomic_write_json(out / "metrics.json", {
        "config": cfg.to_dict(), "bpe_config": bpe_cfg.to_dict(), "steps": steps, "batch_size": tc.batch_size,
        "final_val_batches": final_batches, "chars_per_token": chars_per_token, "unigram_bits_per_byte": unigram,
        "slot_bits": [v.tolist() for v in slot_bits], "byte_seconds": byte_seconds, "bpe_seconds": bpe_seconds, "nodes": rows, "samples": samples,
        "neighbours": neighbours, "cos_the_eht": {"init": cos_init, "trained": cos_trained},
        "byte_metrics": byte_metrics, "bpe_metrics": bpe_metrics})
    print(f"\nLesson done in {format_duration(time.perf_counter() - started)}; outputs in {out}/")
    return 0


def save_figures(cfg, rows, byte_metrics, bpe_metrics, chars_per_token, out):
    """Per-node bars (bits per byte vs bits per char) and validation curves of both models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["byte_bits_per_byte"] for r in rows], 0.4, label="byte model: bits per byte")
    ax.bar(x + 0.2, [r["bpe_bits_per_char"] for r in rows], 0.4, label="BPE model: bits per character")
    ax.set_xticks(x, [f"({r['node'].replace('.', ',')})\n{r['byte_context_bytes']} B ctx" for r in rows])
    ax.set_ylabel("validation bits per byte / character")
    ax.set_title("Every node, same steps: bytes (upper levels read concepts) vs BPE")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "bytes_per_node.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.85, cfg.levels))
    for level, j in nodes(cfg):
        key = node_key((level, j))
        ax.plot(byte_metrics["eval_step"], [C.bits(v) for v in byte_metrics["val"][key]], color=colors[level],
                label=f"bytes, level {level} (g={group_size(cfg, level)})" if j == 0 else None)
        ax.plot(bpe_metrics["eval_step"], [C.bits(v) / chars_per_token for v in bpe_metrics["val"][key]],
                color=colors[level], linestyle="--", label=f"BPE, level {level}" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per byte (= per character)")
    ax.set_title("Validation during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "bytes_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
