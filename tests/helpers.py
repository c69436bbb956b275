"""Small models and loops shared by the tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def mlp(
    d_in: int = 8, width: int = 16, depth: int = 3, d_out: int = 1, seed: int = 0
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def batches(
    n: int, d_in: int = 8, bs: int = 16, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, d_in, generator=g)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


def quadrant_net(seed: int = 0, hidden: int = 64) -> nn.Sequential:
    """16 features -> ``hidden`` ReLU units -> 4 classes (:func:`quadrant_batch`)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def quadrant_loss(model: nn.Module, gen: torch.Generator, bs: int = 32) -> torch.Tensor:
    """The cross-entropy of ``model`` on a fresh batch of 16 Gaussian features whose label
    is the first of the first four that is positive (0 when none is)."""
    x = torch.randn(bs, 16, generator=gen)
    return nn.functional.cross_entropy(model(x), (x[:, :4] > 0).long().argmax(1))


def set_grads(params: list[torch.Tensor], seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def assert_same_tree(a: object, b: object, path: str = "") -> None:
    """Bit-equal nested dicts/lists/tuples of tensors and plain values (optimizer state)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path  # NaN == NaN here


def assert_same_run(model_a: nn.Module, opt_a: torch.optim.Optimizer,
                    model_b: nn.Module, opt_b: torch.optim.Optimizer) -> None:
    """Same finite parameters and same optimizer state, bit for bit."""
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    assert_same_tree(opt_a.state_dict()["state"], opt_b.state_dict()["state"], "state")


def guarded_steps(guard, model: nn.Module, opt: torch.optim.Optimizer, n: int, *,
                  nan_steps=(), start: int = 0, seed: int = 1) -> None:
    """``n`` MSE steps on :func:`batches` through ``guard``; at the steps in ``nan_steps``
    (numbered from ``start``) the first layer's gradient gets a NaN."""
    for step, (x, y) in enumerate(batches(n, seed=seed), start=start):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        if step in nan_steps:
            model[0].weight.grad[0, 0] = math.nan
        guard.step(loss)
        opt.zero_grad()


def recording_guard(model: nn.Module, opt: torch.optim.Optimizer, rec: object, *, every: int,
                    run_dir: object = None, hooked: bool = False) -> tuple[object, list[float]]:
    """A guard with ``rec`` (and a JsonlSink in ``run_dir``); ``hooked``: the guard runs in
    the optimizer's pre-step hook, as a trainer or ``gradguard run`` drives it (the loop
    then steps the optimizer itself). Also the LR each optimizer step used (a pre-hook
    registered after the guard's)."""
    import gradguard as gg

    sinks = [gg.JsonlSink(run_dir)] if run_dir is not None else []
    if hooked:
        from gradguard.integrations._hooked import hooked_guard
        guard = hooked_guard(model, opt, gg.GuardConfig(every=every, recovery=rec, sinks=sinks))
    else:
        guard = gg.Guard(model, opt, recovery=rec, every=every, sinks=sinks)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    return guard, used


class Tokens(torch.utils.data.Dataset):
    """``n`` sequences of 16 random token ids below 128, each its own labels (a causal LM's
    batch for the Hugging Face ``Trainer``), the same for the same index."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def gaussian_nll_run(steps: int, make_guard=None, fault: range = range(0)
                     ) -> tuple[float, list[float], object]:
    """A heteroscedastic regression (``nn.GaussianNLLLoss``, Adam 1e-3, a 2-layer tanh MLP
    predicting a mean and a variance): its loss goes below zero as it learns the variances,
    and its gradient grows like one over them. ``make_guard(model, opt)``: the guard (None:
    unguarded); ``fault``: the steps whose targets are x1e3. Returns the held-out NLL, the
    training losses and the guard (closed)."""
    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    w = torch.randn(8)
    y = (x @ w).sin() + 0.05 * (1 + x[:, 0].abs()) * torch.randn(4000)
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    guard = None if make_guard is None else make_guard(net, opt)
    crit = nn.GaussianNLLLoss()
    losses = []
    for t in range(steps):
        i = torch.randint(0, 3000, (128,))
        out = net(x[i])
        target = y[i] * (1e3 if t in fault else 1.0)
        loss = crit(out[:, 0], target, nn.functional.softplus(out[:, 1]) + 1e-6)
        opt.zero_grad()
        loss.backward()
        guard.step(loss) if guard is not None else opt.step()
        losses.append(loss.item())
    if guard is not None:
        guard.close()
    with torch.no_grad():
        out = net(x[3000:])
        held = crit(out[:, 0], y[3000:], nn.functional.softplus(out[:, 1]) + 1e-6).item()
    return held, losses, guard


def outlier_regression_run(steps: int, make_guard=None, seed: int = 2
                           ) -> tuple[float, object]:
    """A regression whose training targets hold 2% gross outliers (x50 noise), batches of
    16 (one in four holds one), a SiLU MLP on Adam 1e-3: a heavy-tailed loss, healthy.
    ``make_guard(model, opt)``: the guard (None: unguarded). Returns the held-out MSE on
    clean targets and the guard (closed)."""
    torch.manual_seed(seed)
    w = torch.randn(20, 1)
    x = torch.randn(20000, 20)
    y = torch.sin(x @ w / 3) * 3 + 0.1 * torch.randn(20000, 1)
    out = torch.rand(20000) < 0.02
    y[out] += 50 * torch.randn(int(out.sum()), 1)
    xv = torch.randn(4000, 20)
    yv = torch.sin(xv @ w / 3) * 3
    net = nn.Sequential(nn.Linear(20, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                        nn.Linear(128, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    guard = None if make_guard is None else make_guard(net, opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, 20000, (16,), generator=g)
        loss = (net(x[i]) - y[i]).pow(2).mean()
        loss.backward()
        guard.step(loss) if guard is not None else opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return (net(xv) - yv).pow(2).mean().item(), guard


def ema_run(mode: str):
    """A digits MLP on Adam with an EMA of its weights (``AveragedModel``, decay 0.99)
    updated after each step, and an LR x300 for steps 150-152 (a user's bad schedule): the
    updates wreck the weights without a NaN, and the ladder rolls back. ``mode``: ``"also"``
    (the EMA given as ``Recovery(also=...)``), ``"plain"`` (not given) or ``"run"`` (the
    loop steps the optimizer itself, under a ``gradguard run`` session). Returns the
    rollback event, the first layer's weights and their EMA after each step, the EMA's
    held-out loss and the guard."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    import gradguard as gg
    from gradguard.integrations.run import ZeroCodeSession
    from gradguard.lab._common import minibatches, split_digits

    x_train, y_train, x_val, y_val = split_digits()
    batch = minibatches(x_train, y_train, 32, seed=0)
    session = ZeroCodeSession(None, recovery=gg.Recovery(), report=False) if mode == "run" else None
    if session is not None:
        session.install()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = None if session is not None else gg.Guard(
        model, opt, clip=gg.ZClip(), recovery=gg.Recovery(also=ema) if mode == "also" else gg.Recovery())
    weights, averages = {}, {}
    try:
        for step in range(400):
            opt.param_groups[0]["lr"] = 0.3 if 150 <= step < 153 else 1e-3
            x, y = batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if guard is not None:
                guard.step(loss.detach())
            else:
                opt.step()
            ema.update_parameters(model)
            weights[step] = model[0].weight.detach().clone()
            averages[step] = ema.module[0].weight.detach().clone()
    finally:
        if session is not None:
            guard = session.units[0].guard
            session.close()
        else:
            guard.close()
    with torch.no_grad():
        held_out = float(nn.functional.cross_entropy(ema(x_val), y_val))
    [rollback] = [e for e in guard.events if e.kind == "rollback"]
    return rollback, weights, averages, held_out, guard


class ScheduleFreeSGD(torch.optim.Optimizer):
    """Schedule-free SGD (Defazio et al. 2024, the ``schedulefree`` package's train-mode
    form), written out as a third-party optimizer: its parameters hold ``y``, the point
    the gradient is taken at; its state holds ``z``, the SGD sequence (weights, not a
    moment); and each param group holds ``k``, ``lr_max`` and ``weight_sum``, which weigh
    each new ``z`` in the running average ``x`` (training state, not hyperparameters)."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, warmup_steps: int = 10):
        super().__init__(params, dict(lr=lr, momentum=momentum, warmup_steps=warmup_steps,
                                      k=0, lr_max=-1.0, weight_sum=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            k = group["k"]
            lr = group["lr"] * min(1.0, (k + 1) / group["warmup_steps"])
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** 2
            group["weight_sum"] = weight_sum = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum else 0.0
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                z = state["z"]
                p.lerp_(z, ckp1)
                p.add_(p.grad, alpha=lr * (beta * (1 - ckp1) - 1))
                z.sub_(p.grad, alpha=lr)
            group["k"] = k + 1


def train_loop(model, opt, guard, batch, steps: int, loss_fn=None) -> None:
    """The user's loop: ``batch(step)`` gives ``(x, y)``; ``loss_fn`` (default cross-entropy)
    of ``model(x)`` and ``y``; backward, ``guard.step(loss)`` (or ``opt.step()`` when
    ``guard`` is None), ``zero_grad``; the guard closed at the end."""
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    for step in range(steps):
        x, y = batch(step)
        loss = loss_fn(model(x), y)
        loss.backward()
        guard.step(loss) if guard is not None else opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()


def recall_data(seed: int, n: int, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``steps`` one-hot tokens (4 kinds); the target is the first token."""
    tok = torch.randint(0, 4, (n, steps), generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(tok, 4).float(), tok[:, 0]


class GruRecall(nn.Module):
    """A GRU (4 -> 64) and a linear head on its last output: recalls the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 64, batch_first=True), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def digits_epochs(seed: int, steps: int, bs: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """The digits (x / 16), split 1400 / 397 by a fixed permutation, and ``batch(step)``
    over ``steps`` steps of shuffled epochs (seed ``seed``): train x, y, held-out x, y,
    batch."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    xtr, ytr, xte, yte = x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]
    g = torch.Generator().manual_seed(seed)
    per = 1400 // bs
    order = torch.cat([torch.randperm(1400, generator=g)[:per * bs]
                       for _ in range(steps // per + 1)])

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = order[step * bs:(step + 1) * bs]
        return xtr[i], ytr[i]

    return xtr, ytr, xte, yte, batch
