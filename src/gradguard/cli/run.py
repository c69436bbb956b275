"""``gradguard run``: guard every optimizer (and trainer) of an unmodified training script."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from ..guard import DEFAULT_EVERY, ON_NONFINITE

SCRIPT_CLIP = ("compose", "replace")

DESCRIPTION = (
    "Run an unmodified training script as __main__ with every torch.optim optimizer it "
    "steps guarded, and the native gradguard callback attached to every Lightning or "
    "Hugging Face Trainer it builds. gradguard measures each step's gradients before any "
    "clipping: the script's own clip_grad_norm_/clip_grad_value_ calls (and the trainers' "
    "gradient_clip_val/max_grad_norm) are carried out right after the measurement, exactly "
    "as the script asked, and recorded as the clip that happened. By default gradguard adds "
    "no clipping of its own (--clip), skips steps whose gradients are NaN/Inf, and backs "
    "the learning rate off / rolls back when steps keep failing (--no-recovery turns that "
    "off). Each run gets its own directory OUT/<start time> (events.jsonl, metrics.jsonl, "
    "run.json, report.html), with OUT/latest pointing at it; the summary judges the run "
    "on its loss (recovered / did not recover / diverged). Exit code: the script's own; "
    "with --fail-on-divergence, 1 when a run did not recover."
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a training script with every optimizer and trainer guarded (zero code)",
        description=textwrap.fill(DESCRIPTION, 88, break_on_hyphens=False),
        epilog=(
            "examples:\n"
            "  gradguard run train.py --lr 3e-4\n"
            "  gradguard run --clip zclip --fail-on-divergence train.py\n"
            "  gradguard run --resume train.py          # continue runs/train/latest\n"
            "  torchrun --nproc-per-node 2 -m gradguard run train.py\n"
            "  GRADGUARD='--clip zclip' PYTHONPATH=$(python -m gradguard.integrations.auto) "
            "accelerate launch train.py"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("clipping")
    g.add_argument(
        "--clip", default="none", metavar="POLICY",
        help="gradguard's own clip policy: zclip | autoclip | norm:MAX | value:MAX | agc | "
        "none (default: none: gradguard adds no clipping; the script's own clipping still "
        "happens)",
    )
    g.add_argument(
        "--script-clip", default="compose", choices=SCRIPT_CLIP,
        help="with --clip, what happens to the script's own clip calls: compose (both; "
        "for total-norm clips the smallest coefficient wins, applied once) or replace "
        "(the script's calls only measure) (default: compose)",
    )
    g = p.add_argument_group("guard")
    g.add_argument("--on-nonfinite", default="skip", choices=list(ON_NONFINITE),
                   help="what a step with a NaN/Inf gradient does (default: skip)")
    g.add_argument(
        "--recovery", action=argparse.BooleanOptionalAction, default=True,
        help="when steps keep failing: back the LR off, roll back to a snapshot, stop with a "
        "report when nothing helps (gg.Recovery(); default: on; it acts only on trouble)",
    )
    g.add_argument(
        "--loss-rise", action=argparse.BooleanOptionalAction, default=True,
        help="let the recovery act on a loss that rises and stays up (it assumes a loss "
        "that training lowers: turn it off for a GAN, RL returns or a curriculum, as "
        "gg.Recovery(loss_rise=False) does; default: on)",
    )
    g.add_argument("--snapshot-dir", default=None, metavar="DIR",
                   help="recovery snapshots on disk in DIR instead of CPU memory")
    g.add_argument("--every", type=int, default=DEFAULT_EVERY,
                   help=f"telemetry flush interval in steps (default: {DEFAULT_EVERY})")
    g.add_argument("--no-sample-updates", action="store_true",
                   help="do not measure update/weight ratios at flush steps")
    g.add_argument("--watch-activations", action="store_true",
                   help="name the first module whose forward output went NaN/Inf")
    g.add_argument("--sample-activations", action="store_true",
                   help="measure dead ReLU units and saturated sigmoid/tanh at flush steps")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where this script's runs go (default: runs/<script name>); each run "
                   "writes DIR/<start time>, and DIR/latest points at the newest")
    g.add_argument("--resume", action="store_true",
                   help="continue the latest run (OUT/latest) instead of starting a new one")
    g.add_argument("--resume-from", default=None, metavar="RUN_DIR",
                   help="continue this run directory instead of starting a new one")
    g.add_argument("--console", action="store_true",
                   help="print a status line per flush and each event to stderr")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to RUN_DIR/tensorboard")
    g.add_argument("--no-report", action="store_true", help="do not write report.html")
    g.add_argument("--fail-on-divergence", action="store_true",
                   help="exit 1 when a guarded run did not recover (diverged, stalled above "
                   "its loss before the incident, never learnt while its gradients vanished, "
                   "or was stopped), if the script exited 0")
    p.add_argument("script", help="the training script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=command)


def build_config(args: argparse.Namespace) -> Any:
    """The guards' :class:`~gradguard.GuardConfig` from the command line."""
    from ..config import MAX_EVERY, GuardConfig
    from ..integrations._hooked import parse_clip
    from ..recovery import Recovery
    from . import UsageError

    try:
        clip = parse_clip(args.clip)
    except ValueError as e:
        raise UsageError(f"--clip: {e}") from e
    if not 1 <= args.every <= MAX_EVERY:  # found by a stranger: 1000000 gave a traceback
        raise UsageError(f"--every {args.every}: must be from 1 to {MAX_EVERY}")
    if args.snapshot_dir is not None and not args.recovery:
        raise UsageError("--snapshot-dir: recovery is off (--no-recovery); drop one of them")
    if not args.loss_rise and not args.recovery:
        raise UsageError("--no-loss-rise: recovery is off (--no-recovery); drop one of them")
    try:
        rec = Recovery(snapshot_dir=args.snapshot_dir,
                       loss_rise=args.loss_rise) if args.recovery else None
    except ValueError as e:
        raise UsageError(f"--snapshot-dir: {e}") from e
    return GuardConfig(
        clip=clip, on_nonfinite=args.on_nonfinite, recovery=rec, every=args.every,
        sample_updates=not args.no_sample_updates, watch_activations=args.watch_activations,
        sample_activations=args.sample_activations,
    )


