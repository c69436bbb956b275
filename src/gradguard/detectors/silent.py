"""Layers without a gradient: no gradient at all reached the optimizer, or some layers
went silent (never had one, died, were cut off or gated), told apart by the loss's graph."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..events import NO_GRADIENT_REMEDY, Event
from ..telemetry import Window
from .config import DEFAULT_CONFIG, DIED_STEPS, NEGLIGIBLE, DetectorConfig, DetectorState


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
    # norms of exactly 0 whose elements are not: a signal that vanished below float32's
    # squares (gradguard.underflow), no layer without a gradient
    tiny = _underflow(window, never + died)
    never, died = [n for n in never if n not in tiny], [n for n in died if n not in tiny]
    state.silent_layers.extend(never + died + list(tiny))
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

    # (for layers that died only) the layers whose weight matrices still had a gradient in
    # the window (None: unknown), and those that learn their biases alone (fed zeros or a
    # constant: the units before them died): a gradient in no weight matrix, in a vector
    # only (a bias, a norm's shift), told by shape, not name (found by a regression hunt: a
    # hand-written layer's bias named `b` after dead units read as a weight, the dead
    # network "recovered")
    learning, bias_only = _learning(window, rows) if died else (None, set())

    def gated(name: str) -> str | None:
        # a layer before it (in the graph) still has a gradient: the network learns around
        # it (found by strangers: experts of a mixture that runs every expert and multiplies
        # the unchosen by a gate of 0 were "the network died", a healthy MoE failed
        # --fail-on-divergence). Its own units may have died all the same (a residual
        # block: the skip path keeps the layers before it a gradient), and the event says
        # both; no gradient tells the two apart. Only where its output joins a network that
        # still learns: a layer after it has a weight matrix with a gradient (found by a
        # regression hunt: a multi-task model whose one head's hidden layer died, its task
        # at chance, was told gated, "healthy", as its trunk still learnt from the other
        # head; the dead head's output layer, fed zeros, learns its bias only)
        # Or where no layer after it learns its bias alone: units that die leave the layer
        # after them a gradient for its bias only (fed zeros, or a constant), an output
        # multiplied by zero leaves it none of its own (found by regression hunts: the
        # unchosen experts of a top-1 mixture routed from the raw inputs, and a one-layer
        # branch switched off by a factor of 0, no layer before either, were "the network
        # died" on healthy runs; an MLP whose middle ReLUs died, the layer after them
        # learning its bias alone, is dead)
        # Returns where the network learns around it: "before" (a layer before it learns)
        # or "after" (only layers after it do: an expert routed from the raw inputs), or None
        if window.after is None:
            return None
        j = index[name]
        after = window.after[j]
        if learning is not None and not any(k in learning for k in after):
            return None
        if any(j in ks and k not in quiet for k, ks in enumerate(window.after)):
            return "before"
        if not any(k in bias_only for k in after) and any(k not in quiet for k in after):
            return "after"
        return None

    # a layer that never had a gradient, though the loss's graph reaches it and a layer
    # after it has one: its units are dead from the start (found by a stranger: ReLUs under
    # biases initialised at -5 sat at chance, "healthy", told to look for a detach())
    walked = window.reached() if never and window.reached is not None else None
    born = [n for n in never if walked is not None and index[n] in walked
            and window.after is not None and not cut(n)]
    # only in a network whose features are constant: every weight matrix the graph reaches
    # but the last has a gradient of exactly zero (the layers after dead units get one for
    # their bias only; found by a regression hunt: experts of a dense-masked mixture the
    # router first chose after step 49 were "dead from the start", where a layer behind a
    # gate is an info; and by another: a first layer dead from its init, the next one fed
    # zeros, sat at chance "healthy")
    # Or where a layer after it learns its bias alone: fed the exact zeros of units dead
    # from the start, its weight matrix gets no gradient (a gate of 0 leaves the layers
    # after it none at all). Found by a stranger: a 3-hidden-layer ReLU MLP whose first
    # layer's bias sat at -100, at chance, was "healthy" and told to look for a detach():
    # the second layer, fed zeros, passed on its own bias's constant, and the third's
    # weight matrix had a gradient
    # (a layer with a weight matrix: a LayerNorm has its vectors alone, and learns them
    # whatever feeds it; found by a regression hunt, an unchosen expert of a mixture
    # before a LayerNorm was "dead from the start")
    # Only where its output reaches the rest through an activation (the graph says:
    # window.through_activation): a side input's embedding always given its padding id, or
    # a branch switched off by a factor of 0, feeds its projection zeros with none between
    # (found by a regression hunt: such healthy runs were "the units that feed them
    # died"); without a graph, where every layer whose weight matrix learns is after it
    # (a branch beside it: the network learns around it)
    if born and window.after is not None and not _constant(window, rows, walked):
        learns, alone = _learning(window, rows)
        mats = window.matrix_params or []
        alone &= {window.layer_index[i] for i, m in enumerate(mats) if m}
        after = window.after
        born = [n for n in born if any(k in alone for k in after[index[n]])
                and _units_gate(window, index[n], learns)]
    return ([_silent_layer(n, window.steps[0], step,
                           reached=walked is not None and index[n] in walked)
             for n in never if n not in born]
            + [_silent_layer(n, window.steps[0], step, died=len(cols[index[n]]),
                             from_start=True) for n in born]
            + [_silent_layer(n, window.steps[0], step, died=state.silent_run[n],
                             cut=cut(n), gated=gated(n), ordered=window.after is not None)
               for n in died]
            + ([_underflow_event(window, tiny, step)] if tiny else []))


def _units_gate(window: Window, j: int, learns: set[int] | None) -> bool:
    """Whether layer ``j``'s output passes an activation on its way on (its units can be
    dead: :func:`gradguard.graph_order.through_activation`); without a graph,
    whether every layer whose weight matrix learns is after it."""
    gated = window.through_activation(j) if window.through_activation is not None else None
    if gated is not None:
        return gated
    after = window.after[j] if window.after is not None else []
    return learns is None or all(k in after for k in learns)


def _learning(window: Window, rows: torch.Tensor) -> tuple[set[int] | None, set[int]]:
    """The layers whose weight matrices had a gradient in the window's ``rows`` (None when
    unknown), and those with a gradient in their vectors alone (host values)."""
    mats = window.matrix_params
    if mats is None:
        return None, set()
    live = (window.param_norms[rows] != 0).any(dim=0).tolist()  # per parameter
    learning = {window.layer_index[i] for i, (m, z) in enumerate(zip(mats, live)) if m and z}
    return learning, {window.layer_index[i] for i, z in enumerate(live) if z} - learning


def _underflow(window: Window, names: list[str]) -> dict[str, float]:
    """Of the layers ``names`` (norms of exactly zero), those whose gradient has a non-zero
    element now, with its largest magnitude (:mod:`gradguard.underflow`)."""
    if not names or window.amax is None:
        return {}
    index = {n: j for j, n in enumerate(window.layers)}
    amax = window.amax([index[n] for n in names])
    return {n: a for n, a in zip(names, amax) if a > 0}


def _underflow_event(window: Window, tiny: dict[str, float], step: int) -> Event:
    """The warning for layers whose gradient vanished below float32's squares."""
    names = list(tiny)
    return Event(
        kind="vanishing_grad", step=step, severity="warning", layer=names[0],
        value=max(tiny.values()),
        message=(f"steps {window.steps[0]}-{step}: gradients vanish below float32's range in "
                 f"{len(names)} layer(s) starting at `{names[0]}`: their norms read exactly "
                 f"0, yet their elements are not (the largest is {max(tiny.values()):.2g}, "
                 "whose square underflows): the signal vanished on its way back"),
        remedy=("Check the initialisation: normalisation gains (BatchNorm/LayerNorm weights) "
                "near 0 scale the signal down at every layer, as do weights too small; use "
                "ReLU-family activations with He init and residual connections. "
                "gg.doctor(model, batch, loss_fn) measures the decay layer by layer."),
        data={"layers": names, "underflow": True, "amax": [tiny[n] for n in names]})


