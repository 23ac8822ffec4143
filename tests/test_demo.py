"""`meshnode demo`: the whole site end to end, the uplink proxy it unplugs, and its bookkeeping.

The end-to-end test runs the demo small and short as a real subprocess (cloud,
three node processes, a cut of the leader's uplink) and checks the promise the
demo makes: every started session is in the ledger exactly once, reconciled,
with its receipt back on its node, and the leader moved when its uplink went.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import trio

from meshnode._demo import (
    Demo,
    DemoError,
    DemoSettings,
    SessionRecord,
    UplinkProxy,
    agreed_leader,
    check_ledger,
    format_report,
    main,
    percentile,
    run_demo,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_delivers_every_session_once_across_an_uplink_cut() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode._demo", "--nodes", "3", "--duration", "12", "--json",
         "--base-address", "127.0.12.120"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=dict(os.environ),
    )  # fmt: skip
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, f"{report['failures']}\nstderr:\n{proc.stderr[-3000:]}"
    assert report["ok"] is True
    assert report["sessions_started"] > 0
    assert report["sessions_in_ledger"] == report["sessions_started"]
    assert report["sessions_reconciled_in_ledger"] == report["sessions_started"]
    assert report["lost"] == 0 and report["lost_events"] == 0
    assert report["duplicates"] == 0
    assert report["unexpected_ledger_rows"] == report["unexpected_sessions_on_nodes"] == 0
    assert report["sessions_with_several_receipts"] == 0
    assert report["cloud_receipts_issued"] == report["cloud_receipts"] == report["sessions_started"]  # one each
    assert report["energy_mismatches"] == 0
    assert report["conflicts"] == 0
    # The demo signed its site's tariff at start: every session is priced by it.
    billing = report["billing"]
    assert billing["unpriced"] == 0 and billing["tariffs"] == {"demo v1": report["sessions_started"]}
    assert billing["cents"]["EUR"] > 0 and billing["energy_wh"] > 0
    assert report["leader_changes"] >= 1, report["leader_history"]
    assert report["uplink_cut"]["new_leader"] != report["uplink_cut"]["node"]
    latency = report["receipt_latency_s"]
    assert latency["n"] == report["sessions_stopped"] == report["sessions_started"]
    # A receipt needs the cloud and a poll of the node after the stop's 201: never instant, and
    # every one came back within the run.
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] < report["wall_s"]
    assert report["cloud_bytes"] > 0 and report["raw_event_bytes"] > 0
    # The chargers spoke OCPP, both versions, and the open sessions were stopped through
    # another node's API (a remote stop carried over the mesh to the charger's node).
    assert report["chargers_by_version"] == {"ocpp1.6": 3, "ocpp2.0.1": 3}
    assert report["remote_stops"] >= 1
    assert "interrupted" not in proc.stderr


# --- the uplink proxy -------------------------------------------------------------------


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _roundtrip(port: int, payload: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(payload)
        got = b""
        with trio.fail_after(5):
            while len(got) < len(payload):
                got += await stream.receive_some(1024)
        return got


async def test_proxy_relays_then_cut_resets_and_refuses_then_restore_relays_again() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _echo, 0)
        echo_port = listeners[0].socket.getsockname()[1]
        proxy = UplinkProxy("127.0.0.1", echo_port)
        port = await nursery.start(proxy.serve)
        assert proxy.up and port == proxy.port

        assert await _roundtrip(port, b"hello") == b"hello"

        live = await trio.open_tcp_stream("127.0.0.1", port)
        await live.send_all(b"ping")
        with trio.fail_after(5):
            assert await live.receive_some(16) == b"ping"
        proxy.cut()
        assert not proxy.up and proxy.cuts == 1
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await live.receive_some(16)  # reset, not a polite end of stream
        await live.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)  # refused while unplugged

        proxy.restore()
        assert proxy.up and proxy.port == port
        assert await _roundtrip(port, b"again") == b"again"
        assert proxy.bytes_to_cloud == proxy.bytes_from_cloud == len(b"hello") + len(b"ping") + len(b"again")
        assert proxy.connections == 3
        nursery.cancel_scope.cancel()


async def test_proxy_closes_the_client_when_the_cloud_is_down() -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with trio.open_nursery() as nursery:
        proxy = UplinkProxy("127.0.0.1", dead_port)
        port = await nursery.start(proxy.serve)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            with trio.fail_after(5):
                try:
                    assert await stream.receive_some(16) == b""
                except trio.BrokenResourceError:
                    pass
        nursery.cancel_scope.cancel()


# --- bookkeeping ----------------------------------------------------------------------------


def _rec(sid: str, events: list[str], start: int = 100, stop: int | None = 400) -> SessionRecord:
    rec = SessionRecord(sid, 0, "c", 0.0, start, list(events))
    if stop is not None:
        rec.stopped, rec.stop_meter, rec.stopped_at = True, stop, 1.0
    return rec


def _row(sid: str, state: str = "reconciled", energy: int = 300) -> dict[str, Any]:
    return {"session_id": sid, "state": state, "energy_wh": energy}


def _priced(sid: str, energy: int) -> dict[str, Any]:
    """A ledger row's price under the demo's tariff (0.39 per kWh)."""
    return {"cost_cents": round(energy * 39 / 1000), "currency": "EUR", "tariff_id": "demo", "tariff_version": 1}


def _receipt(sid: str, energy: int = 300, issued_ts: int = 1000) -> dict[str, Any]:
    """A receipt as a node shows it (JSON, bytes as hex); `_ledger_receipt` is the ledger's hex CBOR of it."""
    return {
        "session_id": sid,
        "energy_wh": energy,
        "cost_cents": energy // 10,
        "currency": "EUR",
        "heads": [],
        "issued_ts": issued_ts,
        "issuer": "ab",
        "sig": hashlib.sha256(f"{sid}:{energy}:{issued_ts}".encode()).hexdigest(),
    }


