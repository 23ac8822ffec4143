"""`meshnode demo`: the whole site end to end, the uplink proxy it unplugs, and its bookkeeping.

The end-to-end test runs the demo small and short as a real subprocess (cloud,
three node processes, a cut of the leader's uplink) and checks the promise the
demo makes: every started session is in the ledger exactly once, reconciled,
with its receipt back on its node, and the leader moved when its uplink went.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode._demo import (
    DemoError,
    SessionRecord,
    UplinkProxy,
    agreed_leader,
    check_ledger,
    main,
    percentile,
    run_demo,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_delivers_every_session_once_across_an_uplink_cut() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode._demo", "--nodes", "3", "--duration", "12", "--json",
         "--base-address", "127.0.0.120"],
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
    assert report["energy_mismatches"] == 0
    assert report["conflicts"] == 0
    assert report["leader_changes"] >= 1, report["leader_history"]
    assert report["uplink_cut"]["new_leader"] != report["uplink_cut"]["node"]
    latency = report["receipt_latency_s"]
    assert latency["n"] == report["sessions_stopped"] == report["sessions_started"]
    assert 0 <= latency["p50"] <= latency["p95"]
    assert report["cloud_bytes"] > 0 and report["raw_event_bytes"] > 0
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


def _ok(*ids: str) -> list[dict[str, Any]]:
    return [{"event_id": e, "status": "ok"} for e in ids]


def test_check_ledger_all_delivered() -> None:
    sessions = [_rec("a", ["a1", "a2"]), _rec("b", ["b1"])]
    check = check_ledger(sessions, [_row("a"), _row("b")], {"a": _ok("a1", "a2"), "b": _ok("b1")},
                         {"receipts": 2})
    assert (check.in_ledger, check.duplicates, check.lost, check.lost_events) == (2, 0, [], 0)
    assert check.energy_mismatches == [] and check.unexpected == [] and check.reconciled == 2


def test_check_ledger_counts_duplicates_lost_sessions_events_and_wrong_energy() -> None:
    sessions = [_rec("a", ["a1"]), _rec("b", ["b1", "b2"]), _rec("c", ["c1"]), _rec("d", ["d1"]),
                _rec("e", ["e1"], stop=None)]
    rows = [_row("a"), _row("a"), _row("b"), _row("c", state="completed"), _row("d", energy=299),
            _row("e", state="charging"), _row("zzz")]
    events = {"a": _ok("a1"), "b": _ok("b1") + [{"event_id": "b2", "status": "fork"}], "c": _ok("c1"),
              "d": _ok("d1"), "e": _ok("e1")}
    check = check_ledger(sessions, rows, events, {"receipts": 7})
    assert check.duplicates == 1 + (7 - 6)  # a second row for "a"; one receipt more than sessions
    assert check.lost == ["b", "c"]  # b: an acknowledged event not billed; c: stopped, not reconciled
    assert check.lost_events == 1
    assert check.energy_mismatches == ["d"]
    assert check.unexpected == ["zzz"]
    assert check.in_ledger == 5


def test_check_ledger_missing_row_loses_every_acknowledged_event() -> None:
    check = check_ledger([_rec("a", ["a1", "a2", "a3"])], [], {}, {"receipts": 0})
    assert check.lost == ["a"] and check.lost_events == 3 and check.in_ledger == 0


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
