"""What every lesson shares: its arguments, output folder, section headers, figures, errors, Ctrl-C, checkpoints.

A lesson module reads

    def main(argv=None):
        return run("base", __doc__, lesson, argv, steps=(1000, 4), trains=True)

    def lesson(args):
        cfg, params = the_tree(args)       # each section is a named function that starts with section(...)
        ...

`run` gives every lesson the same command line and the same behaviour:
  --out DIR   where everything goes; default lesson_output/NAME/, and lesson_output/NAME-quick/ with
              --quick, so a quick run never overwrites (or is mistaken for) a full run's model
  --quick     a plumbing check of seconds; it prints one banner line saying its numbers mean nothing,
              and the lesson skips the conclusions its numbers cannot support (see `conclude`)
  --seed N    the seed of every initialisation and batch
  --steps N   (lessons that train) training steps, with a full and a quick default
  --resume    (lessons that train) continue from the checkpoints in --out instead of starting over
A bad argument or a ValueError is one line on stderr, `error: ...`, exit code 2 (as the CLI's);
Ctrl-C prints one line saying which checkpoints are kept, and exits with 130.

Lessons that train save a checkpoint at every evaluation and where Ctrl-C stopped them
(`train_with_checkpoints`); its meta records
the lesson and whether it was a --quick run, and `load_trained` refuses a quick run's model where a
trained one is wanted.
"""
import argparse
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tinyfractal.cli_args import Parser, fail as fail_line
from tinyfractal.training.checkpoint import exists, load, load_optimizer, read_meta
from tinyfractal.training.train import Diverged, format_duration, save_run, train

OUTPUT = Path("lesson_output")
QUICK_BANNER = ("--quick: a plumbing check that runs in seconds; its numbers mean nothing "
                "(run without --quick for the lesson).")
RULE = "=" * 78

_saved = {}    # checkpoint folder -> (step, steps) of the last save in this process, for the Ctrl-C line


def section(title):
    """Print a section header: the lesson output reads as numbered sections, like the code."""
    print(f"\n{RULE}\n{title}\n{RULE}")


def conclude(args, text):
    """Print a conclusion drawn from the numbers, but only on a full run: quick numbers support none."""
    if not args.quick:
        print(text)


def output_gain_words(cfg):
    """What a model's output gain g_out is for the config's logit_scale and node_gains (model.output_gain),
    in one or two printable lines; d is the model's own width."""
    factors = {"none": [], "sqrt": ["1/sqrt(d)"], "learned": ["(1 + mean(logit_gain[0])) / sqrt(d)"]}[cfg.logit_scale]
    roles = ["a learned temperature"] if cfg.logit_scale == "learned" else []
    if cfg.node_gains:
        factors, roles = factors + ["(1 + node_gain[0])"], roles + ["a learned gain per coordinate"]
    first = f"g_out = {' * '.join(factors) or '1'} (logit_scale={cfg.logit_scale!r}, node_gains={cfg.node_gains})"
    start = "1" if cfg.logit_scale == "none" else "1/sqrt(d)"
    if not roles:
        return [first + ": a constant, " + start + "."]
    tables = "both tables start" if len(roles) == 2 else "its table starts"
    return [first + ":", f"{' and '.join(roles)}; {tables} at 0, so a fresh model's g_out is exactly {start}."]