def _ledger_receipt(receipt: dict[str, Any]) -> str:
    return cbor2.dumps({**receipt, "sig": bytes.fromhex(receipt["sig"])}, canonical=True).hex()


def _ok(*ids: str) -> list[dict[str, Any]]:
    return [{"event_id": e, "status": "ok"} for e in ids]


def test_check_ledger_all_delivered() -> None:
    sessions = [_rec("a", ["a1", "a2"]), _rec("b", ["b1"])]
    rows = [{**_row(sid), "receipt": _ledger_receipt(_receipt(sid))} for sid in ("a", "b")]
    check = check_ledger(sessions, rows, {"a": _ok("a1", "a2"), "b": _ok("b1")}, {"receipts": 2})
    assert (check.in_ledger, check.duplicates, check.lost, check.lost_events) == (2, 0, [], 0)
    assert check.failures == []
    assert check.energy_mismatches == [] and check.unexpected == [] and check.reconciled == 2


def test_check_ledger_counts_duplicates_lost_sessions_events_and_wrong_energy() -> None:
    sessions = [
        _rec("a", ["a1"]),
        _rec("b", ["b1", "b2"]),
        _rec("c", ["c1"]),
        _rec("d", ["d1"]),
        _rec("e", ["e1"], stop=None),
    ]
    rows = [
        _row("a"),
        _row("a"),
        _row("b"),
        _row("c", state="completed"),
        _row("d", energy=299),
        _row("e", state="charging"),
        _row("zzz"),
    ]
    for r in rows:
        r["receipt"] = "00" if r["state"] == "reconciled" else None
    events = {
        "a": _ok("a1"),
        "b": _ok("b1") + [{"event_id": "b2", "status": "fork"}],
        "c": _ok("c1"),
        "d": _ok("d1"),
        "e": _ok("e1"),
    }
    check = check_ledger(sessions, rows, events, {"receipts": 6})
    assert check.duplicate_rows == 1  # a second row for "a"
    assert check.receipts_beyond_rows == 1  # one receipt more than the 5 rows that carry one
    assert check.unexpected == ["zzz"]
    assert check.duplicates == 1 + 1 + 1
    assert check.lost == ["b", "c"]  # b: an acknowledged event not billed; c: stopped, not reconciled
    assert check.lost_events == 1
    assert check.energy_mismatches == ["d"]
    assert check.in_ledger == 5
    assert len(check.failures) == 4  # lost, duplicate rows/receipts, zzz, energy, and nothing else


def test_check_ledger_missing_row_loses_every_acknowledged_event() -> None:
    check = check_ledger([_rec("a", ["a1", "a2", "a3"])], [], {}, {"receipts": 0})
    assert check.lost == ["a"] and check.lost_events == 3 and check.in_ledger == 0


