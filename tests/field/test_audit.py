"""The field audit on made-up ledgers: each way of billing wrongly is caught, and a right ledger passes.

The field run is only as good as its audit; these cases show that every check
in `audit_ledger` and `audit_nodes` can fail (no root or processes needed).
"""

from __future__ import annotations

import copy
from typing import Any

from .harness import Attempt, audit_ledger, audit_nodes, receipt_figures


def sid(a: Attempt) -> str:
    assert a.session_id is not None
    return a.session_id


def stopped(n: int, start: int = 1000, readings: tuple[int, ...] = (1200, 1500), stop: int = 1530) -> Attempt:
    a = Attempt(node="n1", charger="n1-cp1", id_token=f"FLD-n1-{n}", start_meter=start, session_id=f"s{n:031d}")
    a.sent = [start, *readings, stop]
    a.acked_readings = [start, *readings, stop]
    a.acked_events = {f"auth{n}": None, f"start{n}": start, **{f"m{n}-{r}": r for r in readings}, f"stop{n}": stop}
    a.stop_reading, a.stop_landed, a.stop_acked_at = stop, True, 10.0
    return a


def ledger_for(attempts: list[Attempt]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rows, details = {}, {}
    for a in attempts:
        assert a.session_id is not None and a.stop_reading is not None
        row = {
            "session_id": a.session_id,
            "charger": a.charger,
            "id_token": a.id_token,
            "state": "reconciled",
            "energy_wh": a.stop_reading - a.start_meter,
            "receipt_ts": 123,
        }
        rows[sid(a)] = row
        details[a.session_id] = {
            "session": row,
            "conflicts": [],
            "events": [{"event_id": e, "status": "ok", "meter_wh": m} for e, m in a.acked_events.items()],
        }
    stats = {"sessions": len(rows), "receipts": len(rows)}
    return rows, details, stats


def nodes_for(attempts: list[Attempt], rows: dict[str, Any], names: tuple[str, ...] = ("n1", "n2")) -> dict[str, Any]:
    view = {
        sid(a): {
            "events": [{"event_id": e} for e in a.acked_events],
            "receipt": {"issued_ts": rows[sid(a)]["receipt_ts"], "energy_wh": rows[sid(a)]["energy_wh"]},
        }
        for a in attempts
    }
    return {n: copy.deepcopy(view) for n in names}


def test_a_right_ledger_passes() -> None:
    attempts = [stopped(1), stopped(2)]
    rows, details, stats = ledger_for(attempts)
    assert audit_ledger(attempts, rows, details, stats, []).failures == []
    assert audit_nodes(attempts, nodes_for(attempts, rows), rows) == []


def test_a_charging_attempt_billed_as_two_sessions_is_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    # A start retried after a lost answer: a second session for the same attempt (same token).
    twin = dict(rows[sid(attempts[0])], session_id="t" * 32)
    rows[twin["session_id"]], details[twin["session_id"]] = twin, details[sid(attempts[0])]
    stats = {"sessions": 2, "receipts": 2}
    audit = audit_ledger(attempts, rows, details, stats, [])
    assert audit.figures()["billed_twice"] == 1 and audit.failures


def test_a_session_billed_under_another_id_than_acknowledged_is_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    acked = sid(attempts[0])
    rows = {"x" * 32: dict(rows[acked], session_id="x" * 32)}
    audit = audit_ledger(attempts, rows, {"x" * 32: details[acked]}, stats, [])
    assert audit.billed_twice and audit.lost_sessions == [acked]


def test_ledger_rows_no_charger_started_are_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    rows["y" * 32] = {
        "session_id": "y" * 32,
        "charger": "n9-cp1",
        "id_token": "FORGED",
        "state": "charging",
        "energy_wh": 0,
        "receipt_ts": None,
    }
    stats["sessions"] += 1
    audit = audit_ledger(attempts, rows, details, stats, [])
    assert audit.unexpected_rows == ["y" * 32] and audit.failures


def test_a_lost_session_and_a_lost_event_are_caught() -> None:
    attempts = [stopped(1), stopped(2)]
    rows, details, _ = ledger_for(attempts)
    gone = sid(attempts[0])
    del rows[gone], details[gone]
    kept = sid(attempts[1])
    details[kept]["events"] = [e for e in details[kept]["events"] if e["event_id"] != "m2-1200"]
    audit = audit_ledger(attempts, rows, details, {"sessions": 1, "receipts": 1}, [])
    assert audit.lost_sessions == [gone] and len(audit.lost_events) == 1


def test_an_event_held_but_not_billed_is_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    details[sid(attempts[0])]["events"][2]["status"] = "late"
    audit = audit_ledger(attempts, rows, details, stats, [])
    assert audit.lost_events and audit.unbilled_events


def test_energy_other_than_metered_is_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    rows[sid(attempts[0])]["energy_wh"] -= 1
    assert audit_ledger(attempts, rows, details, stats, []).energy_mismatches


def test_a_reading_no_charger_sent_is_caught() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    details[sid(attempts[0])]["events"].append({"event_id": "forged", "status": "ok", "meter_wh": 99})
    assert audit_ledger(attempts, rows, details, stats, []).unknown_readings


def test_a_stop_that_never_landed_bills_some_reading_sent_and_at_least_the_last_acknowledged() -> None:
    a = stopped(1)
    a.stop_landed, a.stop_acked_at = False, None
    a.acked_readings = [1000, 1200]  # the 1500 reading and the stop (1530) went unanswered
    del a.acked_events["m1-1500"], a.acked_events["stop1"]
    rows, details, stats = ledger_for([a])
    row = rows[sid(a)]
    row["state"], stats["receipts"] = "charging", 0
    for energy, ok in ((500, True), (200, True), (530, True), (100, False), (600, False)):
        row["energy_wh"] = energy
        assert (not audit_ledger([a], rows, details, stats, []).energy_mismatches) is ok, energy


def test_a_stopped_session_without_receipt_and_cloud_conflicts_are_caught() -> None:
    attempts = [stopped(1)]
    rows, details, _ = ledger_for(attempts)
    rows[sid(attempts[0])]["state"] = "completed"
    audit = audit_ledger(attempts, rows, details, {"sessions": 1, "receipts": 0}, [{"kind": "fork"}])
    assert audit.not_reconciled and audit.conflicts and not audit.stats_mismatch


def test_cloud_stats_that_count_other_receipts_are_caught() -> None:
    attempts = [stopped(1)]
    rows, details, _ = ledger_for(attempts)
    assert audit_ledger(attempts, rows, details, {"sessions": 1, "receipts": 2}, []).stats_mismatch


def test_an_unacknowledged_start_in_the_ledger_is_counted_not_failed() -> None:
    attempts = [stopped(1)]
    rows, details, stats = ledger_for(attempts)
    lost_answer = Attempt(node="n1", charger="n1-cp1", id_token="FLD-n1-9", start_meter=5, sent=[5])
    rows["z" * 32] = {
        "session_id": "z" * 32,
        "charger": "n1-cp1",
        "id_token": "FLD-n1-9",
        "state": "charging",
        "energy_wh": 0,
        "receipt_ts": None,
    }
    stats["sessions"] += 1
    audit = audit_ledger([*attempts, lost_answer], rows, details, stats, [])
    assert audit.failures == [] and audit.figures()["unacknowledged_starts_in_ledger"] == 1


def test_nodes_missing_acknowledged_data_or_holding_another_receipt_are_caught() -> None:
    attempts = [stopped(1), stopped(2)]
    rows, _, _ = ledger_for(attempts)
    views = nodes_for(attempts, rows)
    del views["n2"][sid(attempts[0])]
    views["n1"][sid(attempts[1])]["receipt"]["issued_ts"] = 999
    failures = audit_nodes(attempts, views, rows)
    assert len(failures) == 2, failures


def test_an_acknowledged_event_missing_on_the_node_that_acknowledged_it_is_not_durable() -> None:
    attempts = [stopped(1)]
    rows, _, _ = ledger_for(attempts)
    views = nodes_for(attempts, rows)
    views["n1"][sid(attempts[0])]["events"].pop()  # n1 acknowledged it (Attempt.node)
    failures = audit_nodes(attempts, views, rows)
    assert any("not durable" in f for f in failures), failures
    views = nodes_for(attempts, rows)
    views["n2"][sid(attempts[0])]["events"].pop()  # only a replica behind: not a durability failure
    assert not any("not durable" in f for f in audit_nodes(attempts, views, rows))


def test_receipt_figures_tell_a_slow_mesh_from_a_node_that_was_away() -> None:
    seen = {
        "n1": {"a": 10.0, "b": 20.0, "c": 30.0},
        "n2": {"a": 12.0, "b": 80.0, "c": 31.0},  # n2 was isolated from 40 to 75: b waited for it
        "n3": {"a": 30.0, "b": 21.0},  # c never reached n3: not counted
    }
    stops = {"a": 5.0, "b": 15.0, "c": 25.0}
    out = receipt_figures(seen, ["a", "b", "c"], stops, {"n2": [(40.0, 75.0)], "n3": [(200.0, None)]}, 300.0)
    assert out["receipt_spread_s"]["n"] == 2
    assert out["receipt_spread_s"]["max"] == 60.0  # b: 20 -> 80
    assert out["receipt_spread_all_present_s"] == {"n": 1, "p50": 20.0, "p95": 20.0, "max": 20.0}  # a only
    assert out["stop_to_receipt_all_present_s"]["max"] == 25.0
    slowest = out["receipt_slowest"]
    assert [s["session"] for s in slowest] == ["b", "a"]
    assert slowest[0]["last"] == "n2 at 80.0" and slowest[0]["absent_meanwhile"] == ["n2"]
    assert slowest[1]["absent_meanwhile"] == []
