"""T6 — tiny transformer LR sensitivity with and without qk-LayerNorm (Wortsman et al.
2023, "Small-scale proxies for large-scale Transformer training instabilities", Sec. 3.1).

A 2-layer character-level transformer is trained on text shipped with Python (stdlib
docstrings) over a sweep of learning rates. Without qk-LayerNorm the attention logits grow
at high LR and the loss degrades; normalising queries and keys bounds the logits.
LR sensitivity is the paper's ``E_lr[min(loss(lr), loss_0) - min_lr loss(lr)]``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ._common import (
    Result,
    Trace,
    fit,
    guard_record,
    guarded_fit,
    healthy_guard_record,
    pyplot,
    save,
)

D, HEADS, LAYERS, CTX, BATCH, WARMUP = 64, 4, 2, 32, 16, 20


def corpus() -> str:
    """Docstrings of a few stdlib modules: text that ships with every Python."""
    import argparse
    import collections
    import functools
    import json
    import pathlib
    import textwrap

    mods = (argparse, collections, functools, json, pathlib, textwrap)
    return "\n".join((m.__doc__ or "") for m in mods) * 2


class Block(nn.Module):
    def __init__(self, qk_ln: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.qk_ln = qk_ln
        self.q_ln, self.k_ln = nn.LayerNorm(D // HEADS), nn.LayerNorm(D // HEADS)
        self.peak = torch.zeros(())  # not a parameter or buffer: measurement only

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        if self.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        # device-side record of the largest attention logit (read once after training)
        self.peak = torch.maximum(self.peak, logits.detach().abs().amax())
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, D)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, qk_ln: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, D)
        self.pos = nn.Parameter(torch.zeros(CTX, D))
        self.blocks = nn.ModuleList(Block(qk_ln) for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    def max_logit(self) -> float:
        return max(float(b.peak) for b in self.blocks if isinstance(b, Block))


def run(out: Path, fast: bool = False) -> Result:
    res = Result("T6", "Tiny transformer LR sensitivity with and without qk-LayerNorm", fast)
    lrs = [1e-2, 3e-1] if fast else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    steps = 40 if fast else 150
    text = corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    vocab = len(chars)
    ce = nn.CrossEntropyLoss()

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return ce(logits.reshape(-1, vocab), y.reshape(-1))

    def batches(seed: int):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(seed)

        def get(step: int) -> tuple[Tensor, Tensor]:
            i = torch.randint(0, data.numel() - CTX - 1, (BATCH,), generator=g)
            idx = i[:, None] + torch.arange(CTX + 1)
            chunk = data[idx]
            return chunk[:, :-1], chunk[:, 1:]

        return get

    def make(qk: bool, lr: float) -> tuple[TinyLM, torch.optim.Optimizer, object]:
        m = TinyLM(vocab, qk)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
        return m, opt, sched

    def guarded_twin(m: TinyLM, lr: float) -> Trace:
        """The healthy configuration (qk-LN) from the same initial weights, guarded."""
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
        get = batches(0)

        def fn(step: int) -> tuple[Tensor, Tensor]:
            if step:
                sched.step()
            return get(step)  # type: ignore[no-any-return]

        return guarded_fit(m, opt, fn, loss_fn, steps, stop_on_nan=False)[0]

    twin: TinyLM | None = None
    final: dict[str, dict[str, float]] = {"no_qk_ln": {}, "qk_ln": {}}
    logit: dict[str, dict[str, float]] = {"no_qk_ln": {}, "qk_ln": {}}
    traces: dict[str, Trace] = {}
    for qk in (False, True):
        key = "qk_ln" if qk else "no_qk_ln"
        for lr in lrs:
            m, opt, sched = make(qk, lr)
            if qk and lr == lrs[-1]:
                twin = copy.deepcopy(m)  # the healthy config's initial weights
            get = batches(0)

            def fn(step: int, get=get, sched=sched) -> tuple[Tensor, Tensor]:
                if step:
                    sched.step()  # type: ignore[attr-defined]
                return get(step)  # type: ignore[no-any-return]

            tr = fit(m, opt, fn, loss_fn, steps, stop_on_nan=False)
            final[key][f"{lr:g}"] = tr.final_loss()
            logit[key][f"{lr:g}"] = m.max_logit()
            traces[f"{key} lr={lr:g}"] = tr
    loss0 = math.log(vocab)

    def sensitivity(d: dict[str, float]) -> float:
        vals = [v if math.isfinite(v) else math.inf for v in d.values()]
        best = min(vals)
        return sum(min(v, loss0) - best for v in vals) / len(vals)

    sens = {k: sensitivity(v) for k, v in final.items()}
    top = f"{lrs[-1]:g}"
    res.figures = {
        "final_loss": final,
        "max_attention_logit": logit,
        "lr_sensitivity": sens,
        "loss_at_init": loss0,
        "config": {"steps": steps, "lrs": lrs, "d_model": D, "layers": LAYERS, "heads": HEADS},
    }
    res.claim(
        "qk_ln_less_sensitive",
        "qk-LayerNorm lowers LR sensitivity",
        measured=sens,
        reference={"no_qk_ln": 2.31, "qk_ln": 0.07},
        criterion="sensitivity without > " + ("with" if fast else "2 x with"),
        passed=sens["no_qk_ln"] > (1.0 if fast else 2.0) * sens["qk_ln"],
    )
    res.claim(
        "logits_grow",
        f"attention logits grow at high LR without qk-LN (lr {top})",
        measured={"no_qk_ln": logit["no_qk_ln"][top], "qk_ln": logit["qk_ln"][top]},
        reference={"no_qk_ln": ">1e3"},
        criterion="no-qk-LN max logit > 10 x qk-LN's",
        passed=logit["no_qk_ln"][top] > 10 * logit["qk_ln"][top],
    )
    m, opt, sched = make(False, lrs[-1])
    get = batches(0)

    def gfn(step: int) -> tuple[Tensor, Tensor]:
        if step:
            sched.step()  # type: ignore[attr-defined]
        return get(step)  # type: ignore[no-any-return]

    g_tr, desc = guarded_fit(m, opt, gfn, loss_fn, steps, stop_on_nan=False)
    res.guard = guard_record(g_tr, final["qk_ln"][top], desc, in_reach=True)
    res.guard["lr"] = lrs[-1]
    assert twin is not None
    res.guard["healthy_guarded"] = healthy_guard_record(
        guarded_twin(twin, lrs[-1]), traces[f"qk_ln lr={lrs[-1]:g}"])
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for key, lab in (("no_qk_ln", "no qk-LN"), ("qk_ln", "qk-LN")):
        a1.plot(lrs, [final[key][f"{lr:g}"] for lr in lrs], marker="o", label=lab)
        a2.plot(lrs, [logit[key][f"{lr:g}"] for lr in lrs], marker="o", label=lab)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
    a1.set_ylabel("final loss")
    a2.set_yscale("log")
    a2.set_ylabel("max |attention logit|")
    save(fig, out, "lr_sweep.png", res)
    return res