def test_check_ledger_sees_a_second_receipt_on_any_node_and_receipts_for_other_energy() -> None:
    sessions = [_rec("a", ["a1"]), _rec("b", ["b1"])]
    first, second = _receipt("a"), _receipt("a", issued_ts=2000)
    rows = [{**_row("a"), "receipt": _ledger_receipt(first)}, {**_row("b"), "receipt": _ledger_receipt(_receipt("b"))}]
    events = {"a": _ok("a1"), "b": _ok("b1")}
    views = {
        "n1": {"a": {"receipt": first}, "b": {"receipt": _receipt("b")}},
        "n2": {"a": {"receipt": first}, "b": {"receipt": None}},  # not there yet: not a second bill
    }
    clean = check_ledger(sessions, rows, events, {"receipts": 2}, views)
    assert clean.failures == [] and clean.duplicates == 0

    views["n2"]["a"] = {"receipt": second}  # the same session billed again, seen on one node only
    check = check_ledger(sessions, rows, events, {"receipts": 2}, views)
    assert check.receipt_conflicts == ["a"] and check.duplicates == 1
    assert any("more than one receipt" in f for f in check.failures)

    views["n2"]["a"] = {"receipt": first}
    views["n1"]["b"] = {"receipt": _receipt("b", energy=301)}  # a receipt for other energy than metered
    check = check_ledger(sessions, rows, events, {"receipts": 2}, views)
    assert check.energy_mismatches == ["b"] and check.receipt_conflicts == ["b"]

    views["n1"]["b"] = {"receipt": _receipt("b")}
    check = check_ledger(sessions, rows, events, {"receipts": 2}, views, issued=Counter({"a": 1, "b": 2}))
    assert check.receipt_conflicts == ["b"]  # the cloud issued "b" twice, though every view shows one

    views["n2"]["x"] = {"receipt": None}  # a session a node holds that no charger started
    check = check_ledger(sessions, rows, events, {"receipts": 2}, views)
    assert check.unexpected_on_nodes == ["x"] and check.duplicates == 1 and check.failures


class FakeSite:
    """The HTTP answers of a cloud and its nodes at the end of a demo, for `Demo._report`."""

    def __init__(self, nodes: int) -> None:
        self.rows: list[dict[str, Any]] = []
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.conflicts: list[dict[str, Any]] = []
        self.views: list[dict[str, dict[str, Any]]] = [{} for _ in range(nodes)]

    def bill(self, rec: SessionRecord, *, energy: int | None = None, on_nodes: bool = True) -> dict[str, Any]:
        """What an honest site shows for a stopped session: one row, one receipt everywhere."""
        assert rec.stop_meter is not None
        energy = rec.stop_meter - rec.start_meter if energy is None else energy
        receipt = _receipt(rec.session_id, energy)
        row = {**_row(rec.session_id, energy=energy), **_priced(rec.session_id, energy)}
        self.rows.append({**row, "receipt": _ledger_receipt(receipt)})
        self.events[rec.session_id] = _ok(*rec.acked_events)
        if on_nodes:
            for view in self.views:
                view[rec.session_id] = {"session_id": rec.session_id, "state": "reconciled", "receipt": receipt}
        return receipt

    def handler(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if host == "cloud":
            with_receipt = sum(1 for r in self.rows if r["receipt"] is not None)
            if path == "/v1/stats":
                return httpx.Response(200, json={"sessions": len(self.rows), "receipts": with_receipt})
            if path == "/v1/sessions":
                return httpx.Response(200, json={"sessions": self.rows})
            if path == "/v1/conflicts":
                return httpx.Response(200, json={"conflicts": self.conflicts})
            sid = path.rsplit("/", 1)[1]
            if sid in self.events:
                return httpx.Response(200, json={"events": self.events[sid]})
            return httpx.Response(404, json={"error": "no such session"})
        node = int(host.split("-")[1])
        if path == "/v1/status":
            return httpx.Response(200, json={"node_id": f"node-{node + 1}", "leader_changes": 0})
        if path == "/v1/sessions":
            return httpx.Response(200, json={"sessions": list(self.views[node].values())})
        return httpx.Response(404, json={"error": "not here"})  # the automerge documents: not needed


def _report(site: FakeSite, sessions: list[SessionRecord], workdir: Path = Path("/nonexistent")) -> dict[str, Any]:
    """Run the demo's own report over `site` (nothing started: no processes, no proxies)."""
    demo = Demo(DemoSettings(nodes=len(site.views)), workdir, lambda line: None)
    demo.node_urls = [f"http://node-{i}" for i in range(len(site.views))]
    demo.cloud_url = "http://cloud"
    demo.statuses = [None] * len(site.views)
    demo.sessions = sessions

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(site.handler)) as client:
            demo._client = client
            for rec in sessions:
                rec.reconciled_at = 2.0
            return await demo._report(True, 1.0)

    return trio.run(main)


