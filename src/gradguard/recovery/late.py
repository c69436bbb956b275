"""Skip flags that stayed on the device, heard by the host as soon as the device has them.

A fused optimizer (and a ``GradScaler``) skips a bad step on the device, through
``found_inf``: the host never waits for the flag. Left at that, the ladder would hear of
the skip only at the next flush, up to ``every`` steps later, and a first update that
wrecked the weights (every later step skipped for its loss) would cost those steps before
the rollback. :class:`LateFlags` copies each step's flag to host memory without waiting
(pinned memory and a CUDA event on a GPU; on the CPU the copy is done when it returns)
and hands over the flags whose copy has completed, oldest first: the ladder then answers
a skip on the next step or so instead of at the flush, still with no host sync. Flags not
heard by the flush are left to it (the flush replays the steps the ladder has not heard);
a flag is never read before its copy completed.

Under ``torch.distributed`` the flags wait for the flush (:func:`enabled`): the ladder must
act at the same step on every rank, and a GPU's copies complete at different times on
different ranks; the flush is where the ranks agree on one window (a rank's own loss can
tell a routine loss-scale overflow from trouble differently).
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

import torch
from torch import Tensor

from .. import distributed

#: Flags in flight at most (a device this far behind the host: the rest wait for the flush).
SLOTS = 8


def enabled() -> bool:
    """Whether flags may be heard before the flush: in a single-process run."""
    return distributed.world_size() <= 1


class LateFlags:
    """A ring of host copies of per-step device flags (see the module docstring).

    Example:
        >>> import torch
        >>> from gradguard.recovery.late import LateFlags
        >>> late = LateFlags()
        >>> late.push(7, torch.tensor(3, dtype=torch.uint8), extra="norms of step 7")
        >>> late.heard()
        [(7, 3, 'norms of step 7')]
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[int, tuple[Tensor, ctypes.c_uint8], Any, Any]] = deque()
        self._free: list[tuple[Tensor, ctypes.c_uint8]] = []
        self._device: torch.device | None = None
        self.full = False  # a flag was not taken: the rest wait for the flush

    def push(self, step: int, flag: Tensor, extra: Any = None) -> None:
        """Copy ``flag`` (a uint8 scalar on the device) to the host, without waiting."""
        if self.full:
            return
        if len(self._pending) >= SLOTS:
            self.full = True  # later flags may not be heard before this one
            return
        if self._device != flag.device:
            self.clear()
            self._free = []
            self._device = flag.device
        if self._free:
            slot = self._free.pop()
        else:
            buf = torch.empty(1, dtype=torch.uint8, pin_memory=flag.is_cuda)
            # its byte, read once the copy completed: host memory, no device access
            slot = (buf, ctypes.c_uint8.from_address(buf.data_ptr()))
        slot[0].copy_(flag.reshape(1), non_blocking=flag.is_cuda)
        self._pending.append((step, slot, self._event(flag), extra))

    @staticmethod
    def _event(flag: Tensor) -> Any:
        """Something whose ``query()`` says the copy completed; None: it has (the CPU)."""
        if not flag.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def heard(self) -> list[tuple[int, int, Any]]:
        """``(step, flag, extra)`` for each flag whose copy has completed, oldest first
        (stopping at the first still in flight)."""
        out: list[tuple[int, int, Any]] = []
        while self._pending:
            step, slot, event, extra = self._pending[0]
            if event is not None and not event.query():
                break
            self._pending.popleft()
            out.append((step, slot[1].value, extra))  # its copy has completed
            self._free.append(slot)
        return out

    def clear(self) -> None:
        """The flush hears what is left."""
        while self._pending:
            self._free.append(self._pending.popleft()[1])
        self.full = False
