"""Lesson 6, bytes and concepts: small models read bytes, bigger ones read groups of bytes.

Run: python -m tinyfractal.lessons.bytes [--quick] [--out DIR] [--steps N] [--seed S] [--resume]

The byte model (tokenizer="bytes", variants/byte_model.py) and the BPE base model are trained for the same
steps on the same text, and compared in bits per byte (= bits per character on this ASCII corpus).
"""
import time

import numpy as np

from tinyfractal import Config, Tokenizer, count_params, init_params, nodes, view
from tinyfractal.core.flops import model_flops
from tinyfractal.core.tree import group_size, slot_offset
from tinyfractal.inference.sample import generate
from tinyfractal.lessons._common import output_gain_words, pyplot, run, save_figure, section, train_with_checkpoints
from tinyfractal.paths import CORPUS
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import batch_at, unigram_entropy
from tinyfractal.training.train import TrainConfig, evaluate, format_duration, node_key
from tinyfractal.variants import byte_model as C

PROMPT = "JULIET:\n"
QUERIES = ["the ", "and ", "you ", " the", "that", "lord", "king", "love"]
STEPS = (800, 4)      # of each model: full run, --quick


def main(argv=None):
    return run("bytes", __doc__, lesson, argv, steps=STEPS, trains=True)


def lesson(args):
    bytes_as_tokens()
    bpe_cfg, cfg, params = groups_per_level(args)
    cos_init = the_concept(cfg, params)
    data = training_the_byte_model(args, cfg, params)
    bpe = the_bpe_model(args, bpe_cfg, data)
    rows, slot_bits = per_node(args, cfg, bpe_cfg, params, data, bpe)
    samples = sample_every_node(args, cfg, params)
    neighbours, cos_trained = the_top_level_concepts(args, cfg, params, data, cos_init)
    section("8. Figures")
    for f in save_figures(cfg, rows, data["metrics"], bpe["metrics"], bpe["chars_per_token"], args.out):
        print(f"saved {f}")
    atomic_write_json(args.out / "metrics.json", {
        "config": cfg.to_dict(), "bpe_config": bpe_cfg.to_dict(), "quick": args.quick, "steps": args.steps,
        "batch_size": data["tc"].batch_size, "final_val_batches": data["final_batches"],
        "chars_per_token": bpe["chars_per_token"], "unigram_bits_per_byte": C.bits(data["unigram"]),
        "slot_bits": [v.tolist() for v in slot_bits], "byte_seconds": data["seconds"], "bpe_seconds": bpe["seconds"],
        "nodes": rows, "samples": samples, "neighbours": neighbours,
        "cos_the_eht": {"init": cos_init, "trained": cos_trained},
        "byte_metrics": data["metrics"], "bpe_metrics": bpe["metrics"]})


def bytes_as_tokens():
    """Section 1: UTF-8 bytes as token ids; any text encodes, where the BPE tokenizer refuses."""
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


def groups_per_level(args):
    """Section 2: each level reads groups split times longer; sizes, slot rows, what each level reads."""
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
    return bpe_cfg, cfg, params


def cosine_the_eht(params, cfg):
    """Cosine similarity of the top-level concepts of 'the ' and its anagram 'eht '."""
    the, eht = (np.array([list(s.encode())])[None] for s in ("the ", "eht "))
    a, b = C.concept_embedding(params, cfg, the)[0, 0], C.concept_embedding(params, cfg, eht)[0, 0]
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def the_concept(cfg, params):
    """Section 3: a concept is a gained sum of byte embeddings; at init it is blind to order."""
    section("3. A concept: rmsnorm(sum_m E[b_m] * (1 + P[m]), emb_norm)")
    print("With P = 0 (the start) a concept is a plain sum, blind to order; P makes order matter.")
    cos_init = cosine_the_eht(params, cfg)
    print(f"cosine('the ', 'eht ') at init: {cos_init:.6f}")
    print("The model predicts the next group's g bytes, one distribution per slot: slot m reads the final")
    print("state through its own gain, "
          "(rmsnorm(x, final_norm) * (1 + Q[m]) * g_out) . rmsnorm_rows(E, out_norm)^T, with the node's output gain")
    print("\n".join(output_gain_words(cfg)))
    return cos_init


