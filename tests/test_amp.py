"""Mixed precision: ``guard.step(loss, scaler=torch.amp.GradScaler(...))`` on CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from helpers import batches, mlp

FP16 = torch.float16


def amp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=FP16):
        out = model(x)
    return nn.functional.mse_loss(out.float(), y)


def make(opt_name: str = "adam", init_scale: float = 2.0**16, seed: int = 0):
    model = mlp(seed=seed)
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    elif opt_name == "adam_fused":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, torch.amp.GradScaler("cpu", init_scale=init_scale)


def reference_run(opt_name, n, *, max_norm=None, init_scale=2.0**16):
    """The torch recipe: [unscale_ + clip_grad_norm_ +] scaler.step + update."""
    model, opt, scaler = make(opt_name, init_scale)
    scales = []
    for x, y in batches(n):
        scaler.scale(amp_loss(model, x, y)).backward()
        if max_norm is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
    return model, opt, scales


def guarded_run(opt_name, n, *, clip=None, init_scale=2.0**16, user_unscale=False, **kw):
    model, opt, scaler = make(opt_name, init_scale)
    guard = gg.Guard(model, opt, clip=clip, **kw)
    scales = []
    for x, y in batches(n):
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        if user_unscale:
            scaler.unscale_(opt)
        guard.step(loss, scaler=scaler)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
    guard.close()
    return model, opt, scales, guard


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def assert_same_opt_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Same optimizer state. One documented difference: a skipped step on a fused
    optimizer whose state does not exist yet is skipped on the host (the guard never lets
    a device-side skip create state, tests/test_executors.py), while torch's own scaler
    creates it, pristine (zeros, step 0): such state counts as equal to none."""
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    for k in set(sb) - set(sa):
        assert all(torch.count_nonzero(v) == 0 for v in sb[k].values()), k
    for k in set(sa) - set(sb):
        assert all(torch.count_nonzero(v) == 0 for v in sa[k].values()), k
    for k in set(sa) & set(sb):
        for name, v in sa[k].items():
            assert torch.equal(v, sb[k][name]), (k, name)


# ---- (1) equivalence with the torch recipes --------------------------------------------
@pytest.mark.parametrize("opt_name", ["adam", "sgd", "adam_fused"])
def test_amp_guard_without_clip_matches_scaler_step_bitwise(opt_name):
    # init scale 2**30 overflows fp16 for the first steps: skipped steps are covered too
    ref, ref_opt, ref_scales = reference_run(opt_name, 12, init_scale=2.0**30)
    got, opt, scales, guard = guarded_run(opt_name, 12, init_scale=2.0**30)
    assert scales == ref_scales
    assert ref_scales[0] < 2.0**30  # the run did overflow at the start
    assert_same_params(got, ref)
    assert_same_opt_state(opt, ref_opt)
    before = [2.0**30, *ref_scales[:-1]]
    assert guard.skipped_steps == sum(a < b for a, b in zip(ref_scales, before))


@pytest.mark.parametrize("user_unscale", [False, True])
def test_amp_guard_normclip_matches_unscale_clip_step_recipe(user_unscale):
    ref, ref_opt, ref_scales = reference_run("adam", 10, max_norm=0.05)
    got, opt, scales, _ = guarded_run(
        "adam", 10, clip=gg.NormClip(0.05), user_unscale=user_unscale
    )
    assert scales == ref_scales
    assert_same_params(got, ref)
    assert_same_opt_state(opt, ref_opt)


def test_amp_records_unscaled_loss_and_grad_norm():
    model, opt, scaler = make("adam")
    guard = gg.Guard(model, opt)
    x, y = batches(1)[0]
    loss = amp_loss(model, x, y)
    scaler.scale(loss).backward()
    norm = guard.step(loss, scaler=scaler)
    # the gradients were unscaled before measuring: the norm is the true one
    expect = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert torch.allclose(norm, expect)
    window = guard.flush()
    assert window is not None
    assert window.loss[0].item() == loss.item()
    assert window.total_norm[0].item() < 1e3  # not the 2**16-scaled norm