def _constant(window: Window, rows: torch.Tensor, walked: frozenset[int] | None) -> bool:
    """Whether every weight matrix of the layers ``walked`` (the graph reaches) but the
    last had a gradient of exactly zero on every finite step of the window (the last's too
    when the units before it died: its bias alone learns)."""
    mats = window.matrix_params
    if mats is None or walked is None:
        return False
    zero = (window.param_norms[rows] == 0).all(dim=0).tolist()
    seen = [z for i, (m, z) in enumerate(zip(mats, zero))
            if m and window.layer_index[i] in walked]
    return len(seen) >= 2 and all(seen[:-1])


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
                  from_start: bool = False, gated: str | None = None, reached: bool = False,
                  ordered: bool = False) -> Event:
    """The event for a layer without a gradient; ``died``: the steps without one, of a
    layer that had one before (0: it never had one); ``cut``: the loss no longer depends
    on its output (no layer after it has a gradient); ``gated``: where the network learns
    around it, "before" (a layer before it still has a gradient) or "after" (the layers
    after it still learn their weights; its output no longer reaches the loss);
    ``from_start``: it never had one, though the loss's graph reaches it and every layer but the last is so (dead from the
    start); ``reached``: it never had one, though the loss's graph reaches it;
    ``ordered``: the graph's order was known (a layer that died is then neither cut nor
    gated for certain: ``data["ordered"]``, which the report reads)."""
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
                   "one: the units around it are dead from the start (activations that their "
                   "biases or inputs keep where they pass no gradient: ReLUs below zero, a GELU "
                   "or sigmoid far out), or its output is multiplied by zero (a gate or mask "
                   "that never opens)")
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
        # (found by a stranger: a first layer, no layer before it, was told "a layer before
        # it still has one")
        where = ("a layer before it still has one (the network learns around it, through a "
                 "skip connection or the router's other experts)" if gated == "before" else
                 "the layers after it still learn their weights (the network learns around "
                 "it, through the router's other experts or branches read from the inputs)")
        message = (f"{zero}, having had one before, while {where}: its units died (ReLUs "
                   "that an update too large pushed below zero for good), or its output no "
                   "longer reaches the loss (an expert the router no longer chooses, a gate "
                   "that closed)")
        remedy = ("If its units died, lower the learning rate or use LeakyReLU/GELU (a "
                  f"rollback to before their death can bring them back); {router}.")
    elif died:
        severity, data = "warning", {"died": True, "steps": died, "ordered": ordered}
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