def _two_billed_sessions() -> tuple[FakeSite, list[SessionRecord]]:
    site = FakeSite(3)
    sessions = [_rec("a", ["a1", "a2"], start=100, stop=400), _rec("b", ["b1"], start=1000, stop=1250)]
    for rec in sessions:
        site.bill(rec)
    return site, sessions


def test_report_is_ok_for_a_site_that_billed_every_session_once() -> None:
    site, sessions = _two_billed_sessions()
    report = _report(site, sessions)
    assert report["ok"] is True, report["failures"]
    assert (report["duplicates"], report["lost"], report["energy_mismatches"], report["conflicts"]) == (0, 0, 0, 0)


def test_report_fails_when_a_node_holds_a_second_receipt() -> None:
    site, sessions = _two_billed_sessions()
    site.views[2]["a"] = {**site.views[2]["a"], "receipt": _receipt("a", 300, issued_ts=5000)}
    report = _report(site, sessions)
    assert report["ok"] is False
    assert report["duplicates"] == 1 and report["sessions_with_several_receipts"] == 1


def test_report_fails_when_the_cloud_log_shows_a_session_billed_twice(tmp_path: Path) -> None:
    site, sessions = _two_billed_sessions()
    line = "2026-01-01 00:00:00,000 INFO uplink.cloud: issued receipt for session '{}'\n"
    (tmp_path / "cloud.log").write_text(line.format("a") + line.format("b"))
    assert _report(site, sessions, tmp_path)["ok"] is True
    (tmp_path / "cloud.log").write_text(line.format("a") + line.format("b") + line.format("b"))
    report = _report(site, sessions, tmp_path)
    assert report["ok"] is False and report["sessions_with_several_receipts"] == 1


def test_report_fails_on_a_ledger_session_no_charger_started() -> None:
    """A start retried after its 201 was lost: the first attempt's session is billed too."""
    site, sessions = _two_billed_sessions()
    orphan = _rec("orphan", [], start=100, stop=100)
    site.bill(orphan)
    report = _report(site, sessions)
    assert report["ok"] is False
    assert report["unexpected_ledger_rows"] == 1 and report["duplicates"] == 1
    assert any("no charger started" in f for f in report["failures"])


def test_report_fails_on_energy_other_than_metered() -> None:
    site, sessions = _two_billed_sessions()
    site.rows[1]["energy_wh"] = 251  # the row only; the receipts say 250
    report = _report(site, sessions)
    assert report["ok"] is False and report["energy_mismatches"] == 1


def test_report_sums_the_bill_and_fails_on_an_unpriced_session() -> None:
    site, sessions = _two_billed_sessions()
    report = _report(site, sessions)
    assert report["billing"] == {
        "energy_wh": 550, "cents": {"EUR": 12 + 10}, "tariffs": {"demo v1": 2}, "priced": 2, "unpriced": 0,
    }  # fmt: skip
    assert "0.550 kWh for EUR 0.22 (2 sessions priced: 2 x demo v1; 0 unpriced)" in format_report(report)
    site.rows[1].update(cost_cents=None, currency=None, tariff_id=None, tariff_version=None)  # no tariff reached it
    report = _report(site, sessions)
    assert report["ok"] is False and report["billing"]["unpriced"] == 1
    assert any("1 sessions unpriced" in f for f in report["failures"])


def test_report_fails_on_any_conflict_in_the_cloud() -> None:
    site, sessions = _two_billed_sessions()
    site.conflicts.append({"session_id": "a", "event_id": "a3", "kind": "late", "detail": "after the receipt"})
    report = _report(site, sessions)
    assert report["ok"] is False and report["conflicts"] == 1


def test_agreed_leader_and_percentile() -> None:
    assert agreed_leader(["n2", "n2", "n2"]) == "n2"
    assert agreed_leader(["n2", "n1", "n2"]) is None
    assert agreed_leader(["n2", None]) is None
    assert agreed_leader([]) is None
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)


def test_refuses_sizes_it_cannot_demonstrate() -> None:
    with pytest.raises(DemoError, match="--nodes must be at least 3"):
        run_demo(nodes=2)
    with pytest.raises(DemoError, match="--duration"):
        run_demo(duration=1)
    assert main(["--nodes", "2"]) == 2
    with pytest.raises(DemoError, match="loopback"):
        run_demo(base_address="10.0.0.1")
