"""Which layers come after which on the way to the loss, read from the loss's autograd graph.

The vanishing-gradient test compares each layer's gradient with the layers after it: a
signal that fades on its way back is small in the early layers next to the later ones.
Registration order is the forward order of a chain, and of a chain only. An actor-critic
kept in one ``nn.ModuleDict`` (a policy and a value network side by side, both fed the
observation) registers the critic after the actor, and the critic's gradients, which
follow a value loss of returns in the hundreds, were "the layers after" the policy's first
layer: "gradients vanish in `pi.0`: 4.9e-04 of the layers after it", on a healthy run,
every such window. Two towers (a text and an image encoder), task heads on a shared trunk
and a GAN's two networks under one module share the fault.

:func:`layers_after` walks the graph of one loss once (host-side, no device read: the graph
outlives ``backward``) and finds, for each layer, the layers whose computations take its
output, directly or through others: layer ``k`` is after layer ``j`` when an operation that
takes one of ``k``'s parameters (itself, or through views: a transpose, a reshape, a cast)
also takes an input that depends on ``j``'s. Parameters an operation takes side by side (a
LayerNorm's scale and the embedding it normalises) order nothing between them.

The answer is None, and registration order stands, when the graph cannot say: no graph
(a loss passed as a number or detached), a layer of the watched parameters that the graph
does not reach (frozen, unused at that step, another pipeline stage's), two layers each
after the other (a weight used at both ends: GPT-2's embedding tied to its output head,
T5's shared one; a block applied twice), or one operation that takes the parameters of two
layers at once (a ``torch.compile`` graph takes them all, as may a fused kernel).
A guard under torch.distributed does not read it (``Telemetry(graph_order=False)``): each
rank's graph is its own, and the detectors' verdicts must be alike on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

#: operations that only view, copy or cast their one input: a parameter reached through
#: them is taken by the operation above them as if directly (``F.linear`` takes ``W.t()``)
VIEWS = frozenset({
    "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
    "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "ExpandBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "ToCopyBackward0", "CloneBackward0", "AliasBackward0", "SliceBackward0",
    "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "ContiguousBackward0",
})


def layers_after(loss: Any, params: Sequence[Tensor], layer_index: Sequence[int],
                 n_layers: int) -> list[list[int]] | None:
    """For each layer ``j`` (``layer_index[i]`` is parameter ``i``'s), the layers after it
    in the graph of ``loss``, in increasing index; None when the graph cannot say (see the
    module docstring)."""
    root = getattr(loss, "grad_fn", None)
    if root is None or n_layers < 2:
        return None
    layer_of = {id(p): layer_index[i] for i, p in enumerate(params)}
    below: dict[Any, int] = {}  # per node: the layers whose parameters it depends on
    before = [0] * n_layers  # per layer: the layers its parameters' operations take in
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if node in below and not ready:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not ready:
            var = getattr(node, "variable", None)
            if var is not None or not children:  # a leaf: a parameter or another tensor
                j = layer_of.get(id(var)) if var is not None else None
                below[node] = 0 if j is None else 1 << j
                continue
            below[node] = 0  # in progress (the graph is acyclic)
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in below)
            continue
        mask = direct = 0
        for c in children:
            k = _taken(c, layer_of)
            if k is None:
                mask |= below[c]
            else:
                direct |= 1 << k
        if direct & (direct - 1):
            return None  # one operation takes two layers' parameters: no order between them
        if direct:
            before[direct.bit_length() - 1] |= mask & ~direct
        below[node] = mask | direct
    reached = below.get(root, 0)
    if reached != (1 << n_layers) - 1:
        return None  # a layer the graph does not reach: no order for it
    after: list[list[int]] = [[] for _ in range(n_layers)]
    for k in range(n_layers):
        for j in _bits(before[k]):
            if before[j] >> k & 1:
                return None  # each after the other: no order
            after[j].append(k)
    return after


def layers_reached(loss: Any, params: Sequence[Tensor],
                   layer_index: Sequence[int]) -> frozenset[int] | None:
    """The layers (``layer_index`` values) at least one of whose parameters the graph of
    ``loss`` takes: the layers its backward gives a gradient. None without a graph. A
    host-side walk, no device read; for a layer that looks dead (a gradient of exactly zero
    for many steps) a layer the graph does not reach at all (its output detached, run under
    ``no_grad``) is no dead one: it keeps a tensor of zeros under
    ``zero_grad(set_to_none=False)``."""
    root = getattr(loss, "grad_fn", None)
    if root is None:
        return None
    layer_of = {id(p): layer_index[i] for i, p in enumerate(params)}
    seen = {root}
    stack = [root]
    out = set()
    while stack:
        node = stack.pop()
        var = getattr(node, "variable", None)
        if var is not None:
            j = layer_of.get(id(var))
            if j is not None:
                out.add(j)
            continue
        for c, _ in node.next_functions:
            if c is not None and c not in seen:
                seen.add(c)
                stack.append(c)
    return frozenset(out)


def _taken(node: Any, layer_of: dict[int, int]) -> int | None:
    """The layer whose parameter ``node`` is, directly or through views only; else None."""
    while True:
        var = getattr(node, "variable", None)
        if var is not None:
            return layer_of.get(id(var))
        if type(node).__name__ not in VIEWS:
            return None
        children = [c for c, _ in node.next_functions if c is not None]
        if len(children) != 1:
            return None
        node = children[0]


def _bits(mask: int) -> list[int]:
    """The set bits of ``mask``, low to high."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


#: Operations that pass a unit's value on as it is, scaled, summed or gathered: no
#: activation, so no unit of the layer before them can die in them. Any other operation
#: on the way (a ReLU, a clamp, a LeakyReLU(0), a hardswish, a GELU, a maximum) may be one.
PASS_ON = VIEWS | frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0",
    "RsubBackward1", "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1",
    "NegBackward0", "CatBackward0", "StackBackward0", "SumBackward0", "SumBackward1",
    "MeanBackward0", "MeanBackward1", "IndexBackward0", "IndexSelectBackward0",
    "GatherBackward0", "NativeDropoutBackward0", "FlattenBackward0", "RepeatBackward0",
})


