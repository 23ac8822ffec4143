"""What mutation testing of the forwarder's planner found untested (docs/testing.md).

Each test pins down a rule of `ForwardPlanner` that a surviving mutant broke without any other
fast test noticing: the per-document backoff of `defer` grows and `reset_all` restarts it; a
success ends the failure series; a document that `defer`, `forget` or `note_synced` took back
is no longer "out in a batch", so later changes are covered by the next confirmation; a late
change keeps its priority and age; and taking back a document the planner does not hold is
harmless.
"""

from __future__ import annotations

import random

import pytest

from uplink._forwarder import MAX_DOCS, PRIORITY_METER, PRIORITY_STATE, ForwardPlanner


class Highest(random.Random):
    """Backoff delays at the top of their range, so the test can name them."""

    def uniform(self, a: float, b: float) -> float:
        return b


def planner(**kwargs) -> ForwardPlanner:
    return ForwardPlanner(Highest(), base_delay=1.0, max_delay=60.0, **kwargs)


def test_defer_backs_off_per_document_and_reset_all_restarts_it():
    p = planner()
    p.note_change("d", PRIORITY_STATE, 100)
    assert [p.defer("d", 10.0) - 10.0 for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    p.reset_all()
    assert p.defer("d", 20.0) == 21.0


def test_a_success_ends_the_failure_series():
    p = planner()
    p.note_change("d", PRIORITY_STATE, 100)
    assert p.on_failure(0.0) == 1.0 and p.on_failure(1.0) == 3.0
    p.on_success(3.0)
    assert p.on_failure(5.0) == 6.0  # base delay again, not the third step of the old series


def _changes_after_are_covered(p: ForwardPlanner) -> None:
    """Two changes noted now, then a confirmation: nothing stays waiting (the document is not
    out in a batch, so no change counts as late)."""
    p.note_change("d", PRIORITY_METER, 10)
    p.note_change("d", PRIORITY_METER, 10)
    p.note_synced("d")
    assert not p.is_waiting("d")


def test_a_deferred_document_is_no_longer_out_in_a_batch():
    p = planner()
    p.note_change("d", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["d"]
    p.defer("d", 0.0)
    _changes_after_are_covered(p)


def test_a_forgotten_document_is_no_longer_out_known_or_waiting():
    p = planner()
    p.forget("never-seen")  # harmless
    p.note_change("d", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["d"]
    p.forget("d")
    assert not p.is_waiting("d")
    _changes_after_are_covered(p)
    q = planner()
    q.note_change("d", PRIORITY_STATE, 100)
    q.note_synced("d")
    q.forget("d")
    q.reset_all()  # a new leader re-confirms what it knows: not a forgotten document
    assert not q.is_waiting("d") and q.next_batch(0.0) == []


def test_a_confirmed_document_is_no_longer_out_in_a_batch():
    p = planner()
    p.note_synced("never-seen")  # harmless
    p.note_change("d", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["d"]
    p.note_synced("d")
    _changes_after_are_covered(p)


def test_a_late_change_keeps_its_priority_and_age():
    p = planner()
    p.note_change("d", PRIORITY_METER, 100)
    assert p.next_batch(0.0) == ["d"]
    p.note_change("e", PRIORITY_METER, 100)  # waits, older than d's late change
    p.note_change("d", PRIORITY_STATE, 50)  # late: d is out in the batch
    p.note_synced("d")
    p.on_success(0.0)
    assert p.is_waiting("d")
    assert p.next_batch(0.0) == ["d", "e"]  # state before meter, whatever the age
    p.on_success(0.0)
    p.note_synced("d"), p.note_synced("e")
    p.note_change("f", PRIORITY_METER, 10)
    assert p.next_batch(0.0) == ["f"]
    q = planner()
    q.note_change("d", PRIORITY_METER, 100)
    assert q.next_batch(0.0) == ["d"]
    q.note_change("e", PRIORITY_METER, 100)
    q.note_change("d", PRIORITY_METER, 50)  # late, same priority, younger than e
    q.note_synced("d")
    q.on_success(0.0)
    assert q.next_batch(0.0) == ["e", "d"]


def test_settings_are_checked_at_their_edges():
    ForwardPlanner(Highest(), base_delay=2.0, max_delay=2.0, max_bytes=1, max_docs=1)  # all at the edge
    ForwardPlanner(Highest(), max_docs=MAX_DOCS, meter_hold=0.0)
    for kwargs, message in [
        ({"meter_hold": -0.1}, "meter_hold must not be negative"),
        ({"base_delay": 0.0}, "need 0 < base_delay <= max_delay"),
        ({"base_delay": 2.0, "max_delay": 1.0}, "need 0 < base_delay <= max_delay"),
        ({"max_bytes": 0}, f"max_bytes must be positive and max_docs in 1..{MAX_DOCS}"),
        ({"max_docs": 0}, f"max_bytes must be positive and max_docs in 1..{MAX_DOCS}"),
        ({"max_docs": MAX_DOCS + 1}, f"max_bytes must be positive and max_docs in 1..{MAX_DOCS}"),
    ]:
        with pytest.raises(ValueError) as info:
            ForwardPlanner(Highest(), **kwargs)
        assert str(info.value) == message, kwargs
    p = planner()
    with pytest.raises(ValueError) as info:
        p.note_change("d", 2, 1)
    assert str(info.value) == f"priority must be {PRIORITY_STATE} or {PRIORITY_METER}"
    with pytest.raises(ValueError) as info:
        p.note_change("d", PRIORITY_METER, -1)
    assert str(info.value) == "size_hint must not be negative"
    p.note_change("d", PRIORITY_METER, 0)  # zero is a size
    assert p.is_waiting("d")


def test_a_failed_batch_is_sent_again_whole_so_its_late_changes_are_covered():
    p = planner()
    p.note_change("d", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["d"]
    p.note_change("d", PRIORITY_METER, 10)  # late while the batch is out
    retry = p.on_failure(0.0)
    assert p.next_batch(retry) == ["d"]  # the retry carries every change, the late one too
    p.note_synced("d")
    assert not p.is_waiting("d")


def test_late_changes_add_up_to_the_size_that_waits():
    p = planner(max_bytes=100)
    p.note_change("d", PRIORITY_STATE, 500)
    assert p.next_batch(0.0) == ["d"]
    p.note_change("d", PRIORITY_METER, 20)  # two late changes, 50 bytes in all
    p.note_change("d", PRIORITY_METER, 30)
    p.note_synced("d")
    p.on_success(0.0)
    p.note_change("e", PRIORITY_METER, 50)
    p.note_change("f", PRIORITY_METER, 51)
    assert p.next_batch(0.0) == ["d", "e"]  # 50 + 50 fits the 100 bytes exactly
    p.on_failure(0.0)
    p.forget("e")
    assert p.next_batch(100.0) == ["d"]  # 50 + 51 does not