# ---- (2) an injected inf ------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["adam", "adam_fused"])
def test_amp_injected_inf_skips_step_and_halves_scale(opt_name):
    model, opt, scaler = make(opt_name)
    guard = gg.Guard(model, opt, clip=gg.NormClip(1.0))
    data = batches(4)
    for x, y in data[:3]:
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)
        scaler.update()
        opt.zero_grad()
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    scale = scaler.get_scale()
    x, y = data[3]
    loss = amp_loss(model, x, y)
    scaler.scale(loss).backward()
    model[2].weight.grad[0, 0] = math.inf
    guard.step(loss, scaler=scaler)
    scaler.update()
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
        assert torch.isfinite(v).all()
    assert_same_opt_state(opt, _loaded(opt, state))
    assert scaler.get_scale() == scale * 0.5
    guard.close()
    assert guard.skipped_steps == 1


def _loaded(opt: torch.optim.Optimizer, state: dict) -> torch.optim.Optimizer:
    other = copy.deepcopy(opt)
    other.load_state_dict(state)
    return other


# ---- (3) routine overflows vs persistent non-finite ------------------------------------
def test_amp_initial_overflows_are_routine_no_warning_no_recovery():
    rec = gg.Recovery(skip_patience=2, snapshot_every=5)  # judged (and snapshot) every 5
    got, _opt, scales, guard = guarded_run(
        "adam", 20, init_scale=2.0**30, recovery=rec, every=5
    )
    skips = [e for e in guard.events if e.kind == "skip"]
    assert len(skips) >= 3  # several overflow steps happened ...
    assert guard.skipped_steps == len(skips)
    assert all(e.severity == "info" for e in skips)
    assert all(e.data["reason"] == "loss_scale_overflow" for e in skips)
    assert scales[0] == 2.0**29 and skips[0].data["scale"] == 2.0**30
    # ... yet nothing worse than info, and the ladder did nothing
    assert [e for e in guard.events if e.severity != "info"] == []
    assert [a for a in rec.actions if a.kind != "snapshot"] == []
    assert rec.lr_factor == 1.0
    # the first window, all overflows, counts as healthy
    assert next(a.step for a in rec.actions if a.kind == "snapshot") == 4
    assert all(torch.isfinite(p).all() for p in got.parameters())


@pytest.mark.parametrize("on_nonfinite", ["skip", "warn"])
def test_amp_persistent_nan_data_is_reported_and_recovers(on_nonfinite):
    model, opt, scaler = make("adam")
    rec = gg.Recovery(skip_patience=3)
    guard = gg.Guard(model, opt, recovery=rec, every=4, on_nonfinite=on_nonfinite)
    with pytest.warns(gg.GradGuardWarning) if on_nonfinite == "warn" else _null():
        for x, y in batches(8):
            x = x.clone()
            x[0, 0] = math.nan  # no loss scale fixes this
            loss = amp_loss(model, x, y)
            scaler.scale(loss).backward()
            guard.step(loss, scaler=scaler)
            scaler.update()
            opt.zero_grad()
    guard.close()
    errors = [e for e in guard.events if e.kind == "nonfinite_grad"]
    assert [e.step for e in errors] == list(range(8))
    assert all(e.severity == "error" for e in errors)
    assert not any(e.data.get("reason") == "loss_scale_overflow" for e in guard.events)
    acted = [a for a in rec.actions if a.kind != "snapshot"]
    assert acted and acted[0].kind == "backoff"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_amp_nan_in_backward_reported_once_scale_cannot_explain_it():
    # a finite loss with NaN gradients: routine while the scale still amplifies (> 1),
    # reported once backoff has brought the scale down to AMP_OVERFLOW_MIN_SCALE
    model, opt, scaler = make("sgd", init_scale=8.0)
    guard = gg.Guard(model, opt, every=100)
    for x, y in batches(6):
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        model[0].bias.grad[0] = math.nan
        guard.step(loss, scaler=scaler)
        scaler.update()
        opt.zero_grad()
    guard.close()
    info = [e.step for e in guard.events if e.kind == "skip" and e.severity == "info"]
    errors = [e.step for e in guard.events if e.kind == "nonfinite_grad"]
    assert info == [0, 1, 2]  # scales 8, 4, 2
    assert errors == [3, 4, 5]  # scales 1, 0.5, 0.25
    assert gg.executors.AMP_OVERFLOW_MIN_SCALE == 1.0


