"""Benchmarks for inference: the KV cache against full recompute, and speculative decoding.

  python -m tinyfractal.tools.infer_bench cache [--preset original]        cache vs recompute, wall time
  python -m tinyfractal.tools.infer_bench spec --ckpt DIR                   the speculative table
  python -m tinyfractal.tools.infer_bench calls [--preset tiny --set hidden=384]   per-call times, break-even

Timings run with one BLAS thread (set before NumPy loads, by re-running this command in a child
process): on a shared CPU, multi-threaded BLAS stalls for milliseconds on the tiny matrices of
decoding. Every ratio compares runs made back to back in the same process, in alternating order.
"""
import os
import subprocess
import sys
import time

from tinyfractal.cli_args import Parser, reporting

CHILD = "TINYFRACTAL_BENCH_CHILD"


def corpus_prompts(tokenizer, n, length, stride=9973):
    """n prompts of `length` tokens from the validation split, at fixed, spread-out offsets."""
    from tinyfractal.training.data import load_tokens, train_val_split
    _, val = train_val_split(load_tokens(tokenizer))
    return [[int(t) for t in val[i * stride:i * stride + length]] for i in range(n)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def cache_vs_recompute(params, cfg, tokenizer, prompt, new, repeats=1, log=print):
    """Greedy generation of `new` tokens from the root: cached `generate` against `generate_reference`,
    timed back to back; the texts must be equal. Returns {'cached_s', 'full_s', 'speedup'}."""
    from tinyfractal.inference.sample import generate, generate_reference
    kw = dict(max_new_tokens=new, temperature=0)
    generate(params, cfg, tokenizer, prompt, max_new_tokens=4, temperature=0)             # warm-up, untimed
    generate_reference(params, cfg, tokenizer, prompt, max_new_tokens=4, temperature=0)
    cached, full = [], []
    for r in range(repeats):
        tc, a = timed(lambda: generate(params, cfg, tokenizer, prompt, **kw))
        tf, b = timed(lambda: generate_reference(params, cfg, tokenizer, prompt, **kw))
        if a != b:
            raise AssertionError("cached and full-recompute generations differ")
        cached.append(tc)
        full.append(tf)
        log(f"  repeat {r + 1}: cached {tc:7.3f} s   full recompute {tf:7.3f} s   ratio {tf / tc:6.1f}x")
    best = min(full) / min(cached)
    log(f"same text: yes.  best times: cached {min(cached):.3f} s ({new / min(cached):.0f} tok/s), "
        f"full recompute {min(full):.3f} s ({new / min(full):.0f} tok/s)  ->  cache speed-up {best:.1f}x")
    return {"cached_s": cached, "full_s": full, "speedup": best}


def bench_cache(args, log=print):
    """The cache target: `original` preset (random init), a corpus prompt, `new` greedy tokens."""
    from tinyfractal.config import Config
    from tinyfractal.api import init_params
    from tinyfractal.text.bpe import Tokenizer
    cfg = Config.preset(args.preset)
    params = init_params(cfg, 0)
    tok = Tokenizer.default()
    ids = corpus_prompts(tok, 1, args.prompt_tokens)[0]
    prompt = tok.decode(ids)
    if tok.encode(prompt) != ids:
        raise ValueError("the prompt does not re-encode to the same tokens; choose another --prompt-tokens")
    log(f"preset {args.preset} (random init, context {cfg.context}): {args.new} new tokens after a "
        f"{len(ids)}-token prompt, greedy, repeats {args.repeats}")
    return {"preset": args.preset, **cache_vs_recompute(params, cfg, tok, prompt, args.new, args.repeats, log)}


HEADER = (f"{'drafters':>10} {'k':>2} {'accept':>7} {'mean acc':>8} {'1st acc':>7} {'v calls/tok':>11} "
          f"{'FLOP x':>7} {'latency x':>9} {'wall x':>7}")


def format_row(row):
    return (f"{row['drafters']:>10} {row['k']:2d} {row['acceptance_rate']:7.3f} {row['mean_accepted']:8.2f} "
            f"{row['first_accept']:7.3f} {row['verifier_calls_per_token']:11.3f} {row['flop_speedup']:7.3f} "
            f"{row['latency_speedup']:9.3f} {row['wall_speedup']:7.3f}")


def spec_table(params, cfg, prompts, choices, ks, new, keep, repeats=3, verifier=(0, 0), log=print, temperature=0.0):
    """Speculative decoding for each drafter choice and draft length, against plain cached decoding with
    the verifier on the same prompts. Greedy (temperature 0): the outputs must be equal. Sampling: the
    same temperature for both, seeded per prompt (the texts differ; their distribution does not).
    Wall-time ratios come from back-to-back runs in alternating order (the median of `repeats`).
    Returns (rows, plain Models)."""
    import numpy as onp
    from tinyfractal.inference import decoder as infer
    from tinyfractal.inference.sample import sample_token
    from tinyfractal.inference.speculative import parse_drafters, speculative_ids

    def plain():
        m = infer.node_decoder(params, cfg, *verifier)
        outs = []
        for i, p in enumerate(prompts):
            rng = onp.random.default_rng(i)
            outs.append(infer.decode(m, list(p), new, lambda lg: sample_token(lg, rng, temperature), keep))
        return outs, m

    def spec(drafters, k):
        outs, total = [], None
        for i, p in enumerate(prompts):
            out, st = speculative_ids(params, cfg, p, new, verifier, drafters, k, temperature, seed=i, keep=keep)
            outs.append(out)
            total = st if total is None else add_stats(total, st)
        return outs, total

    base_outs, base = plain()
    rows = []
    log(HEADER)
    for choice in choices:
        drafters = parse_drafters(cfg, verifier, choice)
        for k in ks:
            outs, st = spec(drafters, k)
            if temperature == 0 and outs != base_outs:
                raise AssertionError(f"drafters {choice} k={k}: output differs from the verifier's greedy output")
            walls = []
            for r in range(repeats):
                pair = (plain, lambda: spec(drafters, k))
                first, second = pair if r % 2 == 0 else pair[::-1]
                t1, t2 = timed(first)[0], timed(second)[0]
                walls.append(t1 / t2 if r % 2 == 0 else t2 / t1)
            row = {"drafters": choice, "k": k, "acceptance_rate": st.acceptance_rate,
                   "mean_accepted": st.mean_accepted, "first_accept": st.first_accepted / max(1, st.rounds),
                   "verifier_calls_per_token": st.verifier_calls_per_token,
                   "flop_speedup": base.flops / st.flops, "latency_speedup": base.latency_flops / st.latency_flops,
                   "wall_speedup": float(onp.median(walls)) if walls else float("nan"), "walls": walls}
            rows.append(row)
            log(format_row(row))
    return rows, base


def call_times(params, cfg, verifier=(0, 0), k=4, calls=200):
    """Median wall time (us) of one cached forward call: the verifier on 1 token and on R drafts x (k+1)
    tokens, and each level's drafters (one, and all at once) on 1 token. Explains the wall-time column."""
    import numpy as onp
    from tinyfractal.inference import decoder as infer
    from tinyfractal.inference.speculative import resolve_drafters
    out = {}

    def per_call(m, ids, length=24):
        _, cache = infer.prefill(m, onp.zeros((1, length), int))
        if ids.shape[-2] > 1:
            cache = cache.expand(ids.shape[-2])
        times = []
        for _ in range(calls):
            cache.length = length
            t = time.perf_counter()
            infer.extend(m, cache, ids)
            times.append(time.perf_counter() - t)
        return float(onp.median(times)) * 1e6         # the median: a shared machine has long stalls

    V = infer.node_decoder(params, cfg, *verifier)
    out["verifier, 1 token"] = per_call(V, onp.ones((1, 1), int))
    for R, T in sorted({(1, 2), (1, k + 1), (4, k + 1)}):
        out[f"verifier, {R} x {T} tokens"] = per_call(V, onp.ones((R, T), int))
    for level in range(verifier[0] + 1, cfg.levels):
        nodes = resolve_drafters(cfg, verifier, level)
        out[f"one level-{level} drafter"] = per_call(infer.Decoder(params, cfg, level, [nodes[0][1]]),
                                                     onp.ones((1, 1), int))
        out[f"all {len(nodes)} level-{level} drafters"] = per_call(
            infer.Decoder(params, cfg, level, [j for _, j in nodes]), onp.ones((len(nodes), 1, 1), int))
    return out


def break_even(times):
    """Per drafter set: the first-token acceptance a k=1 round needs to pay for itself on this machine.

    A k=1 round costs one drafter call and one verifier call on 2 tokens per draft, and yields 1 + a
    tokens where plain decoding pays one verifier call per token: break-even at a = cost / t_v - 1.
    Above 1 means no acceptance can make it pay.
    """
    t_v = times["verifier, 1 token"]
    verify = {1: times["verifier, 1 x 2 tokens"]}
    out = {}
    for name, t in times.items():
        if "drafter" in name:
            out[name] = (t + verify[1]) / t_v - 1
    return out


def bench_calls(args, log=print):
    """Per-call times for a config (random init: no acceptance is measured) and the break-even acceptance."""
    from tinyfractal.config import Config
    from tinyfractal.api import init_params
    cfg = Config.preset(args.preset).override(**dict(item.split("=", 1) for item in args.set))
    params = init_params(cfg, 0)
    log(f"{cfg}\nmedian time of one cached call, {args.calls} calls each, one BLAS thread:")
    times = call_times(params, cfg, (0, 0), args.k, args.calls)
    for name, t in times.items():
        log(f"  {name:<28} {t:8.0f} us")
    for name, a in break_even(times).items():
        log(f"  k=1 with {name}: pays off above first-token acceptance {a:.2f}"
            + ("  (impossible: > 1)" if a > 1 else ""))
    return {"config": cfg.to_dict(), "call_us": times, "break_even": break_even(times)}


def bench_spec(args, log=print):
    """The speculative table for a checkpoint, plus the per-call times behind the wall-time column."""
    from tinyfractal.training.checkpoint import load
    from tinyfractal.text.bpe import Tokenizer
    params, cfg, _ = load(args.ckpt)
    verifier = tuple(int(v) for v in args.verifier.split("."))
    cfg.check_node(*verifier)
    keep = args.keep if args.keep else cfg.context // 2
    prompts = corpus_prompts(Tokenizer.default(), args.prompts, args.prompt_tokens)
    ks = [int(k) for k in args.k.split(",")]
    choices = args.drafters.split(",") if args.drafters else default_choices(cfg, verifier)
    mode = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature}"
    log(f"checkpoint {args.ckpt}: verifier {verifier}, {args.prompts} prompts x {args.new} new tokens, {mode}, "
        f"context {cfg.context}, window slides back to keep={keep} tokens")
    rows, base = spec_table(params, cfg, prompts, choices, ks, args.new, keep, args.repeats, verifier, log,
                            args.temperature)
    best_flop = max(rows, key=lambda r: r["flop_speedup"])
    best_wall = max(rows, key=lambda r: r["wall_speedup"])
    best_latency = max(rows, key=lambda r: r["latency_speedup"])
    log(f"plain cached decoding with the verifier: {base.flops / 1e6:.1f} MFLOP for "
        f"{len(prompts) * args.new} tokens in {base.calls} calls")
    for name, best in (("FLOP", best_flop), ("latency-model", best_latency), ("wall-time", best_wall)):
        key = {"FLOP": "flop_speedup", "latency-model": "latency_speedup", "wall-time": "wall_speedup"}[name]
        log(f"best {name} speed-up {best[key]:.3f}x (drafters {best['drafters']}, k={best['k']})")
    times = call_times(params, cfg, verifier, max(ks))
    log("median time of one cached call (us): " + ", ".join(f"{name} {t:.0f}" for name, t in times.items()))
    log("k=1 break-even first-token acceptance: "
        + ", ".join(f"{name} {a:.2f}" for name, a in break_even(times).items()))
    return {"verifier": list(verifier), "keep": keep, "rows": rows, "call_us": times, "break_even": break_even(times)}


