"""The snapshots a rollback restores from: a ring in host memory, copied to
``snapshot_dir`` by a background writer, each with the loss level it was taken at and
whether its weights have had finite gradients.

A snapshot holds the weights after an update, not yet evaluated: they are *verified* at
the first step taken on them (its gradients are theirs when every step between was
skipped, unless a restore replaced them). A rollback goes to the newest verified snapshot
(:meth:`SnapshotRing.back`), and its restore is then a test of the batches: when the first
step on the restored weights is non-finite too, the batches are at fault, not the weights
(``data`` in :mod:`.ladder`)."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

from ..errors import GradGuardWarning, caller_stacklevel
from ..naming import optimizer_layout
from ..units import DYING
from . import actions
from .rise import AT_FRESH
from .snapshots import DiskSnapshotStore, MemorySnapshotStore, SnapshotWriter, copy_state

if TYPE_CHECKING:
    from ..guard import Guard


class SnapshotRing:
    """``keep`` snapshots in memory (``max_bytes`` bounds them), and on disk when a
    directory is given; :class:`~gradguard.recovery.Recovery` owns one."""

    def __init__(self, keep: int, max_bytes: int | None, directory: Any = None) -> None:
        self.keep_n = keep
        #: the snapshots rollbacks restore from (host memory, pinned from CUDA)
        self.store = MemorySnapshotStore(keep=keep, max_bytes=max_bytes)
        #: their copies on disk, when a directory is set
        self.disk = None if directory is None else DiskSnapshotStore(directory, keep=keep, run=True)
        #: snapshot step -> the loss level it was taken at (the newest ``keep``)
        self.levels: dict[int, float | None] = {}
        #: snapshot step -> the largest share of a layer's units dead then (the newest
        #: ``keep``; :mod:`gradguard.units`)
        self.dying: dict[int, float | None] = {}
        self._writer: SnapshotWriter | None = None
        self._write_warned = False
        #: the snapshot (and the restores count then) whose weights have had no finite
        #: gradients yet, and the snapshots whose weights had: only their restore tests
        #: the batches
        self._verify: tuple[int, int] | None = None
        self._verified: set[int] = set()
        #: the first step whose gradients the weights a rollback restored give (a later
        #: one when that step's update was voided); None once judged
        self._restored_at: int | None = None
        #: the snapshot step the last rollback restored, and the first step on its weights
        self.restored_from = -1
        self.restored_step: int | None = None
        #: the store index of the snapshot at the fresh model's level that :meth:`back`
        #: last passed over for the weights before the first step (None: it did not)
        self.passed_over: int | None = None

    def keep(self, guard: Guard, step: int, *, disk: bool = True,
             fresh_verdict: bool = False) -> bool:
        """Snapshot the guard's model, optimizer and clip policy at ``step`` (False, keeping
        nothing, when a value is NaN/Inf; ``fresh_verdict``: see
        :func:`.actions.snapshot_state`)."""
        state = actions.snapshot_state(guard, step, fresh_verdict=fresh_verdict)
        if state is None:
            return False
        busy = self._writer.busy if self._writer is not None else set()
        self.store.save(step, state, busy=busy)
        if self.disk is not None and disk:
            if self._writer is None:
                self._writer = SnapshotWriter(self.disk)
                if (note := self.disk.foreign_note()) is not None:
                    warnings.warn(f"gradguard: Recovery: {note}", GradGuardWarning,
                                  stacklevel=caller_stacklevel())
            self._warn_write_error()
            self._writer.submit(step, self.store.load(-1))
        return True

    def kept(self, step: int, restores: int) -> None:
        """The snapshot of ``step`` was kept (``restores``: the weights restored so far):
        its weights' first gradients are to come."""
        self._verify = (step, restores)
        self._verified &= set(self.store.steps())

    def back(self, back: int, fresh: float | None = None) -> int:
        """How many snapshots before the newest in memory a rollback goes to: one further
        than ``back`` when the newest one's weights never had finite gradients (every step
        since it was skipped: restoring them restores the trouble's own weights, a no-op
        for a streak of skipped steps) and an older one is kept; and the weights before
        the first step, while kept, instead of a snapshot taken at the fresh model's level
        (at least ``AT_FRESH`` x ``fresh``, the median of the run's first losses): such a
        snapshot learnt nothing they lack, and the LR that blew up later may have damaged
        it already (lab T7: the snapshot of step 49, at 2.23 against a fresh 2.22, taken
        at an LR ten times too high, trained to 0.62 at the LR the ladder settled on; the
        weights before the first step to 0.0003). ``fresh`` None: no such test (the loss
        level is no evidence, or on other batches than the fresh model's). Nor to a
        snapshot taken with ``DYING / 2`` of a layer's units dead while an older one is
        kept: the weights from before the units died (:mod:`gradguard.units`)."""
        steps = self.store.steps()
        n = back + 1 if len(steps) > 1 and steps[-1] not in self._verified else back
        self.passed_over = None
        if fresh is not None and len(steps) > 1 and steps[0] == -1:
            level = self.levels.get(steps[max(0, len(steps) - 1 - n)])
            if level is not None and level >= AT_FRESH * fresh:
                self.passed_over = max(0, len(steps) - 1 - n) - len(steps)
                return len(steps) - 1
        while n < len(steps) - 1 and (self.dying.get(steps[len(steps) - 1 - n]) or 0.0) >= DYING / 2:
            n += 1
        return n

    def restored(self, snapshot: int, step: int) -> None:
        """A rollback restored the snapshot of ``snapshot`` before step ``step``: that
        step's verdict tests the batches when the weights had finite gradients."""
        self._restored_at = step if snapshot in self._verified else None
        self.restored_from, self.restored_step = snapshot, step

    def tested(self, step: int, *, skipped: bool, voided: bool, restores: int) -> bool:
        """Hear step ``step``'s outcome (``skipped``: no update; ``voided``: its update
        undone, its gradients those of weights a restore replaced). True when it is
        the first step on the weights a rollback restored, those having had finite
        gradients: its verdict is a test of the batches."""
        if self._verify is not None and step > self._verify[0] and not (skipped or voided):
            # the first step taken since the snapshot: its gradients were the snapshot's
            # weights' (the steps between were skipped), unless a restore replaced them
            if self._verify[1] == restores:
                self._verified.add(self._verify[0])
            self._verify = None
        first = self._restored_at is not None and step >= self._restored_at and not voided
        if first:
            self._restored_at = None
        return first

    def tests_state(self) -> dict[str, Any]:
        """The verification state, for :meth:`Recovery.state_dict`."""
        return {"restored": [self._restored_at, self.restored_from, self.restored_step],
                "verify": None if self._verify is None else list(self._verify),
                "verified": sorted(self._verified)}

    def load_tests_state(self, restored: Any, verify: Any, verified: Any) -> None:
        """Restore :meth:`tests_state` (missing: a checkpoint from before it existed)."""
        values = list(restored or (None, -1))
        values += [None] * (3 - len(values))  # [restored_at, restored_from] in older states
        self._restored_at, self.restored_from, self.restored_step = values
        self._verify = None if verify is None else (int(verify[0]), int(verify[1]))
        self._verified = set(verified)

    def remember(self, step: int, level: float | None, dying: float | None = None) -> None:
        """The loss level the snapshot of ``step`` was taken at, and the share of a layer's
        units dead then (the newest ``keep`` kept: no store holds more)."""
        self.levels = dict(sorted({**self.levels, step: level}.items())[-self.keep_n:])
        self.dying = dict(sorted({**self.dying, step: dying}.items())[-self.keep_n:])

    def level(self, initial: float | None) -> float | None:
        """The loss level the snapshot a rollback would load was taken at (the newest in
        memory, else on disk after a resume; None: unknown). The weights before the first
        step are at the fresh model's level, ``initial`` (the median of its first losses)."""
        steps = self.store.steps()
        if not steps and self.disk is not None:
            steps = self.disk.steps()
        if not steps:
            return None
        return initial if steps[-1] == -1 else self.levels.get(steps[-1])

    def newest_level(self, initial: float | None) -> float | None:
        """The loss level of the newest snapshot taken, in memory or not (``initial``, the
        fresh model's, when only the weights before the first step were)."""
        return self.levels[max(self.levels)] if self.levels else initial

    def warn_left_behind(self, why: str, *, fresh: bool, also: str | None = None) -> None:
        """After a resume (``Recovery.load_state_dict``) whose weights are no stand-in for a
        snapshot (``why``: the checkpoint was taken so): a checkpoint holds no snapshot, so
        say so when the run resumed had some in memory only (``fresh``: it had the weights
        before its first step); a rollback finds nothing until the resumed run takes one.
        ``also``: what else the resume lost, said in the same warning."""
        if self.disk is not None or len(self.store):
            return
        kept = [*(["the weights before its first step"] if fresh or not self.levels else []),
                *([f"step(s) {', '.join(str(s) for s in sorted(self.levels))}"]
                  if self.levels else [])]
        warnings.warn(
            f"gradguard: Recovery.load_state_dict: the checkpoint was taken {why}, so its "
            f"weights are kept as no snapshot, and the snapshots from before it "
            f"({' and '.join(kept)}) were kept in memory only, not in the checkpoint: until "
            "the resumed run takes one at a healthy flush, a rollback has nothing to "
            "restore and backs off instead. Recovery(snapshot_dir=...) writes them to "
            "disk, where a resumed run finds them." + ("" if also is None else f" Also: {also}"),
            GradGuardWarning, stacklevel=caller_stacklevel())

    def load(self, back: int) -> dict[str, Any] | None:
        """A copy of a good snapshot: from memory, else (after a resume) from disk. The
        weights before the first step, when :meth:`back` chose them over a snapshot at the
        fresh model's level, come with that snapshot's gradient statistics (the clip
        policy's, the spike verdict's) in place of the fresh ones: its weights are at the
        fresh level too, so the statistics describe weights like those restored, and
        they have seen the run's steps, where fresh ones start a warm-up that a stretch of
        bad batches right after the restore passes unskipped (found by a stranger: a
        gradient storm x100 from step 100 of a regression, rolled back at 105 to the
        weights before the first step, with fresh statistics clipped none of the storm's
        remaining steps; Adam's second moments learnt its gradients and the model stayed
        where it was, 2.5x its healthy twin)."""
        snap = self.store.load_good(back=back)
        passed, self.passed_over = self.passed_over, None
        if snap is not None and passed is not None and int(snap["step"]) < 0:
            source = self.store.load(passed)
            snap.update(copy_state({k: source.get(k) for k in ("clip", "verdict")}))
        if snap is None and self.disk is not None:
            self.wait()
            snap = self.disk.load_good(back=back)
        return snap

    def relayout(self, guard: Guard, old: tuple[int, ...] | None) -> None:
        """The optimizer's parameter groups changed from sizes ``old``. When the old groups
        are the first ones still (groups added after them), the snapshots in memory stay:
        their optimizer state is of parameters that keep their places, and loads into the
        new groups, the added ones with no state, as at their first step; their gradient
        statistics (the clip policy's, the verdict's) are of the old set's norm and are
        left out, the ones learnt since kept at a restore. Found by a stranger: a decoder
        trained first, its encoder added at 10x its LR, had its snapshots dropped; with
        nothing to restore, three back-offs could not revive the encoder's dead units and
        the run stopped at chance, 12-13x its twin. Else (and on disk) they are dropped."""
        from .actions import local_optimizer  # (actions imports this module)

        new = optimizer_layout(guard.optimizer)
        if old is None or len(new) <= len(old) or new[:len(old)] != old or not len(self.store):
            self.clear()
            return
        groups = local_optimizer(guard.optimizer).state_dict()["param_groups"]
        self.store.remap(lambda snap: {**snap, "clip": None, "verdict": None, "optimizer": {
            "state": snap["optimizer"]["state"], "param_groups": copy.deepcopy(groups)}})
        if self.disk is not None:
            self.wait()
            self.disk.clear()

    def clear(self) -> None:
        """Drop every snapshot (the optimizer's parameter groups changed)."""
        self.store.clear()
        if self.disk is not None:
            self.wait()
            self.disk.clear()

    def wait(self) -> None:
        """Block until the snapshots handed to the writer are on disk."""
        if self._writer is not None:
            self._writer.wait()
            self._warn_write_error()

    def close(self) -> None:
        """Finish the disk writes and stop the writer."""
        if self._writer is not None:
            self._writer.close()
            self._warn_write_error()  # a write that failed last: warned before it goes
            self._writer = None

    def _warn_write_error(self) -> None:
        err = self._writer.error if self._writer is not None else None
        if err is not None and not self._write_warned and self.disk is not None:
            self._write_warned = True
            warnings.warn(
                f"gradguard: writing a snapshot to {self.disk.directory} failed ({err}); the "
                "snapshot files written before it are left as they are (if they are still "
                "there: a directory deleted took them) and rollbacks use the in-memory "
                "snapshots; training goes on", GradGuardWarning, stacklevel=caller_stacklevel())
