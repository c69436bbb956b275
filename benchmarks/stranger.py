"""Loops as a stranger writes them: the default guard on a digits MLP at an LR far too high,
in the training loops people run (a schedule, float64, bf16 autocast with a GradScaler,
fused Adam, AdamW with two param groups), against the same loop unguarded and its twin
at the right LR.

Run:  OMP_NUM_THREADS=1 python benchmarks/stranger.py [--quick] [--no-recur] [--out F]
Writes benchmarks/results/stranger.json (about 2 minutes).

The model and data are not the rescue suite's (benchmarks/rescue_cases.py): a GELU MLP
(64-256-256-10, PyTorch's init) on the digits scaled to [0, 1], batches of 64, 800 steps,
held-out loss on 397 digits no step trained on. Rows:

* ``loop_*``: Adam at 0.3 (300x) with a cosine schedule, seed 0, in five loops. The first
  update wrecks the model; the guard rolls back to the weights before it. With a fused
  optimizer or a GradScaler the skip flags stay on the device (:mod:`gradguard.recovery.late`).
* ``lightning``: the fused loop in a Lightning ``Trainer`` (the same batches, the schedule
  stepped per step), guarded by ``GradGuardCallback()`` and nothing else, seeds 0-2; its
  twin and the unguarded run are the same ``Trainer`` without the callback. The guard runs
  inside the optimizer step there (the closure), and hears a fused optimizer's skip flags
  one step later than the plain loop.
* ``const_lr0.1``: Adam at 0.1 (100x), constant, seeds 0-2: the loss is thrown up to 10x
  its best every couple of hundred steps and decays by itself (the LR probe's recurrence
  rule, :mod:`gradguard.recovery.probe`). ``--no-recur`` turns that rule off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg
from gradguard.recovery import probe

OUT = Path(__file__).parent / "results" / "stranger.json"
STEPS = 800
LOOPS = ("plain", "float64", "amp", "fused", "groups")
TRAINERS = ("lightning",)
COUNTED = ("skip", "lr_backoff", "rollback", "lr_settled", "abort")


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def run(loop: str, lr: float, seed: int, *, guarded: bool, schedule: str,
        steps: int) -> dict[str, Any]:
    """One run; its held-out loss and, guarded, what the guard did."""
    if loop in TRAINERS:
        return run_lightning(lr, seed, guarded=guarded, schedule=schedule, steps=steps)
    x, y, train, test = data()
    dtype = torch.float64 if loop == "float64" else torch.float32
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10)).to(dtype)
    if loop == "groups":
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim == 1]
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=loop == "fused")
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine"
             else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if loop == "amp" else None
    guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
    gen = torch.Generator().manual_seed(seed + 100)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
            loss = nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx])
        if scaler is not None:
            scaler.scale(loss).backward()
            if guard is not None:
                guard.step(loss, scaler=scaler)
            else:
                scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    if guard is not None:
        guard.close()
    events = None if guard is None else [e.to_json() for e in guard.events]
    return outcome(model, x[test].to(dtype), y[test], t0, events)


def outcome(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t0: float,
            events: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The held-out loss and, guarded, what the guard did (``events``: as in events.jsonl)."""
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 2)}
    with torch.no_grad():
        out["held_out"] = nn.functional.cross_entropy(model(x).float(), y).item()
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if events is not None:
        out["events"] = {k: sum(e["kind"] == k for e in events) for k in COUNTED}
        out["first_rollback"] = next((e["step"] for e in events if e["kind"] == "rollback"), None)
        out["lowered"] = [e["step"] for e in events
                          if e["kind"] == "lr_backoff" and e["data"].get("probe")]
    return out


def run_lightning(lr: float, seed: int, *, guarded: bool, schedule: str,
                  steps: int) -> dict[str, Any]:
    """The fused loop in a Lightning ``Trainer``: the same batches, one per step."""
    import tempfile
    import warnings

    import lightning.pytorch as pl

    from gradguard.integrations.lightning import GradGuardCallback

    x, y, train, test = data()
    gen = torch.Generator().manual_seed(seed + 100)
    batches = [train[torch.randint(0, len(train), (64,), generator=gen)] for _ in range(steps)]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                        nn.Linear(256, 10))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, idx: torch.Tensor, _: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(x[idx]), y[idx])

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=lr, fused=True)
            if schedule != "cosine":
                return opt
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        callback = GradGuardCallback(run_dir=Path(root, "gg"), report=False) if guarded else None
        warnings.simplefilter("ignore")  # Lightning's tips on workers and logging
        trainer = pl.Trainer(max_steps=steps, callbacks=[callback] if callback else [],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu",
                             default_root_dir=root)
        trainer.fit(Module(), torch.utils.data.DataLoader(batches, batch_size=None))
        events = None if callback is None else [
            json.loads(line) for line in Path(root, "gg", "events.jsonl").read_text().splitlines()]
        return outcome(net, x[test], y[test], t0, events)


def row(name: str, loop: str, lr: float, seed: int, schedule: str, steps: int) -> dict[str, Any]:
    twin = run(loop, 1e-3, seed, guarded=False, schedule=schedule, steps=steps)
    bare = run(loop, lr, seed, guarded=False, schedule=schedule, steps=steps)
    guarded = run(loop, lr, seed, guarded=True, schedule=schedule, steps=steps)
    r = {"name": name, "loop": loop, "lr": lr, "seed": seed, "schedule": schedule,
         "steps": steps, "twin": twin, "unguarded": bare, "guarded": guarded,
         "unguarded_over_twin": round(bare["held_out"] / twin["held_out"], 3),
         "guarded_over_twin": round(guarded["held_out"] / twin["held_out"], 3)}
    print(f"{name:18s} seed {seed}: unguarded {r['unguarded_over_twin']:.2f}x, guarded "
          f"{r['guarded_over_twin']:.2f}x its twin; {guarded['events']}", flush=True)
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 steps, one seed (a smoke run)")
    ap.add_argument("--no-recur", action="store_true", help="the LR probe's recurrence rule off")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.no_recur:
        probe.RECUR = -1
    steps = 100 if args.quick else STEPS
    t0 = time.perf_counter()
    rows = [row(f"loop_{loop}", loop, 0.3, 0, "cosine", steps) for loop in LOOPS]
    rows += [row(f"{t}_lr0.3", t, 0.3, s, "cosine", steps) for t in TRAINERS
             for s in ((0,) if args.quick else (0, 1, 2))]
    rows += [row("const_lr0.1", "plain", 0.1, s, "constant", steps)
             for s in ((0,) if args.quick else (0, 1, 2))]
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps,
           "no_recur": args.no_recur, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} in {res['seconds']} s")
    return res


if __name__ == "__main__":
    main()
