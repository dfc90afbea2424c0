"""The command line: `python -m tinyfractal COMMAND ...`.

COMMANDS is the table of every command: its name, the "module:function" that declares its arguments,
and a one-line help. A command's module is imported only when that command runs (as tinygrad's
device table does), so `eval`, `train` and `sample` never import matplotlib, and a module that adds a
command never imports this one (no import cycle). The declaring function receives its subparser, adds
the arguments and sets `run(args, extra) -> exit code` (and `overrides=True` if it takes --key=value).

Parsing and error reporting are shared with the other command lines (cli_args.py): a mistake is one
line on stderr and exit code 2.
"""
import importlib
import json
import math
import sys
import warnings

from tinyfractal.cli_args import Parser, UsageError, fail, parse_overrides, reporting, split_overrides

COMMANDS = {
    "train": ("tinyfractal.cli:train_arguments", "train a FractalFormer and write a checkpoint and metrics.json"),
    "eval": ("tinyfractal.cli:eval_arguments", "per-node validation loss of a checkpoint"),
    "sample": ("tinyfractal.cli:sample_arguments", "generate text from one node of a checkpoint"),
    "trace": ("tinyfractal.tools.trace:arguments", "one forward pass of one node, printing every op's slices and shapes"),
    "figures": ("tinyfractal.tools.plots:arguments", "ownership maps, tree, attention maps (and loss curves) of a config"),
    "grow": ("tinyfractal.training.grow:arguments",
             "grow a FractalFormer: train leaves apart, merge, train the new blocks, repeat"),
}


def train_arguments(p):
    p.description = ("Train, saving a checkpoint at every evaluation. Exit codes: 0 done, 2 bad input or a refused "
                     "folder, 3 training diverged (the checkpoint on disk stays the last finite one).")
    p.add_argument("--preset", default=None, help="model preset (default tiny; with --resume, the saved model)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out with its saved settings (settings you give must match)")
    p.add_argument("--extend-to", type=int, default=None, metavar="N",
                   help="with --resume: train the run on to N steps (the schedule becomes that of an N-step run; "
                        "recorded in the metrics)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept changed training settings (e.g. a lower --lr), recorded in the metrics")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one (its checkpoints go once the new run saves)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in --out to roll back to (default 2)")
    p.add_argument("--level-weights", default=None, help="weight of each level's loss, e.g. 1,0,0 (default: all 1)")
    add_backend(p)
    p.add_argument("--model-axis", type=int, default=1,
                   help="with --backend jax: devices per model group; the models of a level are spread over them")
    p.add_argument("--distributed", action="store_true",
                   help="with --backend jax: join a multi-host run (jax.distributed, from JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM / TPU pod detection)")
    p.set_defaults(run=run_train, overrides=True)


def add_backend(p):
    p.add_argument("--backend", choices=("numpy", "jax"), default="numpy",
                   help="numpy (the classroom engine) or jax (jit, GPUs, TPUs, many hosts: pip install 'tinyfractal[jax]')")


