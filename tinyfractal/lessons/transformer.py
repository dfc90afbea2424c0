"""Lesson 0, the plain transformer: one model, op by op, before any tree.

Run: python -m tinyfractal.lessons.transformer [--quick] [--out DIR] [--seed N] [--steps N] [--resume]

The model is the 'tiny' preset with levels=1: no sub-models, just the transformer that lesson 1 then
cuts into a tree. The lesson follows one forward pass through every op with real numbers, explains the
two things a fresh model does that surprise everyone (raw tied logits whose first loss is about d nats,
which the default output's gain, starting at exactly 1/sqrt(d), brings down to at most ln V + 2 sqrt(d), and
"RRRR" either way),
trains the model for about a minute and samples from it.
"""
import math
import time

import numpy as np

from tinyfractal import Config, Tokenizer, count_params, forward, generate, init_params, node_losses, trace_node
from tinyfractal.lessons._common import (conclude, output_gain_words, pyplot, run, save_figure, section,
                                         train_with_checkpoints)
from tinyfractal.training.checkpoint import atomic_write_json
from tinyfractal.training.data import batch_at, load_tokens, train_val_split, unigram_entropy
from tinyfractal.core.formulas import cross_entropy, gelu, rmsnorm, rope, rope_tables, softmax
from tinyfractal.core.model import attention, mlp, output_gain
from tinyfractal.training.train import TrainConfig, format_duration, loss_table

PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou R"
TRACE_PROMPT = "First Citizen:"


STEPS = (1000, 4)     # full run, --quick


def main(argv=None):
    return run("transformer", __doc__, lesson, argv, steps=STEPS, trains=True)


def lesson(args):
    out = args.out
    cfg = Config.preset("tiny").override(levels=1)
    params = init_params(cfg, args.seed)
    tokenizer = Tokenizer.default()
    train_tokens, val_tokens = train_val_split(load_tokens(tokenizer))

    the_model(cfg, params)
    x_by_hand = one_pass_traced(cfg, params, tokenizer)
    one_pass_by_hand(cfg, params, tokenizer, x_by_hand)
    ids, targets = batch_at(train_tokens, 16, cfg.context, args.seed, 0)
    fresh = first_loss(cfg, params, ids, targets, train_tokens, args.seed)
    fresh.update(why_rrrr(cfg, params, tokenizer, ids, targets, args.seed))
    metrics, tc, seconds = training(cfg, params, train_tokens, val_tokens, out, args)
    trained = after_training(cfg, params, tokenizer, ids, targets, metrics, train_tokens, args, fresh)
    figures = save_figures(cfg, params, init_params(cfg, args.seed), metrics, tokenizer, ids, out,
                           fresh["unigram_entropy"])
    section("8. Figures, and what comes next")
    for f in figures:
        print(f"saved {f}")
    print("\nThis model has the shape of the root (0,0) of lesson 1's 'tiny' tree: the same config, the same arrays.\n"
          "Lesson 1 shows that the diagonal blocks of these same arrays are complete, smaller transformers\n"
          "of the kind you just took apart: python -m tinyfractal.lessons.base")
    atomic_write_json(out / "summary.json", {"steps": tc.steps, "quick": args.quick, "train_seconds": seconds,
                                            "fresh": fresh, "trained": trained})


def the_model(cfg, params):
    """Section 1: the config, and every array of the model with its shape."""
    section("1. One transformer, no tree: the arrays")
    print(f"Config.preset('tiny').override(levels=1): {cfg}")
    D, H, K, h, F, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden, cfg.vocab_size
    print(f"\nV={V} tokens, context T={cfg.context}, width d={D}, H={H} query heads and K={K} key/value head "
          f"of h={h} dims, MLP width f={F}, {cfg.layers} layers.")
    what = {"E": "token embedding, also the output matrix (tied)", "emb_norm": "gain of the input RMSNorm",
            "final_norm": "gain of the last RMSNorm", "out_norm": "gain of the norm of E's rows at the output",
            "attn_norm": "gain of the RMSNorm before attention", "mlp_norm": "gain of the RMSNorm before the MLP",
            "Wq": f"queries: {H} heads of {h}", "Wk": f"keys: {K} head shared by all {H}",
            "Wv": f"values: {K} head shared by all {H}", "Wo": "heads back to the residual width",
            "Wgate": "GeGLU gate branch", "bgate": "its bias", "Wup": "GeGLU linear branch", "bup": "its bias",
            "Wdown": "MLP back to the residual width", "bdown": "its bias",
            "logit_gain": "learned temperature: (1 + mean of its row) / sqrt(d)",
            "node_gain": "the model's own output gain, one per coordinate"}
    print(f"\n{'array':<20}{'shape':<14}{'numbers':>9}  what it is")
    rows = [(k, v) for k, v in params.items() if k != "layers"]
    rows += [(f"layers[0].{k}", v) for k, v in params["layers"][0].items()]
    for name, a in rows:
        print(f"{name:<20}{str(a.shape):<14}{a.size:9,d}  {what[name.split('.')[-1]]}")
    per_layer = sum(a.size for a in params["layers"][0].values())
    print(f"{'layers[1].*':<20}{'(same)':<14}{per_layer:9,d}  the second layer, same shapes")
    print(f"\n{count_params(params):,} numbers in all. Multi-query attention (K=1) keeps Wk and Wv at "
          f"{2 * D * K * h:,} numbers per layer; with K=H={H} key/value heads they would hold {2 * D * H * h:,}.")
    print(f"The output reuses E (tied), which saves a separate V x d = {V * D:,} output matrix.")
    extra = [k for k in ("logit_gain", "node_gain") if k in params]
    if extra:
        print(f"{' and '.join(extra)} add {sum(params[k].size for k in extra):,} numbers (the defaults "
              f"logit_scale={cfg.logit_scale!r}, node_gains={cfg.node_gains}):\n"
              f"the output gain g_out of section 3, learned from 0 so that it starts at exactly 1/sqrt(d).")


