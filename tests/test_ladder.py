"""The recovery ladder's transitions as a table: (state, trigger) -> (state, actions)."""

from __future__ import annotations

import dataclasses

import pytest

from gradguard.recovery import Action, LadderConfig, LadderState, Trigger, transition

CFG = LadderConfig(skip_patience=2, backoff=0.1, restore_steps=10, patience=20,
                   snapshot_every=5, keep=2, max_rollbacks=2, relapse_backoff=0.5,
                   relapse_window=50, recovery_window=30, stall_factor=1.5)
S0 = LadderState()
BACKED = LadderState(factor=0.1, backoff_level=0.1, backoff_step=100, last_trigger=100,
                     trouble_start=100, backoffs=1, consecutive_skips=2, last_snapshot=90,
                     pre_level=2.0, watching=100)


def st(**kw):
    return dataclasses.replace(S0, **kw)


def b(**kw):
    return dataclasses.replace(BACKED, **kw)


A01 = pytest.approx(0.01)  # 0.1 * 0.1 in floating point
REASON = "2 consecutive non-finite steps skipped"
SPIKY = "2 consecutive spiking steps skipped"
STALLED = ("the loss (3.1) did not come back to its level before the trouble (2) within 30 "
           "steps")
ROWS = [
    # (name, state, trigger, new state, actions)
    ("clean resets the skip count", st(consecutive_skips=1), Trigger("clean", 5),
     st(), ()),
    ("one skip below patience only counts", S0, Trigger("skip", 5),
     st(consecutive_skips=1), ()),
    ("skip_patience skips back off, keeping the state before the streak: the next step "
     "tests the weights", st(consecutive_skips=1), Trigger("skip", 6),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0),
     (Action("backoff", 6, REASON, 0.1, 1.0),)),
    ("a step taken right after proves the weights sound: the back-off is undone",
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0, last_snapshot=5),
     Trigger("clean", 7), st(undone=7, last_snapshot=5),
     (Action("sound", 7, "the first step taken on the weights of the 2 non-finite step(s) "
             "before it is finite", 1.0, 1.0),)),
    ("a step whose update was voided proves nothing", b(undo=S0), Trigger("clean", 101, voided=True),
     b(undo=S0, consecutive_skips=0), ()),
    ("the streak going on after the back-off runs on the same weights: the test waits",
     b(undo=S0, untested=100), Trigger("skip", 101),
     b(consecutive_skips=3, untested=100, undo=S0), ()),
    ("a rung that changes the weights ends the test",
     b(undo=S0, untested=100, consecutive_skips=3), Trigger("skip", 102),
     b(consecutive_skips=0, untested=102, factor=A01, backoff_level=A01, backoff_step=102,
       last_trigger=102, ceiling=1.0, rollbacks=1, total_rollbacks=1, watching=102),
     (Action("rollback", 102, "4 consecutive non-finite steps skipped", A01, 1.0, True,
             False, 0, 3, 1),)),
    ("a spiking streak within patience of an undone one: the back-off stands (not a relapse)",
     st(consecutive_skips=1, undone=90), Trigger("skip", 100, "spiking"),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=100,
        last_trigger=100, trouble_start=100, backoffs=1, watching=100, untested=100,
        undone=90),
     (Action("backoff", 100, SPIKY, 0.1, 1.0),)),
    ("a non-finite one: the next step tests its weights again (finite there, the batches "
     "are at fault each time: a NaN in a share of the batches)",
     st(consecutive_skips=1, undone=90), Trigger("skip", 100),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=100,
        last_trigger=100, trouble_start=100, backoffs=1, watching=100, untested=100,
        undone=90, undo=st(undone=90)),
     (Action("backoff", 100, REASON, 0.1, 1.0),)),
    ("a non-finite streak within patience of the last rung backs off first (the next step "
     "tests its weights), where another trouble rolls back",
     st(consecutive_skips=1, last_trigger=90, trouble_start=90), Trigger("skip", 100),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=100, ceiling=0.5,
        last_trigger=100, trouble_start=90, backoffs=1, watching=100, untested=100,
        episode_ceiling=1.0,
        undo=st(last_trigger=90, trouble_start=90)),
     (Action("backoff", 100, REASON, 0.1, 0.5, True, True),)),
    ("an off-scale streak (a batch on another scale, seen in the batch norm statistics) "
     "is data too: its back-off waits for the next step",
     st(consecutive_skips=1), Trigger("skip", 6, "off-scale"),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0,
        undo_reason="off-scale"),
     (Action("backoff", 6, "2 consecutive off-scale steps skipped", 0.1, 1.0),)),
    ("... and a clean step on the same weights undoes it, saying what the streak was",
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0,
        undo_reason="off-scale"),
     Trigger("clean", 7), st(undone=7),
     (Action("sound", 7, "the first step taken on the weights of the 2 off-scale step(s) "
             "before it is clean", 1.0, 1.0),)),
    ("a spiking streak is data too: its back-off waits for the next step (a skipped step "
     "changes no weight)",
     st(consecutive_skips=1), Trigger("skip", 6, "spiking"),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0, undo_reason="spiking"),
     (Action("backoff", 6, SPIKY, 0.1, 1.0),)),
    ("... and a clean step on the same weights undoes it",
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, untested=6, undo=S0, undo_reason="spiking"),
     Trigger("clean", 7), st(undone=7),
     (Action("sound", 7, "the first step taken on the weights of the 2 spiking step(s) "
             "before it is clean", 1.0, 1.0),)),
    ("spike skips back off too, remembering the loss level before the trouble",
     st(consecutive_skips=1), Trigger("skip", 6, "spiking", 2.5),
     st(consecutive_skips=2, factor=0.1, backoff_level=0.1, backoff_step=6, last_trigger=6,
        trouble_start=6, backoffs=1, watching=6, pre_level=2.5, untested=6, undo=S0,
        undo_reason="spiking"),
     (Action("backoff", 6, SPIKY, 0.1, 1.0),)),
    ("skips for the loss itself roll back at once: the update before them wrecked the weights",
     st(consecutive_skips=1, last_snapshot=-1), Trigger("skip", 3, "loss-spiking", 2.3, rollback=True),
     st(consecutive_skips=0, factor=0.1, backoff_level=0.1, backoff_step=3, last_trigger=3,
        trouble_start=3, ceiling=0.5, pre_level=2.3, watching=3, rollbacks=1,
        total_rollbacks=1, last_snapshot=-1, episode_ceiling=1.0, untested=3),
     (Action("rollback", 3, "2 consecutive loss-spiking steps skipped: the update before them "
             "wrecked the weights", 0.1, 0.5, True, True, 0, 1, 1),)),
    ("a skip replayed at a flush from before the last rung took effect is that trouble, "
     "not a new one", b(backoff_step=49), Trigger("skip", 30, "spiking", at=49),
     b(backoff_step=49), ()),
    ("a loss spike confirmed at a flush, begun at or before the rung its skipped steps "
     "took, is that trouble, not a second one", b(backoff_step=62),
     Trigger("spike", 60, "confirmed loss spike", at=69, confirmed=True), b(backoff_step=62), ()),
    ("a loss spike confirmed at a flush, begun after the last rung, escalates",
     b(backoff_step=62, last_trigger=62, trouble_start=50),
     Trigger("spike", 64, "confirmed", at=69, confirmed=True),
     b(backoff_step=69, last_trigger=64, trouble_start=50, factor=A01, backoff_level=A01,
       ceiling=0.05, watching=69, consecutive_skips=0, rollbacks=1, total_rollbacks=1,
       episode_ceiling=1.0, untested=69),
     (Action("rollback", 64, "confirmed", A01, 0.05, True, True, 0, 15, 1),)),
    ("a lone loss-spiking skip only counts", S0, Trigger("skip", 3, "loss-spiking", 2.3,
                                                         rollback=True),
     st(consecutive_skips=1), ()),
    ("a confirmed spike backs off", S0, Trigger("spike", 7, "spike!"),
     st(factor=0.1, backoff_level=0.1, backoff_step=7, last_trigger=7, trouble_start=7,
        backoffs=1, watching=7, untested=7),
     (Action("backoff", 7, "spike!", 0.1, 1.0),)),
    ("a spike whose weights are worse than the newest snapshot's rolls back at once",
     S0, Trigger("spike", 7, "rose!", 2.0, rollback=True),
     st(factor=0.1, backoff_level=0.1, backoff_step=7, last_trigger=7, trouble_start=7,
        ceiling=0.5, pre_level=2.0, watching=7, rollbacks=1, total_rollbacks=1,
        episode_ceiling=1.0, untested=7),
     (Action("rollback", 7, "rose!", 0.1, 0.5, True, True, 0, 1, 1),)),
    ("... and in a run never below its fresh level, at the back-off factor itself: no factor "
     "in force trained it", S0, Trigger("spike", 7, "rose!", 2.0, rollback=True, by_level=True,
                                        worse_than_fresh=True),
     st(factor=0.1, backoff_level=0.1, backoff_step=7, last_trigger=7, trouble_start=7,
        ceiling=0.1, pre_level=2.0, watching=7, rollbacks=1, total_rollbacks=1,
        episode_ceiling=1.0, untested=7),
     (Action("rollback", 7, "rose!", 0.1, 0.1, True, True, 0, 1, 1, by_level=True),)),
    ("a back-off (no rollback) in such a run keeps the ceiling", S0,
     Trigger("spike", 7, "rose!", 2.0, by_level=True, worse_than_fresh=True),
     st(factor=0.1, backoff_level=0.1, backoff_step=7, last_trigger=7, trouble_start=7,
        backoffs=1, pre_level=2.0, watching=7, untested=7),
     (Action("backoff", 7, "rose!", 0.1, 1.0, by_level=True),)),
    ("the first step after a back-off uses the back-off factor", BACKED, Trigger("tick", 101),
     BACKED, ()),
    ("a tick restores linearly", BACKED, Trigger("tick", 105),
     b(factor=pytest.approx(0.46)), ()),
    ("restored fully: the back-off is over", BACKED, Trigger("tick", 111),
     b(factor=1.0, backoff_step=None), ()),
    ("trouble again within patience rolls back (relapse lowers the ceiling)", BACKED,
     Trigger("spike", 110, "again"),
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=110, last_trigger=110,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=110, episode_ceiling=1.0,
       untested=110),
     (Action("rollback", 110, "again", A01, 0.05, True, True, 0, 11, 1),)),
    ("trouble again within patience with no update taken since the back-off (every step "
     "skipped): the same trouble going on, its factor untried; roll back, the ceiling kept",
     b(untested=100), Trigger("spike", 110, "again"),
     b(factor=A01, backoff_level=A01, backoff_step=110, last_trigger=110,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=110, untested=110),
     (Action("rollback", 110, "again", A01, 1.0, True, False, 0, 11, 1),)),
    ("the first update taken after a rung tries its factor", b(untested=101),
     Trigger("clean", 101), b(consecutive_skips=0), ()),
    ("... not one the rollback voided (its backward ran on the replaced weights)",
     b(untested=101), Trigger("clean", 101, voided=True), b(consecutive_skips=0, untested=101),
     ()),
    ("... nor one from before the rung, heard late (a fused optimizer's flags)",
     b(untested=101), Trigger("clean", 99), b(consecutive_skips=0, untested=101), ()),
    ("a second rollback goes one snapshot further back", b(rollbacks=1, total_rollbacks=1),
     Trigger("spike", 110, "again"),
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=110, last_trigger=110,
       consecutive_skips=0, rollbacks=2, total_rollbacks=2, watching=110, episode_ceiling=1.0,
       untested=110),
     (Action("rollback", 110, "again", A01, 0.05, True, True, 1, 11, 2),)),
    ("max_rollbacks reached: abort", b(rollbacks=2, total_rollbacks=2),
     Trigger("spike", 110, "again"),
     b(last_trigger=110, rollbacks=2, total_rollbacks=2, watching=110),
     (Action("abort", 110, "again", 0.1, 1.0, rollbacks=2),)),
    ("trouble after patience but within the relapse window: back off, lower the ceiling",
     b(factor=1.0, backoff_step=None, watching=None), Trigger("spike", 140, "later", 3.0),
     b(factor=0.1, ceiling=0.5, backoff_step=140, last_trigger=140, trouble_start=140,
       backoffs=2, watching=140, pre_level=3.0, episode_ceiling=1.0, untested=140),
     (Action("backoff", 140, "later", 0.1, 0.5, True, True),)),
    ("an isolated incident long after: back off, ceiling kept",
     b(factor=1.0, backoff_step=None, watching=None), Trigger("spike", 400, "new", 1.5),
     b(factor=0.1, backoff_step=400, last_trigger=400, trouble_start=400, backoffs=2,
       watching=400, pre_level=1.5, untested=400),
     (Action("backoff", 400, "new", 0.1, 1.0),)),
    ("the loss came back within the recovery window: stop watching", BACKED,
     Trigger("progress", 130, value=2.9), b(watching=None), ()),
    ("too early to judge", BACKED, Trigger("progress", 120, value=9.0), BACKED, ()),
    ("a level below zero has no ratio (1.5 x -1.4 is -2.1): no evidence, stop watching "
     "(a Gaussian NLL at -1.55 after a spike from -1.43 was rolled back three times)",
     b(pre_level=-1.43), Trigger("progress", 130, value=-1.2), b(pre_level=-1.43, watching=None),
     ()),
    ("the loss did not come back: roll back to before the trouble", BACKED,
     Trigger("progress", 130, value=3.1),
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0,
       untested=130),
     (Action("rollback", 130, STALLED, A01, 0.05, True, True, 0, 31, 1, by_level=True),)),
    ("max_rollbacks reached, the loss level deciding: the level is no evidence, the "
     "ceiling its rungs lowered is lifted, the LR restores, the episode ends",
     b(rollbacks=2, total_rollbacks=2, ceiling=0.05, factor=0.01, episode_ceiling=0.5,
       watching=100),
     Trigger("progress", 130, value=3.1),
     b(rollbacks=0, total_rollbacks=2, ceiling=0.5, factor=0.01, backoff_level=0.01,
       backoff_step=130, last_trigger=130, watching=None, trouble_start=None,
       pre_level=None, level_off=True),
     (Action("level_off", 130, STALLED, 0.01, 0.5, rollbacks=2, by_level=True),)),
    ("the first step on restored weights is non-finite: the batches are at fault; the "
     "episode ends, the ceiling it lowered is lifted",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0),
     Trigger("skip", 131, "non-finite", 2.0, data=True),
     b(factor=A01, ceiling=1.0, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=0, total_rollbacks=1, watching=None, trouble_start=None,
       pre_level=None, data_streak=131),
     (Action("data", 131, "non-finite", A01, 1.0),)),
    ("the weights a rollback restored gave the trouble's loss: the batches changed; the "
     "episode ends, the ceiling it lowered is lifted, the factor is back at it at once, "
     "and the next trouble is no relapse",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=1, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0,
       untested=130),
     Trigger("shifted", 134),
     b(factor=1.0, ceiling=1.0, backoff_level=1.0, backoff_step=None, last_trigger=None,
       consecutive_skips=0, rollbacks=0, total_rollbacks=1, watching=None, trouble_start=None,
       pre_level=None, shifted=134, shift_ceiling=1.0),
     (Action("shifted", 134, "", 1.0, 1.0, rollbacks=1),)),
    ("a second change within relapse_window steps: the loss moves by itself, the loss-level "
     "tests go off too",
     b(rollbacks=1, total_rollbacks=2, shifted=100), Trigger("shifted", 140),
     b(factor=1.0, ceiling=1.0, backoff_level=1.0, backoff_step=None, last_trigger=None,
       consecutive_skips=0, rollbacks=0, total_rollbacks=2, watching=None, trouble_start=None,
       pre_level=None, shifted=140, shift_ceiling=1.0, level_off=True),
     (Action("shifted", 140, "", 1.0, 1.0, rollbacks=2),
      Action("level_off", 140, "the batches changed again 40 steps after they last did "
             "(step 100)", 1.0, 1.0, rollbacks=2, by_level=True))),
    ("after a change, a rollback the loss level decides is allowed once, and counted",
     b(shifted=100), Trigger("progress", 130, value=3.1),
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0,
       untested=130, shifted=100, level_rollbacks=1),
     (Action("rollback", 130, STALLED, A01, 0.05, True, True, 0, 31, 1, by_level=True),)),
    ("after a change, the second rollback in a row the loss level decides turns the loss "
     "tests off: the loss moves by itself",
     b(rollbacks=1, total_rollbacks=2, shifted=100, level_rollbacks=1, watching=100),
     Trigger("progress", 130, value=3.1),
     b(rollbacks=0, total_rollbacks=2, shifted=100, level_rollbacks=1, watching=None,
       last_trigger=130, trouble_start=None, pre_level=None, backoff_step=130,
       backoff_level=0.1, level_off=True),
     (Action("level_off", 130, STALLED + " (the batches changed by themselves at step 100)",
             0.1, 1.0, rollbacks=2, by_level=True),)),
    ("a change long after the last is a change like the first",
     b(rollbacks=1, total_rollbacks=2, shifted=10), Trigger("shifted", 140),
     b(factor=1.0, ceiling=1.0, backoff_level=1.0, backoff_step=None, last_trigger=None,
       consecutive_skips=0, rollbacks=0, total_rollbacks=2, watching=None, trouble_start=None,
       pre_level=None, shifted=140, shift_ceiling=1.0),
     (Action("shifted", 140, "", 1.0, 1.0, rollbacks=2),)),
    ("after a change, the loss tests going off lift the ceiling to where the change left it, "
     "though a rung the level decided lowered it in an episode that settled since",
     b(factor=0.1, ceiling=0.1, backoff_level=0.1, rollbacks=1, total_rollbacks=3,
       shifted=100, shift_ceiling=1.0, level_rollbacks=1, watching=100),
     Trigger("progress", 130, value=3.1),
     b(factor=0.1, ceiling=1.0, rollbacks=0, total_rollbacks=3, shifted=100, shift_ceiling=1.0,
       level_rollbacks=1, watching=None, last_trigger=130, trouble_start=None, pre_level=None,
       backoff_step=130, backoff_level=0.1, level_off=True),
     (Action("level_off", 130, STALLED + " (the batches changed by themselves at step 100)",
             0.1, 1.0, rollbacks=3, by_level=True),)),
    ("the streak's next non-finite steps are skipped, nothing else",
     b(data_streak=131, consecutive_skips=0), Trigger("skip", 140, "non-finite", 2.0),
     b(data_streak=131, consecutive_skips=0), ()),
    ("a taken step ends the streak", b(data_streak=131), Trigger("clean", 141),
     b(consecutive_skips=0), ()),
    ("off-scale on restored weights: the batches are at fault, as for non-finite ones",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0),
     Trigger("skip", 131, "off-scale", 2.0, data=True),
     b(factor=A01, ceiling=1.0, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=0, total_rollbacks=1, watching=None, trouble_start=None,
       pre_level=None, data_streak=131),
     (Action("data", 131, "off-scale", A01, 1.0),)),
    ("spiking on restored weights: the batches are at fault (once per patience steps)",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=1, total_rollbacks=1, watching=130, episode_ceiling=1.0),
     Trigger("skip", 131, "spiking", 2.0, data=True),
     b(factor=A01, ceiling=1.0, backoff_level=A01, backoff_step=130, last_trigger=130,
       consecutive_skips=0, rollbacks=0, total_rollbacks=1, watching=None, trouble_start=None,
       pre_level=None, data_streak=131, spike_data=131),
     (Action("data", 131, "spiking", A01, 1.0),)),
    ("... and again within patience steps of that (a stretch broken up by harmless batches)",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=0, rollbacks=1, total_rollbacks=2, watching=200, spike_data=190,
       episode_ceiling=1.0),
     Trigger("skip", 201, "spiking", 2.0, data=True),
     b(factor=A01, ceiling=1.0, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=0, rollbacks=0, total_rollbacks=2, watching=None, trouble_start=None,
       pre_level=None, data_streak=201, spike_data=190),
     (Action("data", 201, "spiking", A01, 1.0),)),
    ("... batches that still spike on restored weights after patience steps climb the "
     "ladder (a change no shift test saw)",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=0, rollbacks=1, total_rollbacks=2, watching=200, spike_data=170),
     Trigger("skip", 201, "spiking", 2.0, data=True),
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=1, rollbacks=1, total_rollbacks=2, watching=200, spike_data=170),
     ()),
    ("... and long after, a new stretch is data again",
     b(factor=A01, ceiling=0.05, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=0, rollbacks=1, total_rollbacks=2, watching=200, spike_data=150,
       episode_ceiling=1.0),
     Trigger("skip", 201, "spiking", 2.0, data=True),
     b(factor=A01, ceiling=1.0, backoff_level=A01, backoff_step=200, last_trigger=200,
       consecutive_skips=0, rollbacks=0, total_rollbacks=2, watching=None, trouble_start=None,
       pre_level=None, data_streak=201, spike_data=201),
     (Action("data", 201, "spiking", A01, 1.0),)),
    ("a streak of patience off-scale steps stops the run, naming them",
     b(data_streak=131), Trigger("skip", 151, "off-scale"), b(data_streak=131),
     (Action("abort", 151, "21 steps in a row off-scale on weights that had finite "
             "gradients: the batches (their inputs or targets, or the loss on them) stay "
             "off-scale", 0.1, 1.0, data=True),)),
    ("a streak of patience steps stops the run",
     b(data_streak=131), Trigger("skip", 151, "non-finite"), b(data_streak=131),
     (Action("abort", 151, "21 steps in a row non-finite on weights that had finite gradients: "
             "the batches (their inputs or targets, or the loss on them, or the backward "
             "through them) stay non-finite",
             0.1, 1.0, data=True),)),
    ("with the level off, a loss that did not come back ends the watch, no rung",
     b(level_off=True), Trigger("progress", 130, value=9.0), b(level_off=True, watching=None),
     ()),
    ("with the level off, non-finite trouble still aborts at max_rollbacks",
     b(rollbacks=2, total_rollbacks=2, level_off=True), Trigger("spike", 110, "again"),
     b(last_trigger=110, rollbacks=2, total_rollbacks=2, watching=110, level_off=True),
     (Action("abort", 110, "again", 0.1, 1.0, rollbacks=2),)),
    ("at a lowered ceiling: start counting", b(factor=0.25, ceiling=0.25, backoff_step=None),
     Trigger("tick", 150), b(factor=0.25, ceiling=0.25, backoff_step=None, at_ceiling=150), ()),
    ("restore_steps at the ceiling: settled, once",
     b(factor=0.25, ceiling=0.25, backoff_step=None, at_ceiling=150), Trigger("tick", 160),
     b(factor=0.25, ceiling=0.25, backoff_step=None, at_ceiling=150, settled=0.25),
     (Action("settled", 160, factor=0.25, ceiling=0.25),)),
    ("a mild rise within patience of the last trigger: back off, lower, never roll back",
     b(factor=0.25, ceiling=0.25, backoff_step=None, watching=None, rollbacks=1),
     Trigger("spike", 110, "rose", 1.0, mild=True),
     b(factor=0.025, ceiling=0.125, backoff_level=0.025, backoff_step=110, last_trigger=110,
       watching=None, rollbacks=1, backoffs=2, untested=110),
     (Action("backoff", 110, "rose", 0.025, 0.125, True, True),)),
    ("a mild rise long after the last trigger still lowers the ceiling (no relapse)",
     b(factor=0.25, ceiling=0.25, backoff_step=None, watching=None), Trigger("spike", 900,
                                                                          "rose", mild=True),
     b(factor=0.025, ceiling=0.125, backoff_level=0.025, backoff_step=900, last_trigger=900,
       watching=None, backoffs=2, untested=900),
     (Action("backoff", 900, "rose", 0.025, 0.125, False, True),)),
    ("a first mild rise (a bounce): the LR in force failed, the ceiling halves",
     S0, Trigger("spike", 49, "bounced", 0.2, mild=True),
     st(factor=0.1, ceiling=0.5, backoff_level=0.1, backoff_step=49, last_trigger=49,
        backoffs=1, untested=49),
     (Action("backoff", 49, "bounced", 0.1, 0.5, False, True),)),
    ("the LR probe found the LR too high: factor and ceiling halve, no back-off, probation",
     st(last_snapshot=100), Trigger("lower", 149, "probed"),
     st(factor=0.5, ceiling=0.5, last_trigger=149, last_snapshot=100),
     (Action("lower", 149, "probed", 0.5, 0.5, lowered=True),)),
    ("a second finding halves again from the factor in force",
     st(factor=0.5, ceiling=0.5, settled=0.5, last_trigger=149), Trigger("lower", 400, "again"),
     st(factor=0.25, ceiling=0.25, settled=0.5, last_trigger=400),
     (Action("lower", 400, "again", 0.25, 0.25, lowered=True),)),
    ("the LR probe's finding is the LR's own doing: no ceiling before it to try again",
     st(factor=0.25, ceiling=0.25, settled=0.25, episode_ceiling=1.0, last_trigger=149),
     Trigger("lower", 400, "probed"),
     st(factor=0.125, ceiling=0.125, settled=0.25, last_trigger=400),
     (Action("lower", 400, "probed", 0.125, 0.125, lowered=True),)),
    ("a retry found the ceiling before the trouble trains: ceiling and factor back at it at "
     "once, settled, the episode over",
     st(factor=0.0125, ceiling=0.0125, settled=0.0125, episode_ceiling=1.0, last_trigger=220,
        backoff_level=0.01, last_snapshot=1200),
     Trigger("raise", 1259, "retried", value=1.0),
     st(factor=1.0, ceiling=1.0, settled=1.0, last_trigger=220, backoff_level=1.0,
        last_snapshot=1200, raised=1259, raised_from=0.0125),
     (Action("raised", 1259, "retried", 1.0, 1.0),)),
    ("a cap the first batch set (wreck.first_batch_at_fault): the ceiling back, the factor "
     "restoring to it from where it is, nothing settled",
     st(factor=0.009, ceiling=0.009, episode_ceiling=1.0, last_trigger=5, backoff_level=0.0009,
        backoff_step=None),
     Trigger("raise", 19, "the run's first batch ...", value=1.0, data=True),
     st(factor=0.009, ceiling=1.0, last_trigger=5, backoff_level=0.009, backoff_step=19),
     (Action("raised", 19, "the run's first batch ...", 0.009, 1.0),)),
    ("a retry of a ceiling an earlier trouble had lowered: back at that one, settled",
     st(factor=0.05, ceiling=0.05, settled=0.05, episode_ceiling=0.25, last_trigger=220),
     Trigger("raise", 1259, "retried", value=0.25),
     st(factor=0.25, ceiling=0.25, settled=0.25, last_trigger=220, backoff_level=0.25,
        raised=1259, raised_from=0.05),
     (Action("raised", 1259, "retried", 0.25, 0.25),)),
    ("the first trouble after a raise is a relapse: the LR retried failed, the ceiling "
     "drops straight back to the one that had held",
     st(factor=1.0, ceiling=1.0, settled=1.0, last_trigger=220, raised=1259,
        raised_from=0.0125),
     Trigger("spike", 1300, "spiked", 0.2),
     st(factor=0.0125, ceiling=0.0125, settled=1.0, last_trigger=1300, backoffs=1,
        trouble_start=1300, pre_level=0.2, watching=1300, backoff_step=1300,
        backoff_level=0.0125, episode_ceiling=1.0, untested=1300),
     (Action("backoff", 1300, "spiked", 0.0125, 0.0125, True, True),)),
    ("trouble long after a raise is no relapse of it",
     st(factor=1.0, ceiling=1.0, settled=1.0, last_trigger=220, raised=1259,
        raised_from=0.0125),
     Trigger("spike", 2300, "spiked", 0.2),
     st(factor=0.1, ceiling=1.0, settled=1.0, last_trigger=2300, backoffs=1,
        trouble_start=2300, pre_level=0.2, watching=2300, backoff_step=2300,
        backoff_level=0.1, untested=2300, raised=1259, raised_from=0.0125),
     (Action("backoff", 2300, "spiked", 0.1, 1.0),)),
    ("a rollback to weights taken above the level before the trouble: the progress check "
     "asks for their level", b(pre_level=0.02), Trigger("restored", 110, value=0.06),
     b(pre_level=0.06), ()),
    ("... and keeps the level before the trouble when the weights were below it",
     b(pre_level=0.02), Trigger("restored", 110, value=0.01), b(pre_level=0.02), ()),
    ("... or their level is unknown", b(pre_level=0.02), Trigger("restored", 110),
     b(pre_level=0.02), ()),
    ("healthy and due: snapshot", st(last_snapshot=0), Trigger("healthy", 9),
     st(last_snapshot=0), (Action("snapshot", 9),)),
    ("healthy but not due: nothing", st(last_snapshot=6), Trigger("healthy", 9),
     st(last_snapshot=6), ()),
    ("healthy while backed off: no snapshot", BACKED, Trigger("healthy", 101), BACKED, ()),
    ("healthy while the LR restores, the loss back: snapshot (the next rollback needs one)",
     b(watching=None, factor=0.3), Trigger("healthy", 101), b(watching=None, factor=0.3),
     (Action("snapshot", 101),)),
    ("a rollback forced long after the last trouble is a new one, from its own level",
     b(watching=None, factor=1.0, backoff_step=None), Trigger("spike", 300, "rose!", 0.5,
                                                              rollback=True),
     b(factor=0.1, ceiling=0.5, backoff_level=0.1, backoff_step=300, last_trigger=300,
       trouble_start=300, pre_level=0.5, watching=300, consecutive_skips=0, rollbacks=1,
       total_rollbacks=1, episode_ceiling=1.0, untested=300),
     (Action("rollback", 300, "rose!", 0.1, 0.5, True, True, 0, 1, 1),)),
    ("a kept snapshot clears the rollback count", b(rollbacks=2), Trigger("snapshot", 120),
     b(rollbacks=0, last_snapshot=120), ()),
    ("a wreck's update measured: the ceiling drops to the cap, the factor and the level it "
     "restores from with it; the ceiling before is the episode's (batches proved at fault "
     "after all give it back)",
     b(factor=0.1, ceiling=0.5, backoff_level=0.1), Trigger("capped", 3, value=0.02),
     b(factor=0.02, ceiling=0.02, backoff_level=0.02, episode_ceiling=0.5), ()),
    ("... an episode's ceiling already kept stays",
     b(factor=0.1, ceiling=0.5, backoff_level=0.1, episode_ceiling=1.0),
     Trigger("capped", 3, value=0.02),
     b(factor=0.02, ceiling=0.02, backoff_level=0.02, episode_ceiling=1.0), ()),
    ("... a cap above the ceiling changes nothing",
     b(factor=0.1, ceiling=0.5, backoff_level=0.1), Trigger("capped", 3, value=0.7),
     b(factor=0.1, ceiling=0.5, backoff_level=0.1), ()),
    ("... and one between the factor and the ceiling lowers the ceiling only",
     b(factor=0.1, ceiling=0.5, backoff_level=0.1), Trigger("capped", 3, value=0.3),
     b(factor=0.1, ceiling=0.3, backoff_level=0.1, episode_ceiling=0.5), ()),
    ("weights an update made NaN: a rollback at once, at the LR in force (no relapse, no "
     "back-off, the ceiling kept)",
     st(factor=0.4, ceiling=0.5, last_trigger=2, consecutive_skips=0),
     Trigger("weights", 9, "nan weights"),
     st(factor=0.4, ceiling=0.5, last_trigger=2, rollbacks=1, total_rollbacks=1),
     (Action("rollback", 9, "nan weights", 0.4, 0.5, rollbacks=1),)),
    ("... counted towards max_rollbacks like any: a cause that stays aborts",
     st(rollbacks=2, total_rollbacks=2), Trigger("weights", 9, "nan weights"),
     st(rollbacks=2, total_rollbacks=2),
     (Action("abort", 9, "nan weights", 1.0, 1.0, rollbacks=2),)),
]


