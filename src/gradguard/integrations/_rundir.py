"""Run directories of ``gradguard run``: one per run, a ``latest`` pointer, ``--resume``.

``runs/<script>/`` holds one directory per run, named by its start time
(``20261114-153012``, ``-1``, ``-2`` ... when two start within a second), and ``latest``,
a symlink to the newest (a one-line text file where symlinks are not allowed). A re-run
never appends to an earlier run; ``--resume`` continues one on purpose, and the guards
then start from the state saved at the end of the previous session (``guard_state.pt``),
so step numbers and clip statistics go on instead of starting again at 0.

Under torch.distributed only the rank that writes (rank 0, from ``RANK`` as set by
``torchrun``) creates directories; the other ranks write nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_state_dict, own_step, same_weights
from ..errors import StateMismatch
from ..rundir import write_atomic

LATEST = "latest"
STATE_FILE = "guard_state.pt"
#: Each guard's options and what it clipped, for the outcome's remedies.
GUARD_FILE = "guard.json"


def writer_rank() -> bool:
    """True on the process that writes run directories (rank 0, or no torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def write_json(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON (temp file, fsync,
    ``os.replace``; no temp file is left behind when the disk is full)."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def point_latest(base: Path, run_dir: Path) -> None:
    """Make ``base/latest`` point at ``run_dir`` (replaced atomically)."""
    link = base / LATEST
    tmp = base / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:  # no symlinks here (some Windows setups): a text file instead
        tmp.write_text(run_dir.name + "\n", encoding="utf-8")
    if link.is_dir() and not link.is_symlink():
        raise FileExistsError(f"{link} is a directory; gradguard keeps a 'latest' pointer there")
    os.replace(tmp, link)


def resolve_latest(base: Path) -> Path | None:
    """The directory ``base/latest`` points at, or None."""
    link = base / LATEST
    if link.is_symlink():
        target = link.resolve()
    elif link.is_file():
        target = base / link.read_text(encoding="utf-8").strip()
    else:
        return None
    return target if target.is_dir() else None


def trainer_run_dir(base: Path, sub: str | None, fresh: bool) -> tuple[Path, str | None]:
    """Where a trainer callback's run writes, and what to say: a fresh run (no checkpoint
    resumed) into a directory that holds records gets ``base/<start time>`` of its own
    (found by a stranger: a re-run into the same output directory was reported with the
    run before it); a resumed one goes on where ``base/latest`` points, when a run of its
    own made it (found by a stranger: resumed in a new process, it went back to ``base``
    and into the records of the run before it). ``sub``: the part a later fresh call in the
    same process adds (``train1``, ``fit1``)."""
    target = base / sub if sub else base
    if fresh:
        if not holds_records(target):
            return target, None
        new = new_run_dir(base)
        return new, (f"{str(target)!r} holds the records of an earlier run; this one, which "
                     f"resumed no checkpoint, writes to {str(new)!r}")
    if sub is None and (latest := resolve_latest(base)) is not None:
        return latest, None
    return target, None


def holds_records(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds step records already (another run's)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def new_run_dir(base: Path) -> Path:
    """A fresh directory under ``base`` named by the start time; ``latest`` points at it.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> base = Path(tempfile.mkdtemp())
        >>> a, b = new_run_dir(base), new_run_dir(base)
        >>> a != b, resolve_latest(base) == b.resolve()
        (True, True)
    """
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    k = 0
    while True:
        run_dir = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            run_dir.mkdir()  # atomic: two runs starting together get different names
            break
        except FileExistsError:
            k += 1
    point_latest(base, run_dir)
    return run_dir


def resume_dir(base: Path, resume: str | os.PathLike[str]) -> Path:
    """The run directory ``--resume`` names: ``"latest"`` (under ``base``) or a path.

    Raises:
        FileNotFoundError: there is no such run directory.
    """
    if str(resume) == LATEST:
        found = resolve_latest(base)
        if found is None:
            raise FileNotFoundError(f"--resume: {base / LATEST} does not exist; there is no "
                                    "earlier run of this script to resume")
        return found
    path = Path(resume)
    if not (path / "run.json").is_file() and not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"--resume-from {str(resume)!r}: not a gradguard run directory "
                                "(no run.json or metrics.jsonl)")
    return path


def open_run(base: Path, resume: str | os.PathLike[str] | None) -> tuple[Path | None, Path | None]:
    """``(the directory this process writes, the directory guards resume from)``.

    Only the writing rank gets the first (a new directory, or the resumed one); every
    rank resumes its guards from the second, so that step numbers agree across ranks. A
    rank that cannot see the resumed directory (no shared file system) starts afresh.
    """
    state_dir = None
    if resume is not None:
        try:
            state_dir = resume_dir(base, resume)
        except FileNotFoundError:
            if writer_rank():
                raise
    if not writer_rank():
        return None, state_dir
    return (state_dir if state_dir is not None else new_run_dir(base)), state_dir


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write a guard's state for a later ``--resume`` (temp file, then ``os.replace``; the
    temp file is removed when the write fails)."""
    tmp = run_dir / (STATE_FILE + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, run_dir / STATE_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def last_step(run_dir: Path) -> int | None:
    """The last step ``metrics.jsonl`` there recorded (None: none, or no file)."""
    from ..events import iter_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for r in iter_jsonl(path, warn=lambda _msg: None):
        if r.get("type") == "step" and isinstance(r.get("step"), int):
            last = r["step"] if last is None else max(last, r["step"])
    return last


def resume_guard(guard: Any, saved: Path, k: int) -> str | None:
    """Load the state a session saved in ``saved`` into ``guard``; when it saved none (it
    was killed), or one that does not fit (the model or the options changed since), number
    the guard's steps on from the steps it recorded and return what to say; a script that
    went back to a checkpoint of its own, or started from scratch, is told apart
    (:func:`_went_back`)."""
    state = load_state(saved)
    last = last_step(saved)
    went_back = _went_back(guard, state, saved, k)
    if went_back is not None:
        return went_back
    why = None
    if state is not None:
        try:
            guard.load_state_dict(state)
            return None
        except StateMismatch as e:  # checked before anything is loaded (checkpoint.py)
            # the model or the options changed since: gradguard's own state must not stop
            # the script (found by a stranger: a layer added, then --resume, and the script
            # died at its first step inside gradguard)
            why = f"its guard state does not fit: {e.what}"
    if last is None:
        return None if why is None else f"{saved}: {why}: optimizer {k}'s guard starts afresh"
    guard.step_count = last + 1  # after what the earlier session recorded
    if why is not None:
        return (f"{saved}: {why}: optimizer {k}'s guard starts afresh, its steps numbered on "
                f"from {last + 1}")
    return (f"{saved} holds no saved guard state (its session was killed before it could "
            f"end: SIGKILL, out of memory): optimizer {k}'s guard starts afresh, its steps "
            f"numbered on from {last + 1}")


def _went_back(guard: Any, state: dict[str, Any] | None, saved: Path, k: int) -> str | None:
    """When the optimizer's own step count (:func:`gradguard.checkpoint.own_step`) is behind
    the one the saved session ended with, the script went back to a checkpoint of its own:
    the guard's steps are numbered back by as many, so that its records replace those of
    the stretch it runs again (found by a stranger: a script preempted 23 steps after its
    checkpoint of step 200 and resumed from it was numbered on from 223, its NaN at step
    260 told at 283, the stretch 200-222 recorded twice). An optimizer that has not stepped
    yet over weights other than those the session ended with starts from scratch: its
    guard is a run of its own there (it was judged against the earlier run's loss level,
    "a loss spike at step 300", its LR cut). The counts, not the guard's steps, are
    compared: skipped steps and rollbacks leave the optimizer's count behind the guard's
    (found by a regression hunt: a run with a NaN batch, resumed from its last checkpoint,
    lost its last step's record). Returns what to say, or None to resume as usual."""
    if state is None or "optimizer_stepped" not in state:  # saved by an older gradguard
        return None
    own, ended = own_step(guard.optimizer), state.get("optimizer_steps")
    # no state at all: it has not stepped (an RMSprop or a plain SGD keeps no count to say
    # so; found by a regression hunt: a from-scratch RMSprop under --resume was judged
    # against the earlier run's loss level and killed)
    if state["optimizer_stepped"] and not any(guard.optimizer.state.values()):
        if same_weights(state.get("weight_norms"), guard.telemetry.params,
                        state.get("rounded_norms")):
            return None  # the weights it ended with, a new optimizer: it goes on
        guard.step_count = 0
        return (f"{saved}: optimizer {k} has taken no step yet over weights other than "
                "those the earlier session ended with (the script starts from scratch): its "
                "guard starts afresh at step 0, a run of its own in that directory")
    if own is None or not isinstance(ended, int) or own >= ended:
        return None
    note = ""
    try:  # its statistics, not its window of the steps the script runs again
        load_state_dict(guard, state, telemetry=False)
    except StateMismatch as e:
        note = f"; its guard state does not fit ({e.what}): it starts afresh"
    back = ended - own
    guard.step_count = _numbered_from(saved, int(state["step_count"]), back)
    return (f"{saved}: optimizer {k}'s own step count is {own}, {back} behind the {ended} "
            "the earlier session ended with (the script went back to a checkpoint of its "
            f"own): its guard's steps are numbered from {guard.step_count}, and its records "
            f"replace those of the steps it runs again{note}")


def _numbered_from(saved: Path, end: int, back: int) -> int:
    """The guard step a script that went back ``back`` optimizer steps from the end of the
    saved session (guard step ``end``) runs again from: the one after the taken step that
    brought the optimizer's count to where it went back to, read from the records of
    ``metrics.jsonl`` (steps it skipped did not count; found by a regression hunt: a NaN
    batch in the stretch run again left the guard late by one step, a rollback by seven);
    ``end - back`` when the records cannot say (none, or a rollback in that stretch, which
    set the count back itself)."""
    from ..events import iter_jsonl

    skipped: dict[int, bool] = {}
    rolled: set[int] = set()
    try:
        for r in iter_jsonl(saved / "metrics.jsonl", warn=lambda _msg: None):
            if r.get("type") == "step" and isinstance(r.get("step"), int) and r["step"] < end:
                skipped[r["step"]] = bool(r.get("skipped"))
        events = saved / "events.jsonl"
        for r in iter_jsonl(events, warn=lambda _msg: None) if events.is_file() else ():
            if r.get("kind") == "rollback" and isinstance(r.get("step"), int):
                rolled.add(r["step"])
    except (OSError, ValueError):
        return max(end - back, 0)
    taken = 0
    for step in sorted(skipped, reverse=True):
        if step in rolled:
            return max(end - back, 0)
        if not skipped[step]:
            taken += 1
            if taken == back + 1:
                return step + 1
    # back to before its first taken step: from the first step recorded
    return min(skipped) if taken == back and skipped else max(end - back, 0)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The state :func:`save_state` wrote there, or None."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