def test_amp_raise_only_on_genuine_nonfinite():
    model, opt, scaler = make("adam", init_scale=2.0**30)
    guard = gg.Guard(model, opt, on_nonfinite="raise")
    for x, y in batches(6):  # routine overflows at the start do not raise
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        guard.step(loss, scaler=scaler)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() < 2.0**30  # there were overflows, and none raised
    x, y = batches(1)[0]
    x = x.clone()
    x[1, 2] = math.nan
    loss = amp_loss(model, x, y)
    scaler.scale(loss).backward()
    with pytest.raises(gg.NonFiniteGradientError):
        guard.step(loss, scaler=scaler)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---- (4) sync budget ----------------------------------------------------------------------
def _bare_scaler_syncs(sync_counter, opt_name: str) -> int:
    model, opt, scaler = make(opt_name)
    counts = []
    for x, y in batches(4):
        scaler.scale(amp_loss(model, x, y)).backward()
        with sync_counter as c:
            scaler.step(opt)
        counts.append(len(c.calls))
        scaler.update()
        opt.zero_grad()
    return max(counts)


@pytest.mark.parametrize(
    ("opt_name", "bare_expected"),
    # SGD: GradScaler's own found_inf .item(); fused: none; Adam adds its own step .item()s
    [("sgd", 1), ("adam_fused", 0), ("adam", None)],
)
def test_amp_sync_budget_equals_bare_scaler_step(sync_counter, opt_name, bare_expected):
    bare = _bare_scaler_syncs(sync_counter, opt_name)
    if bare_expected is not None:
        assert bare == bare_expected
    model, opt, scaler = make(opt_name, init_scale=2.0**20)
    every = 8
    guard = gg.Guard(model, opt, clip=gg.NormClip(1.0), every=every)
    for i, (x, y) in enumerate(batches(20)):
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        if i == 11:
            model[0].weight.grad[0, 0] = math.inf
        fresh = not opt.state
        with sync_counter as c:
            guard.step(loss, scaler=scaler)
        # until a fused optimizer has state, a step would create it: decided on the host
        first = 1 if fresh and opt_name == "adam_fused" else 0
        if (i + 1) % every:
            assert len(c.calls) <= bare + first, (i, c.calls)  # gradguard adds none
        scaler.update()
        opt.zero_grad()
    guard.close()
    assert guard.skipped_steps >= 1


def test_amp_raise_mode_adds_at_most_one_sync(sync_counter):
    bare = _bare_scaler_syncs(sync_counter, "adam")
    model, opt, scaler = make("adam")
    guard = gg.Guard(model, opt, on_nonfinite="raise", every=50)
    for x, y in batches(5):
        loss = amp_loss(model, x, y)
        scaler.scale(loss).backward()
        with sync_counter as c:
            guard.step(loss, scaler=scaler)
        assert len(c.calls) <= bare + 1, c.calls
        scaler.update()
        opt.zero_grad()


# ---- (5) fused optimizer ------------------------------------------------------------------
def test_amp_fused_optimizer_skips_on_device_and_matches_reference():
    ref, ref_opt, ref_scales = reference_run("adam_fused", 8, max_norm=0.05, init_scale=2.0**30)
    got, opt, scales, guard = guarded_run(
        "adam_fused", 8, clip=gg.NormClip(0.05), init_scale=2.0**30
    )
    assert guard.fused
    assert scales == ref_scales
    assert_same_params(got, ref)
    assert_same_opt_state(opt, ref_opt)
    assert guard.skipped_steps >= 1
    assert all(e.severity == "info" for e in guard.events)