@pytest.mark.parametrize(("name", "state", "trigger", "expected", "actions"), ROWS,
                         ids=[r[0] for r in ROWS])
def test_transition_row(name, state, trigger, expected, actions):
    new, todo = transition(CFG, state, trigger)
    # the lowest factor that failed is kept by one rule for every row (test_failed_factor_*),
    # and so is the count of ceilings lowered in a row (test_a_lowered_ceiling_that_fails_*)
    # and the regular snapshot pace (test_a_snapshot_for_a_falling_loss_keeps_the_pace)
    assert dataclasses.replace(new, failed=None, lowerings=0, last_regular=None) == expected
    assert todo == actions


def test_failed_factor_is_the_factor_in_force_when_the_ceiling_was_lowered():
    """``failed``: a halving from the factor in force keeps the settled ceiling within a
    halving of it; a run worse than fresh jumps to the back-off factor, 10x under it; a
    wreck's cap is no failure of the factor in force; a ceiling lifted again drops it."""
    new, _ = transition(CFG, S0, Trigger("spike", 7, "rose!", 2.0, rollback=True))
    assert (new.ceiling, new.failed) == (0.5, 1.0)
    jump, _ = transition(CFG, S0, Trigger("spike", 7, "rose!", 2.0, rollback=True,
                                          by_level=True, worse_than_fresh=True))
    assert (jump.ceiling, jump.failed) == (0.1, 1.0)
    again, _ = transition(CFG, dataclasses.replace(jump, factor=0.1, last_trigger=7, untested=None),
                          Trigger("spike", 20, "rose again", 2.0, rollback=True))
    assert (again.ceiling, again.failed) == (0.05, 0.1)  # now within a halving
    capped, _ = transition(CFG, new, Trigger("capped", 8, value=0.3))
    assert (capped.ceiling, capped.failed) == (0.3, 1.0)
    lifted, _ = transition(CFG, dataclasses.replace(new, ceiling=0.5, factor=0.5, settled=0.5),
                           Trigger("raise", 300, "retried", value=1.0))
    assert (lifted.ceiling, lifted.failed) == (1.0, None)