def training_the_byte_model(args, cfg, params):
    """Section 4: train the byte model on rows of g_0 bytes (checkpoints in OUT/bytes); its final val loss."""
    section("4. Training the byte model: every node, loss in bits per byte")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=3e-3, min_lr=3e-4,
                     warmup=min(50, steps // 10), eval_interval=max(1, steps // 8),
                     eval_batches=1 if args.quick else 4, log_interval=max(1, steps // 10), seed=args.seed)
    final_batches = 1 if args.quick else 24
    tok = C.ByteTokenizer()
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
    print(f"A checkpoint is saved to {args.out / 'bytes'} at every evaluation (--resume continues from it).")
    t0 = time.perf_counter()
    _, metrics = train_with_checkpoints(args, args.out / "bytes", params, cfg, tc, train_rows, val_rows)
    seconds = time.perf_counter() - t0
    val = evaluate(params, cfg, val_rows, tc.batch_size, final_batches)
    print(f"Trained {steps} steps in {format_duration(seconds)}; final val over {final_batches} batches.")
    return {"tc": tc, "text": text, "split": split, "byte_ids": byte_ids, "val_rows": val_rows, "metrics": metrics,
            "seconds": seconds, "val": val, "final_batches": final_batches,
            "unigram": unigram_entropy(byte_ids[:split], 256)}


def the_bpe_model(args, bpe_cfg, data):
    """Section 5: the BPE base model, same steps, batch and text (checkpoints in OUT/bpe)."""
    section("5. The BPE base model: same steps, same batch, same text")
    text, split, tc = data["text"], data["split"], data["tc"]
    bpe = Tokenizer.default()
    bpe_train, bpe_val = (np.asarray(bpe.encode_array(t), dtype=np.int32) for t in (text[:split], text[split:]))
    chars_per_token = (len(text) - split) / len(bpe_val)
    print(f"The val text is {len(text) - split:,} characters = {len(bpe_val):,} BPE tokens: "
          f"{chars_per_token:.3f} characters per token.")
    print("bits per character = (nats per token) * (tokens / characters) / ln 2.")
    params = init_params(bpe_cfg, args.seed)
    t0 = time.perf_counter()
    _, metrics = train_with_checkpoints(args, args.out / "bpe", params, bpe_cfg, tc, bpe_train, bpe_val)
    seconds = time.perf_counter() - t0
    val = evaluate(params, bpe_cfg, bpe_val, tc.batch_size, data["final_batches"])
    print(f"Trained {tc.steps} steps in {format_duration(seconds)}.")
    return {"metrics": metrics, "seconds": seconds, "val": val, "chars_per_token": chars_per_token}


def per_node(args, cfg, bpe_cfg, params, data, bpe):
    """Bits per byte against bits per character for every node, level means, and the cost slot by slot."""
    section("Per node: bits per byte (byte model) next to bits per character (BPE model)")
    chars_per_token, final_batches, tc = bpe["chars_per_token"], data["final_batches"], data["tc"]
    rows = []
    print(f"{'node':>6} {'width':>5} | {'bytes: bits/B':>13} {'context B':>9} {'FLOPs/B':>8} | "
          f"{'BPE: bits/char':>14} {'context ch':>10} {'FLOPs/ch':>8}")
    for level, j in nodes(cfg):
        key = node_key((level, j))
        b_bits = C.bits(data["val"][(level, j)])
        p_bits = C.bits(bpe["val"][(level, j)]) / chars_per_token
        b_flops = C.flops_per_byte(cfg, level)
        p_flops = model_flops(bpe_cfg, level, bpe_cfg.context) / bpe_cfg.context / chars_per_token
        rows.append({"node": key, "width": cfg.width(level), "byte_bits_per_byte": b_bits,
                     "byte_context_bytes": C.context_bytes(cfg, level), "byte_flops_per_byte": b_flops,
                     "bpe_bits_per_char": p_bits, "bpe_context_chars": bpe_cfg.context * chars_per_token,
                     "bpe_flops_per_char": p_flops})
        print(f"({level},{j})".rjust(6) + f" {cfg.width(level):5d} | {b_bits:13.3f} {C.context_bytes(cfg, level):9d} "
              f"{b_flops / 1e3:7.0f}k | {p_bits:14.3f} {bpe_cfg.context * chars_per_token:10.0f} {p_flops / 1e3:7.0f}k")
    print(f"\nUnigram entropy of the train bytes: {C.bits(data['unigram']):.3f} bits per byte (a model that ignores "
          f"context).")
    print(f"Wall time of {tc.steps} steps: bytes {format_duration(data['seconds'])}, BPE "
          f"{format_duration(bpe['seconds'])} (ratio {data['seconds'] / bpe['seconds']:.2f}, same run, shared machine).")
    for level in range(cfg.levels):
        b = np.mean([r["byte_bits_per_byte"] for r in rows if r["node"].startswith(f"{level}.")])
        p = np.mean([r["bpe_bits_per_char"] for r in rows if r["node"].startswith(f"{level}.")])
        print(f"level {level}: bytes {b:.3f} bits/byte vs BPE {p:.3f} bits/char "
              f"(byte model sees {C.context_bytes(cfg, level)} bytes, BPE {bpe_cfg.context * chars_per_token:.0f} chars)")
    print("\nWhere an upper level pays: slot m of a group is predicted m bytes further ahead, from the same state.")
    slot_bits = [np.zeros(group_size(cfg, level)) for level in range(cfg.levels)]
    for b in range(final_batches):
        ids_b, targets_b = batch_at(data["val_rows"], tc.batch_size, cfg.context, 1234, b)
        for level, losses in enumerate(C.slot_losses(params, cfg, ids_b, targets_b)):
            slot_bits[level] += C.bits(np.asarray(losses).mean(axis=0)) / final_batches
    for level in range(cfg.levels):
        print(f"level {level}: val bits per byte at slots 0..{group_size(cfg, level) - 1} (mean of its models): "
              + " ".join(f"{v:.3f}" for v in slot_bits[level]))
    return rows, slot_bits


def sample_every_node(args, cfg, params):
    """Section 6: every node writes, group by group, slot by slot."""
    section("6. A sample from every node, group by group, slot by slot")
    print(f"Prompts are padded on the left with {chr(C.PAD_BYTE)!r} to whole groups. The g slots of a group")
    print("are drawn one after another from distributions computed together, so given the past they are")
    print("independent: an upper level can write 'tha ' where 'the ' and 'that' were both likely.")
    print(f"Note: {C.DECODE_NOTE}.")
    samples = {}
    for level, j in nodes(cfg):
        sample = generate(params, cfg, C.ByteTokenizer(), PROMPT, level, j, 24 if args.quick else 160,
                          temperature=0.8, seed=args.seed)
        samples[node_key((level, j))] = sample
        print(f"--- node ({level},{j}), groups of {group_size(cfg, level)} byte(s), "
              f"{sample.count(chr(0xFFFD))} x U+FFFD ---\n{sample}\n")
    return samples


def the_top_level_concepts(args, cfg, params, data, cos_init):
    """Section 7: nearest neighbours of frequent groups among the top level's concepts; order learned?"""
    section("7. The top level's concepts: nearest neighbours by cosine similarity")
    g0 = group_size(cfg, 0)
    candidates = frequent_groups(data["byte_ids"][:data["split"]], g0, 300 if args.quick else 3000)
    queries = [q.encode() for q in QUERIES if len(q.encode()) == g0 and q.encode() in candidates] or candidates[:6]
    vecs = concept_vectors(params, cfg, candidates)
    neighbours = {}
    print(f"Among the {len(candidates)} most frequent {g0}-byte groups of the train text:")
    for q in queries:
        sims = vecs @ vecs[candidates.index(q)]
        order = [i for i in np.argsort(-sims) if candidates[i] != q][:6]
        neighbours[q.decode()] = [(candidates[i].decode("utf-8", errors="replace"), float(sims[i])) for i in order]
        print(f"  {show(q):8} " + "  ".join(f"{show(candidates[i])} {sims[i]:.2f}" for i in order))
    cos_trained = cosine_the_eht(params, cfg)
    print(f"\ncosine('the ', 'eht '): {cos_init:.4f} at init, {cos_trained:.4f} after training.")
    print("|P| per level (0 at init): " + ", ".join(
        f"level {l}: {np.abs(params['P'][slot_offset(cfg, l):slot_offset(cfg, l) + group_size(cfg, l)]).mean():.3f}"
        for l in range(cfg.levels - 1)))
    return neighbours, cos_trained


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


def save_figures(cfg, rows, byte_metrics, bpe_metrics, chars_per_token, out):
    """Per-node bars (bits per byte vs bits per char) and validation curves of both models."""
    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["byte_bits_per_byte"] for r in rows], 0.4, label="byte model: bits per byte")
    ax.bar(x + 0.2, [r["bpe_bits_per_char"] for r in rows], 0.4, label="BPE model: bits per character")
    ax.set_xticks(x, [f"({r['node'].replace('.', ',')})\n{r['byte_context_bytes']} B ctx" for r in rows])
    ax.set_ylabel("validation bits per byte / character")
    ax.set_title("Every node, same steps: bytes (upper levels read concepts) vs BPE")
    ax.legend()
    paths.append(save_figure(fig, out / "bytes_per_node.png"))

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
    paths.append(save_figure(fig, out / "bytes_curves.png"))
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