# ---- validation ---------------------------------------------------------------------------
def test_amp_scaler_type_is_checked():
    model, opt, _ = make()
    guard = gg.Guard(model, opt)
    with pytest.raises(TypeError, match="scaler"):
        guard.step(1.0, scaler="cpu")  # type: ignore[arg-type]


def test_amp_disabled_scaler_is_like_no_scaler():
    runs = []
    for use_scaler in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        guard = gg.Guard(model, opt, clip=gg.NormClip(0.1))
        for x, y in batches(4):
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            guard.step(loss, scaler=scaler if use_scaler else None)
            scaler.update()
            opt.zero_grad()
        runs.append(model)
    assert_same_params(runs[0], runs[1])


def test_amp_scaler_step_called_twice_is_an_error():
    model, opt, scaler = make()
    guard = gg.Guard(model, opt)
    x, y = batches(1)[0]
    loss = amp_loss(model, x, y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"scaler\.update"):
        guard.step(loss, scaler=scaler)


# ---- (4) a float16 run whose first steps overflow ----------------------------------------
def test_the_fresh_level_is_the_first_taken_losses_not_steps_0_to_2():
    """A GradScaler whose scale starts too high skips a float16 run's first steps: the
    loss-rise test's fresh level is the median of the first three *taken* losses. It was
    that of steps 0-2, none for such a run, and with no fresh level every share test was off
    for the rest of it: a loss 1.9x its best (1% of what the run learnt) rolled back a
    healthy run."""
    from gradguard.recovery.rise import LossRise

    rise = LossRise()
    skipped = [True] * 5 + [False] * 45
    rise.update(list(range(50)), [9.0] * 5 + [2.3, 2.2, 2.4] + [0.03] * 42, skipped)
    assert (rise.initial, rise.fresh) == (2.3, 2.2)
    rise.update(list(range(50, 100)), [0.057] * 50, [False] * 50)  # x1.9, 1% given back
    assert rise.risen(1.5) is None and rise.noisy() is None
    half = LossRise()  # the first window skips all but one step: the next ones complete it
    half.update(list(range(10)), [2.0] + [9.0] * 9, [False] + [True] * 9)
    assert half.initial is None
    restored = LossRise()
    restored.load_state_dict(half.state_dict())
    restored.update(list(range(10, 20)), [2.2, 2.1] + [1.0] * 8, [False] * 10)
    assert (restored.initial, restored.fresh) == (2.1, 2.0)
    resumed = LossRise()  # a resume (the first window is not the run's first): none
    resumed.update(list(range(100, 150)), [1.0] * 50, [False] * 50)
    assert resumed.initial is None


def test_a_float16_run_whose_scaler_skips_its_first_steps_is_left_alone():
    """Found as a stranger: a digits MLP under float16 autocast, AdamW 1e-3, a GradScaler
    at ``init_scale=2**24``: five overflows in its first five steps (routine), then it
    trains as the unguarded run does; it was rolled back at step 349 "for a loss 1.9x its
    best" (0.049 against 0.026, the fresh model's being 2.3)."""
    from benchmarks import rescue_cases as rc

    def run(guarded):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        guard = gg.Guard(model, opt, clip=gg.ZClip(), recovery=gg.Recovery()) if guarded else None
        batch = rc.digits_batches(0)
        for step in range(400):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=FP16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            guard.step(loss, scaler=scaler) if guard else scaler.step(opt)
            scaler.update()
        x, y = rc.digits_eval()
        with torch.no_grad():
            return guard, nn.functional.cross_entropy(model(x).float(), y).item()

    _, bare = run(False)
    guard, got = run(True)
    guard.close()
    skips = [e.step for e in guard.events if e.kind == "skip"]
    assert skips[:5] == [0, 1, 2, 3, 4]
    assert [a.kind for a in guard.recovery.decisions] == []
    assert [e for e in guard.events if e.severity != "info"] == []
    assert got == pytest.approx(bare, rel=0.02)