def one_pass_traced(cfg, params, tokenizer):
    """Section 2: the engine's own trace of one forward pass. Returns the prompt's ids."""
    section("2. One forward pass, op by op: the trace")
    ids = np.array([tokenizer.encode(TRACE_PROMPT)])
    pieces = "|".join(tokenizer.token_strings[i] for i in ids[0]).replace("\n", "\\n").replace(" ", "_")
    print(f"{TRACE_PROMPT!r} is {ids.shape[1]} tokens: {pieces} = {ids[0].tolist()}")
    print("python -m tinyfractal trace --preset tiny --levels=1 prints, for every op, the arrays it read and\n"
          "the shapes in and out. A one-level model reads every array whole (':'); in lesson 1 a sub-model\n"
          "reads slices of them. (B,T) = (1 prompt, 10 tokens):\n")
    lines = []
    trace_node(params, cfg, 0, 0, ids, log=lines.append)
    for line in lines[:-1]:   # the last line compares slices with the tree's table: nothing to compare here
        print(line)
    return ids


def one_pass_by_hand(cfg, params, tokenizer, ids):
    """Section 3: the same pass recomputed op by op from the arrays, with the numbers to notice."""
    section("3. The same pass by hand, with the numbers to notice")
    B, T = ids.shape
    D, H, K, h, eps = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.eps
    E = params["E"]

    print("Embedding: x = E[ids], one row of E per token.                                  (1,T) -> (1,T,d)")
    x = E[ids]                                                                      # (B,T,D)
    rms = np.sqrt(np.mean(x * x, axis=-1))[0]
    print(f"  E is standard normal, so each row has RMS near 1: {rms.min():.3f} .. {rms.max():.3f}")

    print("\nRMSNorm: x / sqrt(mean(x^2) + eps) * (1 + g). Every row gets RMS exactly 1, so length sqrt(d),\n"
          "then the learned gain (1 + g) scales each coordinate. g starts at 0: the gain starts at 1.")
    x = rmsnorm(x, params["emb_norm"], eps)
    rms = np.sqrt(np.mean(x * x, axis=-1))[0]
    print(f"  after rmsnorm(x, emb_norm): RMS {rms.min():.4f} .. {rms.max():.4f}; length |x| = "
          f"{np.linalg.norm(x[0, 0]):.3f} = sqrt({D}) = {math.sqrt(D):.3f}")
    half = rmsnorm(E[ids], np.full(D, -0.5, np.float32), eps)
    print(f"  with g = -0.5 everywhere the gain is 0.5 and the RMS {float(np.sqrt(np.mean(half[0, 0] ** 2))):.3f}:"
          f" the model learns how loud each coordinate is")
    x0 = x

    p = params["layers"][0]
    print("\nLayer 0, attention. First its own RMSNorm, then queries, keys and values:")
    a = rmsnorm(x, p["attn_norm"], eps)
    q = (a.reshape(B * T, D) @ p["Wq"].reshape(D, H * h)).reshape(B, T, H, h)
    k = (a.reshape(B * T, D) @ p["Wk"].reshape(D, K * h)).reshape(B, T, K, h)
    v = (a.reshape(B * T, D) @ p["Wv"].reshape(D, K * h)).reshape(B, T, K, h)
    print(f"  q = x Wq: {q.shape} (B,T,H,h)   k = x Wk: {k.shape}   v = x Wv: {v.shape} (B,T,K,h)")
    print(f"  Multi-query attention: {H} query heads, {K} key/value head that all of them read.")

    print(f"\nRoPE: each head vector is turned by an angle that grows with its position. Half-split pairs:\n"
          f"component m turns together with component m + h/2 = m + {h // 2}, at angle pos * theta^(-2m/h),\n"
          f"theta = {cfg.rope_theta:g}. The {h // 2} pairs turn at these speeds (radians per position):")
    speeds = cfg.rope_theta ** (-2.0 * np.arange(h // 2) / h)
    print("  " + "  ".join(f"m={m}: {s:.4f}" for m, s in enumerate(speeds)))
    cos, sin = rope_tables(T, h, cfg.rope_theta)
    qr, kr = rope(q, cos, sin), rope(k, cos, sin)
    pos = min(3, T - 1)
    c0, s0 = float(np.cos(pos * speeds[0])), float(np.sin(pos * speeds[0]))
    x_, y_ = float(q[0, pos, 0, 0]), float(q[0, pos, 0, h // 2])
    print(f"  pair (0, {h // 2}) of head 0 at position {pos}: ({x_:+.4f}, {y_:+.4f}) turned by {pos * speeds[0]:.1f} rad"
          f" -> ({x_ * c0 - y_ * s0:+.4f}, {x_ * s0 + y_ * c0:+.4f}); rope() gives "
          f"({float(qr[0, pos, 0, 0]):+.4f}, {float(qr[0, pos, 0, h // 2]):+.4f})")
    lengths = np.abs(np.linalg.norm(qr, axis=-1) - np.linalg.norm(q, axis=-1)).max()
    print(f"  a rotation keeps lengths: max | |rope(q)| - |q| | = {lengths:.1e}")
    qv, kv = q[0, 0, 0][None, None, :], k[0, 0, 0][None, None, :]               # one q and one k vector
    def turned(vec, at):
        c, s = rope_tables(1, h, cfg.rope_theta, start=at)
        return rope(vec, c, s)[0, 0]
    d1 = float(turned(qv, 7) @ turned(kv, 3))
    d2 = float(turned(qv, 27) @ turned(kv, 23))
    print(f"  and q.k depends only on the distance: q at 7, k at 3 -> {d1:+.5f};  q at 27, k at 23 -> {d2:+.5f}")

    print(f"\nScores: q.k / sqrt(h) for every pair of positions, per head: (B,H,T,T). The causal mask\n"
          f"lets position t look at positions 0..t only (x = allowed), so no token sees the future:")
    kr, vr = np.repeat(kr, H // K, axis=2), np.repeat(v, H // K, axis=2)          # (B,T,H,h)
    qh, kh, vh = (np.transpose(t_, (0, 2, 1, 3)) for t_ in (qr, kr, vr))         # (B,H,T,h)
    scores = qh @ np.transpose(kh, (0, 1, 3, 2)) / math.sqrt(h)                  # (B,H,T,T)
    allowed = np.tril(np.ones((T, T), dtype=bool))
    for t in range(min(6, T)):
        print(f"  t={t}  " + " ".join("x" if allowed[t, s] else "." for s in range(min(6, T))))
    probs = softmax(np.where(allowed, scores, np.float32(-1e30)))
    print(f"  softmax over each row. Head 0, last position t={T - 1}: "
          + " ".join(f"{w:.2f}" for w in probs[0, 0, -1]) + f"  (sum {probs[0, 0, -1].sum():.4f})")
    print(f"  the most any position gives to a later one: {float(probs[0][:, ~allowed].max()):.1f}")
    heads = np.transpose(probs @ vh, (0, 2, 1, 3)).reshape(B * T, H * h)         # (B*T, H*h)
    attn = (heads @ p["Wo"].reshape(H * h, D)).reshape(B, T, D)
    print(f"  out = (probs v) Wo: the {H} heads side by side {heads.shape}, back to width d: {attn.shape}")

    print("\nThe residual stream: each sublayer ADDS to x, it never replaces it.")
    print(f"  |x| = {np.linalg.norm(x, axis=-1).mean():.2f}, |attention out| = {np.linalg.norm(attn, axis=-1).mean():.2f}", end="")
    x = x + attn
    print(f", |x + attention out| = {np.linalg.norm(x, axis=-1).mean():.2f}")

    print("\nLayer 0, MLP (GeGLU): (gelu(x Wgate + bgate) * (x Wup + bup)) Wdown + bdown")
    m = rmsnorm(x, p["mlp_norm"], eps).reshape(B * T, D)
    gate = gelu(m @ p["Wgate"] + p["bgate"])
    up = m @ p["Wup"] + p["bup"]
    hidden = gate * up                                                             # (B*T, F)
    mlp_out = (hidden @ p["Wdown"] + p["bdown"]).reshape(B, T, D)
    print(f"  gate and up: {gate.shape} each (width f = {cfg.mlp_hidden}); gelu passes positives and squashes "
          f"negatives (smallest gate {float(gate.min()):+.3f}), and the product lets the gate switch each "
          f"hidden unit on or off.")
    print(f"  |x| = {np.linalg.norm(x, axis=-1).mean():.2f}, |MLP out| = {np.linalg.norm(mlp_out, axis=-1).mean():.2f}", end="")
    x = x + mlp_out
    print(f", |x + MLP out| = {np.linalg.norm(x, axis=-1).mean():.2f}")

    for i, p in enumerate(params["layers"][1:], start=1):
        x = x + attention(rmsnorm(x, p["attn_norm"], eps), p, cfg)
        x = x + mlp(rmsnorm(x, p["mlp_norm"], eps), p)
        print(f"Layer {i}: the same ops with its own arrays; |x| = {np.linalg.norm(x, axis=-1).mean():.2f}")
    cos_start = np.sum(x * x0, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(x0, axis=-1))
    print(f"After {cfg.layers} layers each position's x still points along its own token's embedding: "
          f"cosine {cos_start.min():.3f} .. {cos_start.max():.3f}")

    gain = np.broadcast_to(output_gain(params, cfg), (D,))                         # (d,): g_out per coordinate
    print(f"\nTied output: logits = rmsnorm(x, final_norm) g_out . rmsnorm(E, out_norm)^T. There is no output\n"
          f"matrix: each token's logit is the dot product of x with that token's own normalised embedding row,\n"
          f"times the output gain g_out (model.output_gain; section 4 says why it starts at 1/sqrt(d)).")
    print("\n".join("  " + line for line in output_gain_words(cfg)))
    print(f"  Here g_out = {gain.min():.4f} .. {gain.max():.4f} over the {D} coordinates; "
          f"1/sqrt(d) = {1 / math.sqrt(D):.4f}.")
    out_emb = rmsnorm(E, params["out_norm"], eps)                                  # (V,D)
    logits = (rmsnorm(x, params["final_norm"], eps).reshape(B * T, D) * gain @ out_emb.T).reshape(B, T, -1)
    engine = forward(params, cfg, ids)
    print(f"  logits {logits.shape} (B,T,V). By hand against tinyfractal.forward: max |difference| = "
          f"{float(np.abs(logits - engine).max()):.1e}")


def residual_stream(cfg, params, ids):
    """The residual stream before the layers and after them, for (B,T) ids: two (B,T,D) arrays."""
    x0 = rmsnorm(params["E"][ids], params["emb_norm"], cfg.eps)
    x = x0
    for p in params["layers"]:
        x = x + attention(rmsnorm(x, p["attn_norm"], cfg.eps), p, cfg)
        x = x + mlp(rmsnorm(x, p["mlp_norm"], cfg.eps), p)
    return x0, x


def logit_stats(cfg, params, ids, targets):
    """The numbers behind the first loss, for the output of `cfg` (its logit_scale): logits split into the
    input token's own and the others', the input token's lead over the next-best token, and how far the
    residual stream has moved away from its input embedding."""
    logits = np.asarray(forward(params, cfg, ids), dtype=np.float64)             # (B,T,V)
    x0, x = residual_stream(cfg, params, ids)
    cosine = np.sum(x * x0, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(x0, axis=-1))
    own = np.take_along_axis(logits, ids[..., None], -1)[..., 0]
    target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    others = np.ones(logits.shape, dtype=bool)
    np.put_along_axis(others, ids[..., None], False, -1)
    top2 = np.sort(logits, axis=-1)[..., -2:]                                      # (B,T,2)
    return {"loss": float(cross_entropy(logits, targets)), "std_all": float(logits.std()),
            "std_others": float(logits[others].std()), "own": float(own.mean()), "target": float(target.mean()),
            "max_abs": float(np.abs(logits).max()), "lead": float((top2[..., 1] - top2[..., 0]).mean()),
            "argmax_is_input": float((logits.argmax(-1) == ids).mean()), "cos_input": float(cosine.mean()),
            "norm_x0": float(np.linalg.norm(x0, axis=-1).mean()), "norm_x": float(np.linalg.norm(x, axis=-1).mean())}


def raw_output(cfg, params):
    """The same model with the prototype's output, the raw dot products (logit_scale='none', no node gains):
    (config, params), the params without the learned output tables logit_gain and node_gain. Those tables
    start at 0 (g_out exactly 1/sqrt(d)), so for a fresh model the raw logits are the default's times sqrt(d)."""
    raw = cfg.override(logit_scale="none", node_gains=False)
    return raw, {k: v for k, v in params.items() if k not in ("logit_gain", "node_gain")}


def tree_first_losses(tree, seed, ids, targets):
    """The first loss of each of the tree's fresh models, level by level: a flat list."""
    return [float(v) for level in node_losses(init_params(tree, seed), tree, ids, targets) for v in level]


def first_loss(cfg, params, ids, targets, train_tokens, seed):
    """Section 4: the raw tied logits make a fresh model's first loss about d nats, not ln V; the default
    output's gain, which starts at exactly 1/sqrt(d), keeps it at most ln V + 2 sqrt(d)."""
    section("4. Why raw logits cost d nats, and what the 1/sqrt(d) scale does")
    V, D = cfg.vocab_size, cfg.hidden
    root, ln_v = math.sqrt(D), math.log(V)
    entropy = unigram_entropy(train_tokens, V)
    raw = logit_stats(*raw_output(cfg, params), ids, targets)
    s = logit_stats(cfg, params, ids, targets)
    print(f"Guessing uniformly costs ln V = ln {V} = {ln_v:.3f} nats per token; knowing only how often\n"
          f"each token occurs costs the unigram entropy, {entropy:.3f}. What does a fresh model pay, on a batch of "
          f"{ids.shape[0]}x{ids.shape[1]} tokens?")
    print(f"\nA logit compares two RMS-normalised vectors, each of length sqrt(d) = {root:.2f}. First their raw\n"
          f"dot products, the output of the prototype this course comes from (logit_scale='none'):")
    print(f"  logit of an unrelated token (std over all others):  {raw['std_others']:6.2f}   ~ sqrt(d) = {root:.2f}"
          f"  (two random directions)")
    print(f"  logit of the input token itself (mean):             {raw['own']:6.2f}   ~ d = {D}"
          f"  (a vector with itself)")
    print(f"  logit of the right next token (mean):               {raw['target']:+6.2f}   ~ 0 +- sqrt(d)")
    print(f"  std of all logits: {raw['std_all']:.2f}")
    print(f"The softmax puts almost all its mass on the input token, so the loss is about\n"
          f"logit(input) - logit(target) = {raw['own'] - raw['target']:.1f} nats (measured: {raw['loss']:.1f}), "
          f"i.e. about d, not ln V.")
    gain = np.broadcast_to(output_gain(params, cfg), (D,))                         # (d,) at init
    print(f"\nThe default output starts at g_out = 1/sqrt(d) = {1 / root:.4f} (section 3; this fresh model's: "
          f"{gain.min():.4f} .. {gain.max():.4f}),\nso it multiplies every fresh logit by 1/sqrt(d):")
    print(f"  logit of an unrelated token (std over all others):  {s['std_others']:6.2f}   ~ 1")
    print(f"  logit of the input token itself (mean):             {s['own']:6.2f}   ~ sqrt(d) = {root:.2f}")
    print(f"  logit of the right next token (mean):               {s['target']:+6.2f}   ~ 0 +- 1")
    print(f"The same argument, sqrt(d) times smaller: the loss is about logit(input) - logit(target) = "
          f"{s['own'] - s['target']:.2f}\n(measured: {s['loss']:.2f} nats, ln V + {s['loss'] - ln_v:.2f}). "
          f"While the norm gains are 1 and g_out is 1/sqrt(d),\nno logit can pass sqrt(d) in size "
          f"(|a.b| <= |a| |b| = d), so a fresh model's first loss is at most\nln V + 2 sqrt(d) = "
          f"{ln_v + 2 * root:.2f}, whatever its weights. "
          f"The largest |logit| in this batch: {s['max_abs']:.2f}.")
    print(f"\nThe same at other widths (levels=1, head dim scaled with the width), first losses in nats:")
    print(f"  {'width d':>7} {'sqrt(d)':>8} {'raw loss':>9} {'raw std of others':>18} {'1/sqrt(d) loss':>15} "
          f"{'ln V + 2 sqrt(d)':>17}")
    widths = {}
    for width in (24, 48, 96):
        c = cfg.override(hidden=width, head_dim=cfg.head_dim * width // D)
        p = init_params(c, seed)
        w_raw, w = logit_stats(*raw_output(c, p), ids, targets), logit_stats(c, p, ids, targets)
        print(f"  {width:7d} {math.sqrt(width):8.2f} {w_raw['loss']:9.1f} {w_raw['std_others']:18.2f} "
              f"{w['loss']:15.2f} {ln_v + 2 * math.sqrt(width):17.2f}")
        widths[str(width)] = {"raw_loss": w_raw["loss"], "raw_std_others": w_raw["std_others"], "loss": w["loss"]}
    print("Raw, the first loss grows like d. Scaled, the input token's logit is only about sqrt(d), so on a narrow\n"
          "model the other V - 1 tokens add to the loss as well, and it stays a few nats above ln V.")
    tree = Config.preset("tiny")
    losses = tree_first_losses(tree, seed, ids, targets)
    faithful = tree_first_losses(tree.faithful(), seed, ids, targets)
    print(f"\nLesson 1's tree averages the first losses of its 7 models, of widths 96, 48, 48, 24, 24, 24, 24:\n"
          f"  " + " + ".join(f"{v:.1f}" for v in losses) + f" over 7 = {np.mean(losses):.1f} nats "
          f"(ln V + {np.mean(losses) - ln_v:.1f}): where its first step starts.\n"
          f"With the prototype's output and init (Config.faithful(), as in the preset 'seed') each model pays\n"
          f"about its own d:\n"
          f"  " + " + ".join(f"{v:.1f}" for v in faithful) + f" over 7 = {np.mean(faithful):.1f} nats.")
    print(f"(The tree's root starts at {losses[0]:.1f}, not {s['loss']:.1f}: lesson 1's nested init starts each "
          f"diagonal block as large as\na model of that block's width would start, larger than this one-level "
          f"model's weights.)")
    print("Training brings the loss below ln V within fifty steps. Section 6 shows how: mostly by changing\n"
          "where x points.")
    return {"loss": s["loss"], "raw_loss": raw["loss"], "ln_V": ln_v, "bound": ln_v + 2 * root,
            "unigram_entropy": entropy, "std_all": s["std_all"], "std_others": s["std_others"],
            "own_logit": s["own"], "target_logit": s["target"], "max_abs_logit": s["max_abs"],
            "raw_std_all": raw["std_all"], "raw_std_others": raw["std_others"], "raw_own_logit": raw["own"],
            "raw_target_logit": raw["target"], "widths": widths, "tree_first_losses": losses,
            "tree_first_losses_faithful": faithful, "cos_input": s["cos_input"], "norm_x0": s["norm_x0"],
            "norm_x": s["norm_x"]}


def why_rrrr(cfg, params, tokenizer, ids, targets, seed):
    """Section 5: a fresh model repeats its last input token, and why; the 1/sqrt(d) scale keeps the order."""
    section("5. Why an untrained model prints 'RRRR'")
    D, V = cfg.hidden, cfg.vocab_size
    out_emb = np.asarray(rmsnorm(params["E"], params["out_norm"], cfg.eps), dtype=np.float64)   # (V,D)
    gram = out_emb @ out_emb.T                                                     # (V,V)
    off = gram[~np.eye(V, dtype=bool)]
    margin = (np.diag(gram) - np.where(np.eye(V, dtype=bool), -np.inf, gram).max(axis=1)).min()
    print("Take the output rows n_i = rmsnorm(E, out_norm)[i] and compare every pair:")
    print(f"  n_i . n_i = {np.diag(gram).min():.2f} .. {np.diag(gram).max():.2f} for every token (= d = {D})")
    print(f"  n_i . n_j, i != j: std {off.std():.2f}, largest {off.max():.2f}")
    print(f"  so every token's own row beats every other row by at least {margin:.1f}.")
    raw = logit_stats(*raw_output(cfg, params), ids, targets)
    s = logit_stats(cfg, params, ids, targets)
    print(f"Section 3 showed that x leaves the layers still pointing along its input token's embedding, so the\n"
          f"largest logit is the input token's own: the argmax equals the input token at "
          f"{100 * s['argmax_is_input']:.1f}% of the {ids.size} positions.")
    logits = np.asarray(forward(params, cfg, ids), dtype=np.float64) / 0.8          # (B,T,V) at temperature 0.8
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    p_input = float((np.take_along_axis(probs, ids[..., None], -1)[..., 0] / probs.sum(-1)).mean())
    print(f"The fresh g_out (1/sqrt(d)) does not change that: one positive factor on every logit keeps their "
          f"order. It\n"
          f"shrinks the gaps: the input token leads the next-best token by {s['lead']:.2f} on average (raw: "
          f"{raw['lead']:.1f}, sqrt(d)\ntimes more). At temperature 0.8 the input token still gets {100 * p_input:.1f}% "
          f"of the probability on average.")
    print(f"Ask it to continue a prompt that ends in 'R' and it repeats that token forever (temperature 0.8, top-k 40):")
    text = generate(params, cfg, tokenizer, PROMPT, max_new_tokens=12, temperature=0.8, top_k=40, seed=seed)
    print("  " + repr(text))
    print("The prototype's four untrained sub-models printed exactly this. It is not a bug in sampling: it is\n"
          "what a tied output does before training, scaled or not, and every model in this course is trained.")
    return {"own_dot": float(np.diag(gram).mean()), "other_dot_std": float(off.std()),
            "other_dot_max": float(off.max()), "argmax_is_input": s["argmax_is_input"], "lead": s["lead"],
            "raw_lead": raw["lead"], "p_input_at_0.8": p_input, "sample": text}


def training(cfg, params, train_tokens, val_tokens, out, args):
    """Section 6: train the one model for about a minute."""
    section("6. Training: next-token cross-entropy, AdamW")
    steps = args.steps
    tc = TrainConfig(steps=steps, batch_size=4 if args.quick else 16, lr=3e-3, min_lr=3e-4,
                     warmup=min(50, steps // 10), eval_interval=max(1, steps // 8),
                     eval_batches=1 if args.quick else 8, log_interval=max(1, steps // 20), seed=args.seed)
    print(f"Settings: {tc}")
    print(f"Corpus: {len(train_tokens):,} train and {len(val_tokens):,} val tokens (a 90/10 split). Each step reads "
          f"{tc.batch_size} windows of {cfg.context} tokens\nand predicts every next token. A progress line shows "
          f"the step, the loss, the gradient norm, tokens per second and the time left.")
    t0 = time.perf_counter()
    _, metrics = train_with_checkpoints(args, out / "checkpoint", params, cfg, tc, train_tokens, val_tokens)
    seconds = time.perf_counter() - t0
    print(f"Trained {steps} steps in {format_duration(seconds)}.")
    atomic_write_json(out / "metrics.json", {"config": cfg.to_dict(), **metrics})
    return metrics, tc, seconds


def after_training(cfg, params, tokenizer, ids, targets, metrics, train_tokens, args, fresh):
    """Sections 6-7: the loss against the baselines, the logits again, and samples."""
    entropy = unigram_entropy(train_tokens, cfg.vocab_size)
    print(f"\nln V = {math.log(cfg.vocab_size):.3f}, unigram entropy = {entropy:.3f} nats.")
    print("\n".join(loss_table(metrics, cfg, entropy)))
    s = logit_stats(cfg, params, ids, targets)
    gains = {name: float(np.mean(1 + params[name])) for name in ("final_norm", "out_norm")}
    if "logit_gain" in params:    # the learned temperature, times 1/sqrt(d) in g_out
        gains["temperature"] = float(1 + np.mean(params["logit_gain"][0]))
    if "node_gain" in params:     # the model's own per-coordinate output gain, in g_out
        gains["node_gain"] = float(np.mean(1 + params["node_gain"][0]))
    print(f"\nThe logits now: std {s['std_all']:.2f} (was {fresh['std_all']:.2f}); the input token's own "
          f"logit {s['own']:+.2f} (was {fresh['own_logit']:+.2f}); the right token's {s['target']:+.2f} "
          f"(was {fresh['target_logit']:+.2f}).")
    print(f"The argmax equals the input token at {100 * s['argmax_is_input']:.1f}% of the positions "
          f"(was {100 * fresh['argmax_is_input']:.1f}%).")
    conclude(args, f"What changed is where x points. The layers learned to write large outputs: |x| after the "
                   f"layers is {s['norm_x']:.1f}\n(was {fresh['norm_x']:.1f}) against the embedding's {s['norm_x0']:.1f}, "
                   f"so x's cosine with its own input embedding fell from {fresh['cos_input']:.3f} to "
                   f"{s['cos_input']:.3f}.\nThe final RMSNorm brings x back to length sqrt(d), and a logit is d times a "
                   f"cosine, times the gains, over sqrt(d):\nthe input token's logit fell with its cosine, and the right "
                   f"token's rose as x turned towards its row.")
    together = float(np.prod(list(gains.values())))
    moved = ("grew" if together > 1.05 else "shrank" if together < 0.95 else "hardly moved")
    why = {"grew": ", louder logits for the same cosines.\nWith g_out starting at 1/sqrt(d) a logit starts at "
                   "sqrt(d) times a cosine, and the learned gains are the only way past sqrt(d).",
           "shrank": ", quieter logits for the same cosines.", "hardly moved": "."}[moved]
    words = {"final_norm": "mean (1 + g) of final_norm", "out_norm": "of out_norm",
             "temperature": "the learned temperature (1 + mean(logit_gain[0]))",
             "node_gain": "the mean node gain (1 + node_gain[0])"}
    listed = ", ".join(f"{words[k]} {v:.3f}" for k, v in gains.items())
    conclude(args, f"The gains {moved}: {listed};\ntheir product is {together:.3f}{why}")
    section("7. Samples from the trained model")
    samples = {}
    for name, temperature in (("temperature 0.8, top-k 40", 0.8), ("greedy (temperature 0)", 0.0)):
        text = generate(params, cfg, tokenizer, PROMPT, max_new_tokens=8 if args.quick else 60,
                        temperature=temperature, top_k=40 if temperature else None, seed=args.seed)
        samples[name] = text
        print(f"--- {name} ---\n{text}\n")
    return {"val": metrics["val"]["0.0"][-1], "train": metrics["train"]["0.0"][-1], "std_all": s["std_all"],
            "own_logit": s["own"], "target_logit": s["target"], "argmax_is_input": s["argmax_is_input"],
            "gains": gains, "cos_input": s["cos_input"], "norm_x": s["norm_x"], "samples": samples}


def save_figures(cfg, params, fresh, metrics, tokenizer, ids, out, entropy):
    """Loss curve with its baselines, logits before and after training, the embedding Gram matrix, attention."""
    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(metrics["step"], metrics["loss"], lw=0.8, label="train loss (each step)")
    ax.plot(metrics["eval_step"], metrics["val"]["0.0"], "o-", label="val loss")
    ax.axhline(math.log(cfg.vocab_size), color="k", ls="--", lw=1, label=f"ln V = {math.log(cfg.vocab_size):.2f}")
    ax.axhline(entropy, color="k", ls=":", lw=1, label=f"unigram entropy = {entropy:.2f}")
    bound = math.log(cfg.vocab_size) + 2 * math.sqrt(cfg.hidden)
    ax.axhline(bound, color="gray", ls="-.", lw=1, label=f"ln V + 2 sqrt(d) = {bound:.1f} (most a fresh model pays)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token, log scale)")
    ax.set_title("One transformer learning: from a few nats above ln V to below it")
    ax.legend(loc="center right")
    paths.append(save_figure(fig, out / "loss_curve.png"))

    trace_ids = np.array([tokenizer.encode(TRACE_PROMPT)])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = ((axes[0], *raw_output(cfg, fresh)[::-1], "fresh model, raw (logit_scale='none')"),
              (axes[1], fresh, cfg, "fresh model, g_out = 1/sqrt(d) (default)"),
              (axes[2], params, cfg, "trained model (default)"))
    for ax, p, c, title in panels:
        logits = np.asarray(forward(p, c, ids), dtype=np.float64)
        own = np.take_along_axis(logits, ids[..., None], -1)[..., 0].ravel()
        mask = np.ones(logits.shape, dtype=bool)
        np.put_along_axis(mask, ids[..., None], False, -1)
        lo, hi = min(logits.min(), own.min()), max(logits.max(), own.max())
        bins = np.linspace(lo, hi, 80)
        ax.hist(logits[mask], bins=bins, density=True, alpha=0.7, label="other tokens")
        ax.hist(own, bins=bins, density=True, alpha=0.7, label="the input token itself")
        ax.set_title(f"logits of the {title}", fontsize=10)
        ax.set_xlabel("logit")
        ax.legend()
    paths.append(save_figure(fig, out / "logits_fresh_vs_trained.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, p, title in ((axes[0], fresh, "fresh"), (axes[1], params, "trained")):
        n = np.asarray(rmsnorm(p["E"], p["out_norm"], cfg.eps), dtype=np.float64)
        gram = n @ n.T
        lim = np.abs(gram).max()
        im = ax.imshow(gram, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{title}: n_i . n_j of the output rows")
        ax.set_xlabel("token j")
        ax.set_ylabel("token i")
        fig.colorbar(im, ax=ax, shrink=0.8)
    paths.append(save_figure(fig, out / "embedding_gram.png"))

    probs = attention_probs(params, cfg, trace_ids)                               # (H,T,T) of layer 0
    labels = [tokenizer.token_strings[i].replace("\n", "\\n").replace(" ", "_") for i in trace_ids[0]]
    fig, axes = plt.subplots(1, cfg.heads, figsize=(3.2 * cfg.heads, 3.8))
    for head, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(probs[head], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer 0, head {head}")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.suptitle("Trained attention: row t = where position t looks (causal: nothing right of the diagonal)")
    paths.append(save_figure(fig, out / "attention.png"))
    return paths


def attention_probs(params, cfg, ids):
    """Layer 0's attention probabilities for one sequence: (H,T,T)."""
    p, (B, T) = params["layers"][0], ids.shape
    D, H, K, h = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    a = rmsnorm(rmsnorm(params["E"][ids], params["emb_norm"], cfg.eps), p["attn_norm"], cfg.eps).reshape(T, D)
    cos, sin = rope_tables(T, h, cfg.rope_theta)
    q = rope((a @ p["Wq"].reshape(D, H * h)).reshape(T, H, h), cos, sin)
    k = np.repeat(rope((a @ p["Wk"].reshape(D, K * h)).reshape(T, K, h), cos, sin), H // K, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(h)                       # (H,T,T)
    return softmax(np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -1e30))


if __name__ == "__main__":
    raise SystemExit(main())