def resume_arg(args: argparse.Namespace) -> str | None:
    """The run to continue: ``"latest"``, a directory, or None for a new run."""
    from . import UsageError

    if args.resume and args.resume_from is not None:  # found by a stranger: not said
        raise UsageError("--resume and --resume-from: give one (--resume continues OUT/latest, "
                         "--resume-from RUN_DIR that run directory)")
    if args.resume_from is not None:
        return str(args.resume_from)
    return "latest" if args.resume else None


def sinks_for(args: argparse.Namespace) -> Any:
    """Per-run-directory sinks asked for on the command line (None: only the JSONL files)."""
    if not (args.console or args.tensorboard):
        return None

    def make(run_dir: Path) -> list[Any]:
        from ..sinks import ConsoleSink, TensorBoardSink

        out: list[Any] = []
        if args.console:  # stderr: the script's stdout stays the script's
            out.append(ConsoleSink(sys.stderr))
        if args.tensorboard:
            out.append(TensorBoardSink(run_dir / "tensorboard"))
        return out

    return make


def command(args: argparse.Namespace) -> int:
    from ..integrations import _rundir
    from ..integrations.run import OutDirError, run_script
    from . import EXIT_FINDINGS, UsageError

    script = Path(args.script)
    if not script.is_file():
        raise UsageError(f"script {args.script!r} does not exist or is not a file")
    config = build_config(args)
    if args.script_clip == "replace" and config.clip is None:  # found by a stranger: accepted
        raise UsageError("--script-clip replace: needs --clip (gradguard's clip replaces the "
                         "script's; without one nothing would be clipped); choose --clip "
                         "zclip | autoclip | norm:MAX | value:MAX | agc, or leave "
                         "--script-clip at compose")
    resume = None
    wanted = resume_arg(args)
    if wanted is not None:
        base = Path(args.out) if args.out is not None else Path("runs") / script.stem
        try:
            resume = _rundir.resume_dir(base, wanted)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e
    try:
        result = run_script(
            script, args.args, out=args.out, resume=resume, config=config,
            script_clip=args.script_clip, report=not args.no_report, sinks_for=sinks_for(args),
        )
    except OutDirError as e:  # raised before the script starts: the script's own errors pass
        raise UsageError(str(e)) from e
    if args.fail_on_divergence and result.exit_code == 0 and not result.optimizers:
        # found by a stranger: a CI gate passed a script whose loop silently trained nothing
        print("gradguard run: --fail-on-divergence: nothing was guarded (no optimizer step "
              "was taken in a form gradguard guards), so nothing was checked; exit 1",
              file=sys.stderr)
        return EXIT_FINDINGS
    if args.fail_on_divergence and result.exit_code == 0 and not result.ok:
        bad = [r for r in result.optimizers if not (r.get("outcome") or {}).get("ok", True)]
        lost = [r for r in result.optimizers if r.get("refused")]
        what = [f"{len(bad)} guarded run(s) did not recover or did not train"] if bad else []
        what += [f"{len(lost)} guarded run(s) were not recorded (their run directory is "
                 "another process's)"] if lost else []
        print(f"gradguard run: --fail-on-divergence: {'; '.join(what)}; exit 1",
              file=sys.stderr)
        return EXIT_FINDINGS
    return result.exit_code
