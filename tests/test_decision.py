"""The step decision as a table: every (on_nonfinite, optimizer kind, scaler, fresh) row."""

from __future__ import annotations

import itertools

import pytest

from gradguard.decision import ON_NONFINITE, OPTIMIZER_KINDS, Plan, decide, resolve

H, D = "host", "device"
# (on_nonfinite, kind, scaler, fresh) -> (read_host, found_inf, on_bad, warn), written out
# row by row as the specification: the fused rows are the ones that matter.
TABLE: dict[tuple[str, str, bool, bool], tuple[bool, bool, str, bool]] = {}
for kind, scaler, fresh in itertools.product(OPTIMIZER_KINDS, (False, True), (False, True)):
    TABLE[("raise", kind, scaler, fresh)] = (True, scaler, "raise", False)
    TABLE[("warn", kind, scaler, fresh)] = (True, scaler, "skip", True)
    TABLE[("off", kind, scaler, fresh)] = (scaler and kind == "fused" and fresh, False, "step", False)
TABLE.update({
    # plain / foreach: the skip flag is read on the host (one sync) unless a scaler skips
    ("skip", "plain", False, False): (True, False, "skip", False),
    ("skip", "plain", False, True): (True, False, "skip", False),
    ("skip", "foreach", False, False): (True, False, "skip", False),
    ("skip", "foreach", False, True): (True, False, "skip", False),
    ("skip", "plain", True, False): (False, True, "skip", False),
    ("skip", "plain", True, True): (False, True, "skip", False),
    ("skip", "foreach", True, False): (False, True, "skip", False),
    ("skip", "foreach", True, True): (False, True, "skip", False),
    # fused: found_inf on the device, except on a step that would create the state
    ("skip", "fused", False, False): (False, True, "skip", False),
    ("skip", "fused", False, True): (True, False, "skip", False),
    ("skip", "fused", True, False): (False, True, "skip", False),
    ("skip", "fused", True, True): (True, True, "skip", False),
})


def test_the_table_covers_every_row():
    rows = set(itertools.product(ON_NONFINITE, OPTIMIZER_KINDS, (False, True), (False, True)))
    assert set(TABLE) == rows and len(rows) == 48


@pytest.mark.parametrize(("row", "expected"), sorted(TABLE.items()))
def test_decide_row(row, expected):
    on_nonfinite, kind, scaler, fresh = row
    plan = decide(on_nonfinite=on_nonfinite, kind=kind, scaler=scaler, fresh=fresh)
    assert plan == Plan(*expected)


def test_a_fresh_fused_state_is_never_skipped_on_the_device():
    for on_nonfinite, scaler in itertools.product(ON_NONFINITE, (False, True)):
        plan = decide(on_nonfinite=on_nonfinite, kind="fused", scaler=scaler, fresh=True)
        # either the host reads the flag, or nothing can skip (off, no scaler)
        assert plan.read_host or (on_nonfinite == "off" and not scaler)


@pytest.mark.parametrize(
    ("on_bad", "bad", "overflow", "action"),
    [
        ("skip", False, False, "step"),
        ("skip", True, False, "skip"),
        ("skip", True, True, "skip"),
        ("skip", False, True, "skip"),  # a scaler's overflow is always skipped
        ("raise", True, False, "raise"),
        ("raise", False, True, "skip"),  # a routine overflow never raises
        ("raise", False, False, "step"),
        ("step", True, False, "step"),  # on_nonfinite="off"
        ("step", True, True, "skip"),  # ... but the scaler still skips its overflow
    ],
)
def test_resolve_row(on_bad, bad, overflow, action):
    plan = Plan(read_host=True, found_inf=False, on_bad=on_bad)
    assert resolve(plan, bad=bad, overflow=overflow) == action


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'"), ({"kind": "apex"}, "kind='apex'")],
)
def test_bad_arguments_name_the_allowed_values(kwargs, match):
    args = {"on_nonfinite": "skip", "kind": "plain", "scaler": False, "fresh": False} | kwargs
    with pytest.raises(ValueError, match=match):
        decide(**args)