def default_choices(cfg, verifier):
    """Each single drafter, each whole level, and every descendant at once."""
    from tinyfractal.inference.speculative import resolve_drafters
    out = []
    for level in range(verifier[0] + 1, cfg.levels):
        out += [f"{l}.{j}" for l, j in resolve_drafters(cfg, verifier, level)] + [str(level)]
    if cfg.levels - verifier[0] > 2:
        out.append("+".join(str(level) for level in range(verifier[0] + 1, cfg.levels)))
    return out


def add_stats(a, b):
    """Stats of two runs added up (the counts; the rates are recomputed from them)."""
    from tinyfractal.inference.speculative import SpecStats
    out = SpecStats()
    for name in ("new_tokens", "rounds", "plain_steps", "drafted", "accepted", "first_accepted", "verifier_calls",
                 "drafter_calls", "verifier_flops", "drafter_flops", "latency_flops"):
        setattr(out, name, getattr(a, name) + getattr(b, name))
    return out


def build_parser():
    parser = Parser(prog="python -m tinyfractal.tools.infer_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for the timings (default 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("cache", help="KV cache vs full recompute")
    c.add_argument("--preset", default="original")
    c.add_argument("--prompt-tokens", type=int, default=56)
    c.add_argument("--new", type=int, default=200)
    c.add_argument("--repeats", type=int, default=5)
    s = sub.add_parser("spec", help="speculative decoding table for a checkpoint")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--verifier", default="0.0", help="LEVEL.INDEX (default 0.0, the whole model)")
    s.add_argument("--drafters", default=None,
                   help="comma-separated choices: '2' a level, '2.1' one node, '1.0+2.3' a set, '1+2' two levels")
    s.add_argument("--k", default="1,2,3,4,6", help="draft lengths, comma-separated")
    s.add_argument("--prompts", type=int, default=3)
    s.add_argument("--prompt-tokens", type=int, default=24)
    s.add_argument("--new", type=int, default=200)
    s.add_argument("--keep", type=int, default=None, help="tokens kept when the window slides (default context/2)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    t = sub.add_parser("calls", help="per-call times and break-even acceptance for a config (random init)")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE, e.g. hidden=384 head_dim=64")
    t.add_argument("--k", type=int, default=4)
    t.add_argument("--calls", type=int, default=300)
    return parser


@reporting
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.threads and os.environ.get(CHILD) is None:
        env = dict(os.environ, **{CHILD: "1", "OPENBLAS_NUM_THREADS": str(args.threads),
                                  "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
        return subprocess.call([sys.executable, "-m", "tinyfractal.tools.infer_bench", *argv], env=env)
    result = {"cache": bench_cache, "spec": bench_spec, "calls": bench_calls}[args.command](args)
    if args.json:
        from tinyfractal.files import atomic_write_json
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
