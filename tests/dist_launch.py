"""Launching gloo workers on loopback for the distributed tests, and what they share.

``launch`` starts ``python SCRIPT SCENARIO OUT`` in ``world`` processes with torchrun's
environment variables under a hard timeout, so a rank that hangs in a collective fails
the test instead of blocking the suite; each worker writes ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: What a rank prints when gloo's teardown aborts it (SIGABRT) after its work was done: seen
#: in CI under load, in scripts with and without gradguard (a plain FSDP2 script under
#: torchrun). A job that fails so is run once more, not failed on the exit of a process
#: that did its part; a real failure fails the second run too.
GLOO_TEARDOWN = "terminate called without an active exception"


def torchrun_job(cmd: list[str], *, cwd: Path, clean: tuple[str, ...] = (),
                 **kw: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of a torchrun job, output captured, run once more when a rank
    aborted in gloo's teardown (:data:`GLOO_TEARDOWN`); ``clean``: what the first run wrote
    under ``cwd``, removed before the second."""
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if r.returncode != 0 and GLOO_TEARDOWN in r.stdout + r.stderr:
        for name in clean:
            shutil.rmtree(Path(cwd) / name, ignore_errors=True)
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    return r


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    script: str, scenario: str, out: Path, *, world: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Run ``scenario`` of ``script`` on ``world`` ranks; fail (not hang) past ``timeout_s``
    (once more when a rank aborted in gloo's teardown, :data:`GLOO_TEARDOWN`)."""
    procs, logs = _start(script, scenario, out, world, timeout_s)
    if any(p.returncode != 0 and GLOO_TEARDOWN in log for p, log in zip(procs, logs)) and all(
            p.returncode == 0 or GLOO_TEARDOWN in log for p, log in zip(procs, logs)):
        empty_dir(out)  # the first run's files (append-only event files would hold it twice)
        procs, logs = _start(script, scenario, out, world, timeout_s)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(f"{scenario} rank {r}:\n{_tail(logs[r])}" for r in failed)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def empty_dir(out: Path) -> None:
    """Remove what a run wrote under ``out``, keeping ``out``."""
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _start(script: str, scenario: str, out: Path, world: int,
           timeout_s: float) -> tuple[list[subprocess.Popen[str]], list[str]]:
    """Start the ranks and wait for them (fail past ``timeout_s``)."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, script, scenario, str(out)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout_s)
            logs.append(stdout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: a rank hung (no exit within {timeout_s}s)")
    return procs, logs


def _tail(log: str) -> str:
    """The end of a rank's log, and where its traceback starts (a DTensor error message can
    be long enough to push the traceback out of the tail)."""
    start = log.find("Traceback")
    head = log[start:start + 3000] + "\n...\n" if start >= 0 and start < len(log) - 3000 else ""
    return head + log[-3000:]


def run_worker(main: Callable[[int, str], dict[str, Any]], out: str, timeout_s: float) -> None:
    """In a launched process: init gloo, run ``main(rank, out)``, save what it returns."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(main(rank, out), os.path.join(out, f"rank{rank}.pt"))
        # every rank done before any tears gloo down: a rank that exits while its peer
        # still closes its own group can die in gloo's destructor ("terminate called
        # without an active exception", rank 0 of the DDP scenario, 2 of 9 full suites on
        # a loaded 2-core machine, after its results were saved)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class CallCounter:
    """Counts, inside a block, the calls of some attributes of ``target`` (patched)."""

    def __init__(self, target: Any, names: tuple[str, ...]) -> None:
        self.target, self.names = target, names

    def __enter__(self) -> CallCounter:
        self.counts = {n: 0 for n in self.names}
        self._orig = {n: getattr(self.target, n) for n in self.names}
        for n in self.names:
            setattr(self.target, n, self._wrap(n, self._orig[n]))
        return self

    def _wrap(self, name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            self.counts[name] += 1
            return fn(*a, **k)

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for n, fn in self._orig.items():
            setattr(self.target, n, fn)


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce_scatter")
HOST_SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


def CollectiveCounter() -> CallCounter:
    """The torch.distributed collectives gradguard issues inside a block."""
    import torch.distributed as dist

    return CallCounter(dist, COLLECTIVES)


class SyncCounter(CallCounter):
    """The Tensor methods that make the host wait for the device, inside a block, on the
    path a GPU takes: the CPU-only read of a clip coefficient is turned off inside it, as
    the sync_counter fixture does (tests/conftest.py)."""

    def __init__(self) -> None:
        super().__init__(torch.Tensor, HOST_SYNCS)

    def __enter__(self) -> SyncCounter:
        from gradguard import measure

        self._read = measure.READ_CPU_COEFFICIENT
        measure.READ_CPU_COEFFICIENT = False
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        from gradguard import measure

        super().__exit__(*exc)
        measure.READ_CPU_COEFFICIENT = self._read


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), a copy of a plain tensor."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else t).detach().clone()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN equal to NaN."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def event(res: dict[str, Any], kind: str, step: int) -> dict[str, Any]:
    found = [e for e in res["events"] if e["kind"] == kind and e["step"] == step]
    assert len(found) == 1, f"expected one {kind} event at step {step}: {res['events']}"
    return found[0]


def guard_results(
    guard: Any, model: torch.nn.Module, norms: list[torch.Tensor], coefs: list[torch.Tensor]
) -> dict[str, Any]:
    """What the tests compare after a guarded run: per-step total norms, the clip
    coefficients of every flushed window, full parameters, skips, events, the last
    window, and the clip policy's state."""
    window = guard.last_window
    assert window is not None
    return {
        "norms": torch.stack(norms),
        "clip_coef": torch.cat(coefs),
        "params": {n: full(p) for n, p in model.named_parameters()},
        "skipped": guard.skipped_steps,
        "events": [e.to_json() for e in guard.events],
        "window": {
            "loss": window.loss,
            "total_norm": window.total_norm,
            "names": list(window.names),
            "layers": list(window.layers),
            "layer_norms": window.layer_norms(),
            "weight_norms": window.weight_norms,
            "update_norms": window.update_norms,
        },
        "clip_state": guard.clip.state_dict(),
    }
