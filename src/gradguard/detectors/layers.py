"""Per-layer health: vanishing gradients, update/weight ratios, dead and saturated units."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ..events import NO_GRADIENT_REMEDY, Event
from ..telemetry import Window
from .config import (
    DEFAULT_CONFIG,
    DIED_STEPS,
    NEGLIGIBLE,
    SATURATION_MARGIN,
    UPDATE_RATIO_HISTORY,
    VANISH_LEARNS,
    DetectorConfig,
    DetectorState,
)


# ---- vanishing ------------------------------------------------------------------------
def detect_vanishing(window: Window, config: DetectorConfig = DEFAULT_CONFIG) -> list[Event]:
    """``vanishing_grad``: layers whose gradient norm stays ``vanish_ratio`` below the
    largest norm of the layers after them (or below ``vanish_floor``) over the window.

    Only layers with a weight matrix or kernel are compared (``Window.matrix_layers``,
    when some layers have one): a norm layer's scale or a bias of a few elements has a
    gradient norm small by its size alone (a qk-LayerNorm of 16 elements sits at 3e-4 of
    the attention matrices after it in a healthy transformer).

    A small gradient is only a fault when the layer stops learning: where the flush step's
    update/weight ratios were sampled, a layer whose ratio is at least ``VANISH_LEARNS``
    of the largest ratio of the layers after it is left out. An adaptive optimizer (Adam,
    RMSprop) normalises each parameter's step, so the query and key projections of a
    transformer at its init (gradients ~1e-4 of the layers after them, BERT from its config)
    learn at the pace of the rest; under SGD the update is the gradient and a vanishing
    layer's ratio is as small as its gradient.

    A signal that vanished on its way back leaves every layer before the first it failed
    to reach small too: only layers all of whose earlier layers vanish as well count. A
    small gradient behind layers that get theirs in full is the layer's own (found as a
    stranger: timm's ``regnetx_002`` on 32-pixel digits at SGD 0.01, whose last stage runs
    on 1x1 maps; its residual branches sit behind a BatchNorm gain initialised to 0, timm's
    ``zero_init_last``, which grows slowly there: their convolutions' gradients were 5e-4
    of the head's at step 49 while the stem's were in full, and were called "vanishing in
    13 early layers", the remedy residual connections and normalisation it has).

    "After" is the autograd graph's order where the telemetry could read it from the loss
    (``Window.after``, :mod:`gradguard.graph_order`): the layers a layer's output flows
    through to the loss. Registration order is that of a chain only: a policy and a value
    network side by side in one ``ModuleDict`` made the critic's gradients "the layers
    after" the actor's first layer. Without a graph order, registration order stands.

    Steps whose loss is exactly zero are left out: a classifier that fits its batch to a
    cross-entropy that rounds to 0.0 has nothing to pass back, and the rounding left in its
    gradients sits under ``vanish_floor`` in every layer (found as a stranger: a MobileNetV3-small
    (torchvision's design) on RMSprop, its batch memorised, "vanishing" at an SE block's 8e-13).
    A loss not given to the guard (NaN) leaves every step in."""
    ln = window.layer_norms()
    layers = window.layers
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    rates = None if w is None or u is None else (u.double() / w.double()).tolist()
    cols = list(range(len(layers)))
    keep = window.matrix_layers
    if keep is not None and any(keep) and not all(keep):
        cols = [j for j, k in enumerate(keep) if k]
        ln, layers = ln[:, cols], [layers[j] for j in cols]
        rates = None if rates is None else [rates[j] for j in cols]
    after = _after(window.after, cols)
    # a step whose loss is exactly zero has no signal to pass back: what gradient is left
    # is rounding, under the absolute floor in every layer (see the docstring)
    rows = torch.isfinite(ln).all(dim=1) & (window.loss.to(ln.device) != 0)
    if int(rows.sum()) < config.vanish_min_steps or ln.shape[1] < 2:
        return []
    ok = ln[rows].double()
    later = _later(ok, after)  # the largest norm among the layers after each layer
    ratio = ok / later.clamp_min(1e-300)
    vanish = (ok > 0) & (later > 0) & ((ratio < config.vanish_ratio) | (ok < config.vanish_floor))
    frac = vanish.double().mean(dim=0).tolist()
    med_ratio = ratio.median(dim=0).values.tolist()
    med_norm = ok.median(dim=0).values.tolist()
    # the layers from the input up to the first that got its gradient (see the docstring):
    # a layer counts when it and every layer before it vanish
    gone = [f >= config.vanish_fraction for f in frac]
    if after is None:
        chain = next((j for j, g in enumerate(gone) if not g), len(gone))
        counted = list(range(chain))
    else:
        fine = {k for i, ks in enumerate(after) if not gone[i] for k in ks}  # after a layer
        counted = [j for j, g in enumerate(gone) if g and j not in fine]  # that got its own
    hit = [j for j in counted if not (rates is not None and _learns(rates, j, after))]
    if not hit:
        return []
    first = hit[0]
    names = [layers[j] for j in hit]
    step = window.steps[-1]
    return [
        Event(
            kind="vanishing_grad",
            step=step,
            severity="warning",
            message=(
                f"steps {window.steps[0]}-{step}: gradients vanish in {len(hit)} early "
                f"layer(s) starting at `{names[0]}`: its norm {med_norm[first]:.2g} is "
                f"{med_ratio[first]:.1e} of the layers after it"
            ),
            layer=names[0],
            value=med_ratio[first],
            threshold=config.vanish_ratio,
            remedy=(
                "Use ReLU-family activations with He init, add normalisation or residual "
                "connections, or use an LSTM/GRU for long sequences."
            ),
            data={"layers": names, "ratio": [med_ratio[j] for j in hit],
                  "grad_norm": [med_norm[j] for j in hit]},
        )
    ]


def _learns(rates: Sequence[float], j: int, after: list[list[int]] | None = None) -> bool:
    """Layer ``j`` moved at least ``VANISH_LEARNS`` of the largest update/weight ratio of
    the layers after it at the sampled step (the reference of the gradient test: the
    largest norm after it); a skipped step, ratio 0, says nothing."""
    nxt = rates[j + 1:] if after is None else [rates[k] for k in after[j]]
    later = [r for r in nxt if math.isfinite(r) and r > 0]
    r = rates[j]
    return bool(later) and math.isfinite(r) and r > 0 and r >= VANISH_LEARNS * max(later)


def _after(after: list[list[int]] | None, cols: list[int]) -> list[list[int]] | None:
    """The graph order (``Window.after``) among the columns ``cols`` (layer indices),
    in column positions; None: registration order."""
    if after is None:
        return None
    pos = {layer: c for c, layer in enumerate(cols)}
    return [[pos[k] for k in after[layer] if k in pos] for layer in cols]


def _later(ok: torch.Tensor, after: list[list[int]] | None) -> torch.Tensor:
    """Per step and layer, the largest norm among the layers after it (0: none)."""
    if after is None:  # registration order: every later column
        later = torch.flip(torch.cummax(torch.flip(ok, [1]), dim=1).values, [1])
        return torch.cat([later[:, 1:], torch.zeros_like(later[:, :1])], dim=1)
    later = torch.zeros_like(ok)
    for j, ks in enumerate(after):
        if ks:
            later[:, j] = ok[:, ks].amax(dim=1)
    return later


# ---- sampled at flush steps -------------------------------------------------------------
def detect_update_ratio(window: Window, config: DetectorConfig = DEFAULT_CONFIG,
                        history: Sequence[float] = (), *, annealed: bool = False) -> list[Event]:
    """``update_ratio``: per-layer ``|update| / |weight|`` at the flush step far above
    (``warning``) or far below (``info``) the healthy ~1e-3. A high ratio while the loss
    still falls (the newer half's median below the older half's) is ``info``: large steps
    that train (a tanh RNN at SGD lr 3 with its gradients clipped) are a choice, not a
    fault. The loss falls when it does over the window or over ``history`` (the detectors'
    recent finite losses, up to ``spike_history`` steps, this window's included): ten steps
    of a noisy loss rise half the time. Before step ``UPDATE_RATIO_HISTORY`` - 1 (49, the
    first flush at the default ``every``) it is not judged (``info``). ``annealed``: the
    LR in force is below ``ANNEALED_LR`` of the run's highest (:meth:`LrTracker.annealed`:
    the tail of a schedule that anneals to zero), and a ratio far below is not reported: a
    run's last steps under cosine to zero barely change any layer, and "raise the learning
    rate" would be wrong advice there."""
    w, u = window.layer_weight_norms(), window.layer_update_norms()
    if w is None or u is None:
        return []
    events: list[Event] = []
    step = window.steps[-1]
    window_losses = [x for x in window.loss.tolist() if math.isfinite(x)]
    falling = _falling(window_losses) or (len(history) > len(window_losses)
                                          and _falling(list(history)))
    early = step + 1 < UPDATE_RATIO_HISTORY  # too early to say it is not falling
    note = ("; the loss is still falling" if falling else
            "; too early to judge the loss's trend" if early else "")
    high: list[tuple[str, float]] = []
    low: list[tuple[str, float]] = []
    for name, wn, un in zip(window.layers, w.tolist(), u.tolist()):
        if not (math.isfinite(wn) and math.isfinite(un)) or wn <= 0 or un <= 0:
            continue  # a skipped step does not update: nothing to judge
        r = un / wn
        if r > config.update_ratio_high:
            high.append((name, r))
        elif r < config.update_ratio_low and not annealed:
            low.append((name, r))
    for name, r, n in _grouped(high, max):
        events.append(Event(
            kind="update_ratio", step=step, severity="info" if note else "warning",
            layer=name, value=r, threshold=config.update_ratio_high,
            message=(f"step {step}: `{name}` update/weight ratio {r:.2g} (healthy ~1e-3)" if n
                     is None else f"step {step}: {len(n)} layers' update/weight ratio "
                     f"{min(x for _, x in n):.2g} to {r:.2g} (the largest in `{name}`; healthy "
                     "~1e-3)") + note,
            remedy="Lower the learning rate (or this layer's) until the ratio is ~1e-3.",
            data={} if n is None else {"layers": [x for x, _ in n], "ratios": [x for _, x in n]},
        ))
    for name, r, n in _grouped(low, min):
        events.append(Event(
            kind="update_ratio", step=step, severity="info", layer=name, value=r,
            threshold=config.update_ratio_low,
            message=(f"step {step}: `{name}` barely changes: update/weight ratio {r:.2g}" if n
                     is None else f"step {step}: {len(n)} layers barely change: update/weight "
                     f"ratio {r:.2g} to {max(x for _, x in n):.2g} (the smallest in `{name}`)"),
            remedy="Raise the learning rate or check that this layer receives gradient.",
            data={} if n is None else {"layers": [x for x, _ in n], "ratios": [x for _, x in n]},
        ))
    return events


#: More layers than this out of range at one flush are one event, not one each (found by a
#: stranger: 29 warnings at one step of a ResNet whose LR ramped up).
UPDATE_RATIO_EVENTS = 3


def _grouped(hits: list[tuple[str, float]], worst: Any) -> list[tuple[str, float, Any]]:
    """``(layer, ratio, None)`` per hit, or one ``(worst layer, its ratio, hits)``."""
    if len(hits) <= UPDATE_RATIO_EVENTS:
        return [(name, r, None) for name, r in hits]
    name, r = worst(hits, key=lambda h: h[1])
    return [(name, r, hits)]


def _falling(loss: Sequence[float]) -> bool:
    """The second half's median below the first half's."""
    half = len(loss) // 2
    if half < 2:
        return False
    return statistics.median(loss[half:]) < statistics.median(loss[:half])


def detect_activations(
    step: int, activations: Mapping[str, Mapping[str, float]],
    config: DetectorConfig = DEFAULT_CONFIG,
) -> list[Event]:
    """``dead_units`` / ``saturating_activation`` from activation samples
    (``{module: {"dead": fraction}}`` or ``{module: {"saturated": fraction}}``)."""
    events: list[Event] = []
    for name, sample in activations.items():
        dead = sample.get("dead")
        if dead is not None and dead >= config.dead_fraction:
            events.append(Event(
                kind="dead_units", step=step, severity="warning", layer=name, value=dead,
                threshold=config.dead_fraction,
                message=(f"step {step}: {dead:.0%} of `{name}`'s units never activate on "
                         "the sampled batch"),
                remedy=("Lower the learning rate, use He init, or use LeakyReLU/GELU so "
                        "units can recover."),
            ))
        sat = sample.get("saturated")
        if sat is not None and sat >= config.saturation_fraction:
            events.append(Event(
                kind="saturating_activation", step=step, severity="warning", layer=name,
                value=sat, threshold=config.saturation_fraction,
                message=(f"step {step}: {sat:.0%} of `{name}`'s outputs sit within "
                         f"{SATURATION_MARGIN:g} of the activation's bounds"),
                remedy=("Use Xavier init and normalised inputs, add normalisation before "
                        "the activation, or switch to ReLU-family activations."),
            ))
    return events


def detect_no_gradient(
    window: Window, state: DetectorState, config: DetectorConfig = DEFAULT_CONFIG
) -> list[Event]:
    """``disconnected_layer``: no gradient at all reached the optimizer over the window
    (every gradient exactly zero or missing: ``zero_grad()`` between ``backward()`` and
    ``step()``, a detached loss), a warning once per such stretch; or some layers got none
    on any step of the window while others did, once per layer: an info for a layer that
    never had one (an unused branch, ``no_grad``, frozen), a warning for one that had one
    and has had exactly none for ``DIED_STEPS`` (50) taken steps in a row
    (``data["died"]``: the units that feed it died, ReLUs an update too large pushed
    below zero for good). A window at whose first step none of a layer's parameters had a
    gradient tensor (``p.grad`` None: frozen mid-run, ``requires_grad_(False)``) restarts its count:
    frozen is not dead (a parameter with ``requires_grad`` False counts as having none, as
    with ``zero_grad(set_to_none=False)`` it keeps a gradient of zeros)."""
    total = window.total_norm.tolist()
    state.had_loss = state.had_loss or any(x > 0 for x in window.loss.tolist()
                                           if math.isfinite(x))
    n_ok = sum(1 for t in total if math.isfinite(t))
    if n_ok < config.vanish_min_steps:
        return []
    step = window.steps[-1]
    if all(t == 0.0 for t in total if math.isfinite(t)):
        losses = [x for x in window.loss.tolist() if math.isfinite(x)]
        if losses and all(x == 0.0 for x in losses) and state.had_loss:
            # a loss of exactly 0 has nothing left to give a gradient: fit, not dead (found
            # by a regression hunt: a linear SVM whose hinge loss reached 0 was "the units
            # that feed the layers died"); a loss 0 from the first step is no fit (every
            # label masked) and is told
            return []
        if state.no_gradient:
            return []
        state.no_gradient = True
        if any(_layers_present(window).values()):
            # the gradient tensors are there, all zero: no missing backward (found by a
            # regression hunt: ReLUs killed under a head without a bias were told "call
            # loss.backward()")
            return [Event(
                kind="disconnected_layer", step=step, severity="warning", value=0.0,
                message=(f"steps {window.steps[0]}-{step}: every gradient is exactly zero, "
                         "so nothing trains: the units that feed the layers died (ReLUs "
                         "that an update too large pushed below zero), or the loss no "
                         "longer depends on the weights"),
                remedy=("Lower the learning rate, normalise the inputs, or use "
                        "LeakyReLU/GELU; a rollback to before their death can bring them "
                        "back (gg.Recovery())."),
                data={"steps": len(total), "zero": True},
            )]
        return [Event(
            kind="disconnected_layer", step=step, severity="warning", value=0.0,
            message=(f"steps {window.steps[0]}-{step}: no gradient reached the optimizer: "
                     "every gradient is zero or missing, so nothing trains"),
            remedy=NO_GRADIENT_REMEDY,
            data={"steps": len(total)},
        )]
    state.no_gradient = False
    ln = window.layer_norms()
    rows = torch.isfinite(ln).all(dim=1)
    zero = (ln[rows] == 0).all(dim=0).tolist()
    # a gradient is one above NEGLIGIBLE x the step's largest: a vanished signal's underflow
    # (1e-20 that falls to exactly zero now and then) is no gradient a layer had and lost
    real = (ln[rows] > NEGLIGIBLE * ln[rows].amax(dim=1, keepdim=True)).any(dim=0).tolist()
    had = set(state.grad_layers)
    silent = set(state.silent_layers)
    never = [n for n, z in zip(window.layers, zero) if z and n not in had and n not in silent]
    state.grad_layers.extend(n for n, r in zip(window.layers, real) if r and n not in had)
    had.update(state.grad_layers)
    died = []
    cols = ln[rows].t().tolist()
    present = _layers_present(window)
    absent = window.layers_absent()
    kept = [k for k, ok in enumerate(rows.tolist()) if ok]
    reached: frozenset[int] | None = None  # walked once, for the first layer that looks dead
    for j, (name, col) in enumerate(zip(window.layers, cols)):
        if name not in had:
            continue
        if not present.get(name, True):  # no gradient tensor at all: frozen or unused, not dead
            state.silent_run[name] = 0
            continue
        if absent is not None:  # steps whose graph did not reach it count neither way
            col = [x for k, x in zip(kept, col) if j not in absent[k]]
        last = max((i for i, x in enumerate(col) if x != 0.0), default=None)
        run = state.silent_run.get(name, 0) + len(col) if last is None else len(col) - 1 - last
        state.silent_run[name] = run
        if run >= DIED_STEPS and name not in silent:
            if reached is None:
                walked = window.reached() if window.reached is not None else None
                reached = frozenset(range(len(window.layers))) if walked is None else walked
            if j not in reached:  # outside the graph (detached, under no_grad): not dead
                state.silent_run[name] = 0
                continue
            died.append(name)
    state.silent_layers.extend(never + died)
    # a layer whose output reaches the loss through no layer that still has a gradient (a
    # head, or a branch every layer of which went silent) no longer counts for the loss: a
    # loss term weighted 0, an expert the router stopped choosing. Units that died leave
    # the layer after them a gradient (its bias's, at least), and the layers before them
    # none (found by a stranger: an auxiliary loss switched off was "the network died")
    index = {n: j for j, n in enumerate(window.layers)}
    quiet = {j for j, z in enumerate(zero) if z}

    def cut(name: str) -> bool:
        # told by the autograd graph only: in registration order a head registered before
        # the trunk has the trunk "after" it (found by a regression hunt: dead ReLUs in
        # such a model, stepped without its loss, were "cut", and the run healthy)
        if window.after is None:
            return False
        return all(k in quiet for k in window.after[index[name]])

    def gated(name: str) -> bool:
        # a layer before it (in the graph) still has a gradient: dead units would have
        # left it none, so the loss stops reaching it through its output (found by
        # strangers: experts of a mixture that runs every expert and multiplies the unchosen
        # by a gate of 0 were "the network died", a healthy MoE failed --fail-on-divergence)
        if window.after is None:
            return False
        j = index[name]
        return any(j in ks and k not in quiet for k, ks in enumerate(window.after))

    # a layer that never had a gradient, though the loss's graph reaches it and a layer
    # after it has one: its units are dead from the start (found by a stranger: ReLUs under
    # biases initialised at -5 sat at chance, "healthy", told to look for a detach())
    walked = window.reached() if never and window.reached is not None else None
    born = [n for n in never if walked is not None and index[n] in walked
            and window.after is not None and not cut(n)]
    # only a network every layer of which but the last is so: its features are constant
    # (found by a regression hunt: experts of a dense-masked mixture the router first
    # chose after step 49 were "dead from the start"; a layer behind a gate is an info)
    trained = [n for n in window.layers if present.get(n, True)]
    if [n for n in trained if n not in born] != trained[-1:]:
        born = []
    return ([_silent_layer(n, window.steps[0], step,
                           reached=walked is not None and index[n] in walked)
             for n in never if n not in born]
            + [_silent_layer(n, window.steps[0], step, died=len(cols[index[n]]),
                             from_start=True) for n in born]
            + [_silent_layer(n, window.steps[0], step, died=state.silent_run[n],
                             cut=cut(n), gated=gated(n)) for n in died])


def _layers_present(window: Window) -> dict[str, bool]:
    """Per layer, whether any of its parameters had a gradient tensor at the window's first
    step (empty when unknown: every layer counts as present)."""
    if window.grad_present is None:
        return {}
    out: dict[str, bool] = {}
    for j, has in zip(window.layer_index, window.grad_present):
        name = window.layers[j]
        out[name] = out.get(name, False) or has
    return out


def _silent_layer(name: str, first: int, step: int, *, died: int = 0, cut: bool = False,
                  from_start: bool = False, gated: bool = False, reached: bool = False,
                  ) -> Event:
    """The event for a layer without a gradient; ``died``: the steps without one, of a
    layer that had one before (0: it never had one); ``cut``: the loss no longer depends
    on its output (no layer after it has a gradient); ``gated``: a layer before it still
    has one (its output no longer reaches the loss); ``from_start``: it never had one,
    though the loss's graph reaches it and every layer but the last is so (dead from the
    start); ``reached``: it never had one, though the loss's graph reaches it."""
    zero = f"step {step}: `{name}` has received a gradient of exactly zero for {died} steps"
    never = f"steps {first}-{step}: `{name}` received a gradient of exactly zero on every step"
    router = ("an expert the router left unused wants a load-balancing loss or a lower "
              "router LR")
    init = "Check the initialisation (biases far below zero"
    severity: Literal["info", "warning"] = "info"
    message, remedy, data = "", "", {}
    if from_start:
        severity, data = "warning", {"died": True, "steps": died, "from_start": True}
        message = (f"{never}, though the loss's graph reaches it and a layer after it has "
                   "one: the units around it are dead from the start (ReLUs that their biases "
                   "or inputs keep below zero), or its output is multiplied by zero (a gate or "
                   "mask that never opens)")
        remedy = (f"{init}, weights that push every unit negative) and the inputs' scale, or "
                  "use LeakyReLU/GELU; gg.doctor(model, batch, loss_fn) names the layers.")
    elif died and cut:
        data = {"cut": True, "steps": died}
        message = (f"{zero}, having had one before, and so has every layer after it: the loss "
                   "no longer depends on its output (a loss term weighted 0, an expert the "
                   "router no longer chooses), and it does not train")
        remedy = f"Nothing to do if its loss term was switched off on purpose; {router}."
    elif died and gated:
        data = {"gated": True, "steps": died}
        message = (f"{zero}, having had one before, while a layer before it still has one: "
                   "its output no longer reaches the loss (an expert the router no longer "
                   "chooses, a gate that closed), and it does not train")
        remedy = f"{router[0].upper()}{router[1:]}; nothing to do if the gate closed on purpose."
    elif died:
        severity, data = "warning", {"died": True, "steps": died}
        message = (f"step {step}: `{name}` has received no gradient for {died} steps, having "
                   "had one before: the units that feed it died (ReLUs that an update too "
                   "large pushed below zero for good)")
        remedy = ("Lower the learning rate, normalise the inputs, or use LeakyReLU/GELU; a "
                  "rollback to before its death can bring it back.")
    elif reached:  # in the graph, its gradient exactly zero: no detach() nor unused branch
        # (found by a stranger: GPT-2's MLP biases at -20, every GELU at 0, were told to
        # look for a detach())
        data = {"died": False, "reached": True}
        message = (f"{never}, though the loss's graph reaches it: units around it dead from "
                   "the start (activations whose biases or inputs hold them where they pass "
                   "no gradient), or an output multiplied by zero (a gate that never opens)")
        remedy = (f"{init}) and the inputs' scale, or the gate; gg.doctor(model, batch, "
                  "loss_fn) names dead units.")
    else:
        data = {"died": False}
        message = f"steps {first}-{step}: `{name}` received no gradient on any step"
        remedy = ("If it should learn, check for detach()/no_grad() or an unused branch; if it "
                  "is frozen, leave it out of the optimizer.")
    return Event(kind="disconnected_layer", step=step, severity=severity, layer=name,
                 value=0.0, message=message, remedy=remedy, data=data)