def through_activation(graph: Any, params: Sequence[Tensor], layer_index: Sequence[int],
                 layer: int) -> bool | None:
    """Whether the output of ``layer`` reaches every other layer's operation and the loss
    only through an activation (an operation outside ``PASS_ON``: a ReLU, a clamp), in
    the graph of the loss ``graph`` (a weak reference) refers to: its units can be dead.
    An embedding always given its padding id, or a branch multiplied by 0, feeds the next
    layer zeros with no activation between: found by a regression hunt, such healthy side
    branches were "dead from the start". None without a graph, or when no operation takes
    the layer's parameters. A host-side walk of the graph, no device read."""
    loss = graph() if callable(graph) else graph
    root = getattr(loss, "grad_fn", None)
    if root is None:
        return None
    layer_of = {id(p): layer_index[i] for i, p in enumerate(params)}
    consumers: dict[Any, list[Any]] = {}
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for c, _ in node.next_functions:
            if c is not None:
                consumers.setdefault(c, []).append(node)
                if c not in seen:
                    seen.add(c)
                    stack.append(c)

    def takes(node: Any) -> set[int]:
        return {j for c, _ in node.next_functions if c is not None
                and (j := _taken(c, layer_of)) is not None}

    starts = [n for n in seen if getattr(n, "variable", None) is None and layer in takes(n)]
    if not starts:
        return None
    walked, stack = set(starts), list(starts)
    while stack:
        node = stack.pop()
        ups = consumers.get(node, [])
        if not ups:
            return False  # the loss itself, with no activation on the way
        for up in ups:
            if up in walked:
                continue
            walked.add(up)
            if takes(up) - {layer}:
                return False  # another layer's operation takes it with no activation between
            if type(up).__name__ not in PASS_ON:
                continue  # an activation: what comes after it sees its zeros
            stack.append(up)
    return True