def test_a_lowered_ceiling_that_fails_again_drops_further_each_time():
    """An exponential search from above: a ceiling lowered in a row (none settled between)
    halves at its first two failures, then drops by relapse_backoff once more each time
    (x0.25, then x0.125); once a ceiling settled, the next failure halves it again."""
    st, ceilings = S0, []
    for k in range(5):
        step = 10 + 20 * k
        st, _ = transition(CFG, dataclasses.replace(st, factor=st.ceiling, untested=None),
                           Trigger("spike", step, "rose", 2.0, rollback=True))
        st = dataclasses.replace(st, rollbacks=0)  # a healthy snapshot between them
        ceilings.append(st.ceiling)
    assert ceilings == pytest.approx([0.5, 0.25, 0.25 / 4, 0.25 / 32, 0.25 / 256])
    assert st.lowerings == 5
    settled = dataclasses.replace(st, settled=st.ceiling)
    again, _ = transition(CFG, dataclasses.replace(settled, factor=settled.ceiling, untested=None),
                          Trigger("spike", 120, "rose", 2.0, rollback=True))
    assert again.ceiling == pytest.approx(settled.ceiling / 2) and again.lowerings == 1


def test_a_snapshot_for_a_falling_loss_keeps_the_pace():
    """Snapshots come every snapshot_every steps from the last regular one; a healthy flush
    whose loss fell well below the newest snapshot's level (improved) adds one in between,
    at most every IMPROVED_EVERY steps, without moving the pace."""
    from gradguard.recovery.ladder import IMPROVED_EVERY, IMPROVED_REASON

    cfg = dataclasses.replace(CFG, snapshot_every=100)
    st = dataclasses.replace(S0, last_snapshot=0, last_regular=0)
    _, todo = transition(cfg, st, Trigger("healthy", IMPROVED_EVERY - 1, improved=True))
    assert todo == ()  # too soon after the last
    _, todo = transition(cfg, st, Trigger("healthy", IMPROVED_EVERY, improved=True))
    assert todo == (Action("snapshot", IMPROVED_EVERY, IMPROVED_REASON),)
    st, _ = transition(cfg, st, Trigger("snapshot", IMPROVED_EVERY, improved=True))
    assert (st.last_snapshot, st.last_regular) == (IMPROVED_EVERY, 0)
    _, todo = transition(cfg, st, Trigger("healthy", cfg.snapshot_every))  # the pace holds
    assert todo == (Action("snapshot", cfg.snapshot_every),)


def test_transition_is_pure():
    before = dataclasses.replace(BACKED)
    transition(CFG, BACKED, Trigger("spike", 110))
    assert before == BACKED


def test_unknown_trigger_is_refused():
    with pytest.raises(ValueError, match="kind='boom'"):
        transition(CFG, S0, Trigger("boom", 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(("relapse", "says"), [
    (True, "the trouble came back"),
    (False, "the LR in force is too high for the loss to settle"),
])
def test_a_lowered_ceiling_says_why_it_was_lowered(relapse, says):
    """A ceiling lowered by a relapse says the trouble came back; one lowered by a mild rise
    long after the last trigger (no relapse) must not claim that."""
    from gradguard.recovery.messages import backoff_event
    ev = backoff_event(Action("backoff", 900, "rose", 0.025, 0.125, relapse, True), 100)
    assert ev.message.endswith(f"to x0.125 only ({says})")
    assert ev.data["relapse"] is relapse