def parse_level_weights(text):
    """'1,0.5,0' -> [1.0, 0.5, 0.0]; every weight a finite number >= 0."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--level-weights must be comma-separated numbers, got {text!r}") from None
    if not all(0 <= w < float("inf") for w in weights):
        raise ValueError(f"--level-weights must be finite numbers >= 0, got {text!r}")
    return weights


def train_settings(args, extra):
    """(cfg, tc, level_weights, allowed changes) for `train`, from the command line and, with --resume,
    from the saved run: settings not given come from the checkpoint, and those given are compared."""
    from tinyfractal.config import Config
    from tinyfractal.training.train import TrainConfig, saved_settings
    model_over, train_over = split_overrides(parse_overrides(extra), ("model", Config), ("training", TrainConfig))
    weights = None if args.level_weights is None else parse_level_weights(args.level_weights)
    if args.keep < 1:
        raise ValueError(f"--keep must be >= 1, got {args.keep}")
    if args.steps is not None:
        train_over["steps"] = args.steps
    if not args.resume:
        for flag, given in (("--extend-to", args.extend_to is not None), ("--allow-changes", args.allow_changes)):
            if given:
                raise ValueError(f"{flag} changes a saved run; add --resume")
        preset = args.preset or "tiny"
        cfg = Config.preset(preset).override(**model_over)
        return cfg, TrainConfig.preset(preset).override(**train_over), weights, ()
    if args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; give one of them")
    saved_cfg, saved_tc, saved_weights = saved_settings(args.out)
    cfg = (Config.preset(args.preset) if args.preset else saved_cfg).override(**model_over)
    tc = saved_tc.override(**train_over)
    allowed = set(TrainConfig.__dataclass_fields__) | {"level_weights"} if args.allow_changes else set()
    if args.extend_to is not None:
        if args.steps is not None and args.steps != args.extend_to:
            raise ValueError(f"--steps {args.steps} and --extend-to {args.extend_to} disagree; give one of them")
        if args.extend_to < saved_tc.steps:
            raise ValueError(f"--extend-to {args.extend_to} is below the run's {saved_tc.steps} steps; it can only "
                             f"extend")
        tc = tc.override(steps=args.extend_to)
        allowed.add("steps")
    return cfg, tc, saved_weights if weights is None else weights, tuple(sorted(allowed))


def run_train(args, extra):
    from tinyfractal.training.train import Diverged, fit, loss_table
    cfg, tc, weights, allowed = train_settings(args, extra)
    if args.backend == "jax":
        from tinyfractal.jax_engine import cli as jax_cli
        fit = jax_cli.fitter(cfg, args.model_axis, args.distributed)
    elif args.model_axis != 1 or args.distributed:
        raise ValueError("--model-axis and --distributed only apply with --backend jax")
    try:
        with warnings.catch_warnings():
            # NumPy's overflow warnings come just before a divergence, whose one-line message says it all
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"tinyfractal\.")
            _, _, metrics, data = fit(cfg, tc, out=args.out, resume=args.resume, level_weights=weights,
                                      overwrite=args.overwrite, allow_changes=allowed, keep=args.keep)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        return fail(str(e) or "interrupted")
    if data is None:   # a finished run, resumed (fit said so in one line), or not process 0 of a distributed run
        return 0
    print("\n".join(loss_table(metrics, cfg)))
    print(f"saved checkpoint and metrics.json to {args.out}")
    return 0


def eval_arguments(p):
    p.add_argument("--ckpt", required=True, help="a run folder (its latest checkpoint) or one of its step folders")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true")
    add_backend(p)
    p.set_defaults(run=run_eval)


def run_eval(args, extra):
    from tinyfractal.training.checkpoint import load, read_meta
    from tinyfractal.training.data import load_tokens, train_val_split
    from tinyfractal.training.train import evaluate, node_key
    from tinyfractal.validate import check_memory
    from tinyfractal.variants import variant_of
    if args.batches < 1 or args.batch_size < 1:
        raise ValueError("--batches and --batch-size must be >= 1")
    cfg, _, _ = read_meta(args.ckpt)
    variant = variant_of(cfg)      # byte models: rows of g_0 bytes, losses in nats per byte
    tokenizer = variant.tokenizer(cfg)
    check_memory(cfg, args.batch_size, training=False)
    params, cfg, _ = load(args.ckpt, tokenizer=tokenizer)
    _, val = (variant.training_rows(cfg, part) for part in train_val_split(load_tokens(tokenizer)))
    if args.backend == "jax":
        from tinyfractal.jax_engine import cli as jax_cli
        level_losses, to_device = jax_cli.level_losses(cfg)
        losses = evaluate(to_device(params), cfg, val, args.batch_size, args.batches, level_losses=level_losses)
    else:
        losses = evaluate(params, cfg, val, args.batch_size, args.batches)
    bad = {n: v for n, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"the checkpoint gives non-finite losses {bad} although its weights are finite; "
                         f"the model overflows (check eps and the weights' scale)")
    if args.json:
        print(json.dumps({node_key(n): v for n, v in losses.items()}, indent=1))
    else:
        print(f"{'node':>8} {'width':>6} {'val loss':>9}")
        for (level, j), v in losses.items():
            print(f"{'(' + str(level) + ',' + str(j) + ')':>8} {cfg.width(level):6d} {v:9.4f}")
    return 0


def sample_arguments(p):
    p.add_argument("--ckpt", required=True, help="a run folder (its latest checkpoint) or one of its step folders")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding: sub-models of --level/--index draft, it verifies (stats on stderr)")
    p.add_argument("--drafters", default=None,
                   help="with --speculative: a level ('2'), a node ('2.1') or a '+' set ('2.0+2.3', '1+2'); "
                        "default: the verifier's children")
    p.add_argument("--draft-k", type=int, default=4, help="with --speculative: tokens per draft (default 4)")
    add_backend(p)
    p.set_defaults(run=run_sample)


def run_sample(args, extra):
    from tinyfractal.inference.sample import check_sampling, generate
    from tinyfractal.training.checkpoint import load, read_meta
    from tinyfractal.variants import variant_of
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    cfg, _, _ = read_meta(args.ckpt)
    tokenizer = variant_of(cfg).tokenizer(cfg)
    params, cfg, _ = load(args.ckpt, tokenizer=tokenizer)
    if args.backend == "jax":
        if args.speculative:
            raise ValueError("--speculative runs on the numpy backend only")
        from tinyfractal.jax_engine import cli as jax_cli
        print(jax_cli.generate(params, cfg, tokenizer, args.prompt, level=args.level, index=args.index,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed))
        return 0
    if args.speculative:
        from tinyfractal.inference.speculative import parse_drafters, speculative_generate
        verifier = (args.level, args.index)
        cfg.check_node(*verifier)
        drafters = None if args.drafters is None else parse_drafters(cfg, verifier, args.drafters)
        text, stats = speculative_generate(params, cfg, tokenizer, args.prompt, verifier, drafters,
                                           args.draft_k, args.max_new_tokens, args.temperature, args.top_k,
                                           args.top_p, args.seed)
        print(text)
        print(f"speculative: {stats.new_tokens} tokens, acceptance {stats.acceptance_rate:.3f}, "
              f"{stats.mean_accepted:.2f} drafted tokens kept per round, "
              f"{stats.verifier_calls_per_token:.3f} verifier calls per token", file=sys.stderr)
        return 0
    if args.drafters is not None or args.draft_k != 4:
        raise ValueError("--drafters and --draft-k only apply with --speculative")
    print(generate(params, cfg, tokenizer, args.prompt, level=args.level, index=args.index,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed))
    return 0


def load(target):
    """The function named by a "module:function" string of COMMANDS, importing its module now."""
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(command=None):
    """The parser of every command; only `command`'s module is imported and only its arguments declared."""
    parser = Parser(prog="python -m tinyfractal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                                title="commands")
    for name, (target, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == command:
            load(target)(p)
    return parser


@reporting
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "overrides", False):
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    return args.run(args, extra)