def output_folder(name, out, quick):
    """--out if given, else lesson_output/NAME/ (or lesson_output/NAME-quick/ for a quick run)."""
    if out is not None:
        return Path(out)
    return OUTPUT / (f"{name}-quick" if quick else name)


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def parser(name, doc, steps=None, trains=False):
    """The lesson's argument parser: --out, --quick, --seed, and --steps/--resume for lessons that train.

    `steps` = (full default, quick default) adds --steps. A usage mistake is one line and exit code 2.
    """
    p = Parser(prog=f"python -m tinyfractal.lessons.{name}", description=doc.strip().splitlines()[0])
    p.add_argument("--out", default=None,
                   help=f"folder for its outputs (default {OUTPUT}/{name}/, or {OUTPUT}/{name}-quick/ with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a plumbing check of seconds: tiny settings, numbers that mean nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    if steps is not None:
        p.add_argument("--steps", type=positive_int, default=None,
                       help=f"training steps (default {steps[0]}, or {steps[1]} with --quick)")
    if trains:
        p.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints saved in --out by an interrupted run")
    return p


def parse(p, name, argv, steps=None):
    """Parse argv; add args.name, resolve args.out and the --steps default."""
    args = p.parse_args(argv)
    args.name = name
    args.out = output_folder(name, args.out, args.quick)
    if steps is not None and args.steps is None:
        args.steps = steps[1] if args.quick else steps[0]
    if not hasattr(args, "resume"):
        args.resume = False
    return args


def run(name, doc, lesson, argv=None, steps=None, trains=False, arguments=None):
    """Run lesson(args) with the shared command line; return the exit code (0, 2 on an error, 130 on Ctrl-C).

    `arguments(p)` adds the lesson's own options to the parser.
    """
    p = parser(name, doc, steps, trains)
    if arguments is not None:
        arguments(p)
    try:
        args = parse(p, name, argv, steps)
    except ValueError as e:                       # a usage mistake (cli_args.UsageError)
        return fail(e)
    started = time.perf_counter()
    _saved.clear()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.quick:
            print(QUICK_BANNER)
        lesson(args)
    except (ValueError, FileNotFoundError, Diverged) as e:
        return fail(e)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(interrupted_line(name), file=sys.stderr)
        return 130
    print(f"\nLesson done in {format_duration(time.perf_counter() - started)}; outputs in {args.out}/")
    return 0


def fail(error):
    """The CLI's error style: one line on stderr, exit code 2."""
    sys.stdout.flush()
    message = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else \
        f"{error.strerror}: {error.filename}"
    return fail_line(message)


def note_saved(path, step, steps):
    """Record a checkpoint saved outside save_checkpoint (e.g. by training.grow), for the Ctrl-C line."""
    _saved[str(path)] = (int(step), int(steps))


def forget_saved(which):
    """Drop the recorded checkpoints whose path `which(path)` is true (superseded ones)."""
    for path in [p for p in _saved if which(p)]:
        del _saved[path]


def interrupted_line(name):
    """The one line printed on Ctrl-C: what was kept, and how to go on."""
    if not _saved:
        return "interrupted: nothing was saved yet"
    kept = ", ".join(f"{path} (step {step} of {steps})" for path, (step, steps) in _saved.items())
    return f"interrupted: kept {kept}; continue with python -m tinyfractal.lessons.{name} --resume (and the same options)"


@contextmanager
def uninterrupted():
    """Hold Ctrl-C until the block is done, so a checkpoint is never half written; then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Lay out, save atomically and close a figure; returns its path."""
    from tinyfractal.tools.plots import _save
    fig.tight_layout()
    return _save(fig, path)


def save_checkpoint(args, path, params, cfg, tc, state, metrics, extra=None, new_run=False):
    """train.save_run, with the lesson and whether this is a --quick run recorded in the meta.

    `new_run` (the first save of a run that did not resume) drops the checkpoints of an earlier run
    in the same folder once this one is in place."""
    with uninterrupted():
        save_run(path, params, cfg, tc, state, metrics, extra={"lesson": args.name, "quick": args.quick, **(extra or {})},
                 new_run=new_run)
        _saved[str(path)] = (int(state["t"]), tc.steps)


def is_quick(meta):
    """True if a checkpoint's meta says it was saved by a --quick run."""
    return bool(meta.get("quick", False))


def load_trained(path, quick):
    """(params, cfg, meta) of a checkpoint folder; a --quick run's model is refused unless this run is quick.

    A ValueError (one line at the command line) if the folder is missing, broken or a quick run's.
    """
    params, cfg, meta = load(path)
    if is_quick(meta) and not quick:
        raise ValueError(f"{path} holds the model of a --quick run ({meta.get('step', '?')} steps), not a trained "
                         f"one; train it with the full lesson (without --quick), or add --quick to this run")
    return params, cfg, meta


def trained_model(args, candidates):
    """(params, cfg, where it came from) of --ckpt, else of the first finished, non-quick checkpoint among
    `candidates` (in order); None when there is none, so the lesson trains its own. A --quick or --resume
    run never takes a checkpoint it did not ask for."""
    if args.ckpt:
        params, cfg, meta = load_trained(Path(args.ckpt), args.quick)
        return params, cfg, f"loaded {args.ckpt} (trained {meta.get('step', '?')} steps)"
    for path in [] if args.quick or args.resume else candidates:
        if not exists(path):     # a run folder (step folders + checkpoint.json) or an old flat one
            continue
        _, meta, _ = read_meta(path)
        if is_quick(meta):
            print(f"Not using {path}: it holds a --quick run's model ({meta.get('step', '?')} steps).")
            continue
        if meta.get("step") != meta.get("train", {}).get("steps", meta.get("step")):
            print(f"Not using {path}: its training stopped at step {meta.get('step')} of "
                  f"{meta['train']['steps']} (finish it with --resume).")
            continue
        params, cfg, meta = load_trained(path, args.quick)
        return params, cfg, f"loaded {path} (trained {meta.get('step', '?')} steps)"
    return None


def resume_state(args, path, params, cfg, tc):
    """With --resume, load the checkpoint at `path` into params (in place): (state, metrics) or (None, None).

    Refused (ValueError) if it holds another config, other training settings, or the other kind of run
    (quick or full); missing is not an error: the model then trains from the start.
    """
    if not args.resume:
        return None, None
    if not exists(path):
        print(f"--resume: nothing saved in {path} yet; training from step 0.")
        return None, None
    saved, saved_cfg, meta = load(path)
    if saved_cfg != cfg:
        raise ValueError(f"cannot resume from {path}: it holds another model ({saved_cfg}); run without --resume "
                         f"to start over")
    if is_quick(meta) != args.quick:
        kind = "a --quick run" if is_quick(meta) else "a full run"
        raise ValueError(f"cannot resume from {path}: it was saved by {kind}; use another --out, or run without "
                         f"--resume to start over")
    if meta.get("train") != tc.to_dict():
        changed = sorted(k for k, v in tc.to_dict().items() if meta.get("train", {}).get(k) != v)
        raise ValueError(f"cannot resume from {path}: it was trained with other settings ({', '.join(changed)} "
                         f"differ); use the same options, or run without --resume to start over")
    state = load_optimizer(path)
    if state is None:
        raise ValueError(f"cannot resume from {path}: it was saved without its optimizer state")
    from tinyfractal.core.tree import flatten
    target = flatten(params)
    for name, value in flatten(saved).items():
        target[name][...] = value
    return state, meta.get("metrics")


def train_with_checkpoints(args, path, params, cfg, tc, train_tokens, val_tokens, **train_kwargs):
    """Train params in place (train.train), saving a checkpoint to `path` at every evaluation, and at
    the step where Ctrl-C stopped it.

    With --resume it continues from the checkpoint there (a finished one is not trained again), so an
    interrupted lesson loses nothing. Without --resume, an earlier run's checkpoints in `path` are
    replaced by the first save of this one. Returns (state, metrics).
    """
    state, metrics = resume_state(args, path, params, cfg, tc)
    if state is not None and state["t"] >= tc.steps:
        print(f"--resume: {path} is already trained ({tc.steps} steps).")
        return state, metrics
    if state is not None:
        print(f"--resume: continuing from {path} at step {state['t']} of {tc.steps}.")

    first = [state is None]     # the first save of a fresh run starts the folder's history afresh

    def checkpoint(step, metrics, state):
        if state["t"] > 0:
            save_checkpoint(args, path, params, cfg, tc, state, metrics, new_run=first[0])
            first[0] = False

    return train(params, cfg, tc, train_tokens, val_tokens, state, metrics, on_eval=checkpoint,
                 on_interrupt=checkpoint, **train_kwargs)

