"""`GET /metrics` on a node and on the cloud: prometheus_client exposition, per-app registries.

The node's numbers are read at scrape time from what it already keeps; these tests
drive a node and a cloud through their real APIs and check that the exposition moves
with them (parsed with prometheus_client's own parser, not with string matching).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshnode._api import build_app
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._transport import MemoryNetwork
from uplink._cloud import open_cloud

from .test_cloud import CLOUD_KEY, Leader, completed
from .conftest import make_signer

NOW = 1_800_000_000.0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("node_id", "site"))))] = s.value
    return out


async def test_node_metrics_follow_sessions_and_each_node_has_its_own_registry(tmp_path: Path, autojump_clock):
    net = MemoryNetwork()
    async with (
        trio.open_nursery() as nursery,
        net.transport("10.0.0.1:5683") as t1,
        net.transport("10.0.0.2:5683") as t2,
    ):
        nodes = []
        for name, transport in (("n1", t1), ("n2", t2)):
            node = Node(
                NodeConfig(node_id=name, data_dir=tmp_path / name, seed=7),
                transport=transport, discovery=StaticDiscovery([]), wall_clock=lambda: NOW + trio.current_time(),
            )  # fmt: skip
            await nursery.start(node.serve)
            nodes.append(node)
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(n)), base_url="http://node") for n in nodes
        ]
        async with clients[0] as one, clients[1] as two:
            first = await one.get("/metrics")
            assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
            before = samples(first.text)
            assert before[("meshnode_documents", ())] == 0
            assert before[("meshnode_connectivity_state", (("state", "OFFLINE"),))] == 1
            assert before[("meshnode_peers_alive", ())] == 0
            assert before[("meshnode_leader_changes_total", ())] == 0
            assert ("meshnode_reconcile_seconds_count", ()) in before
            created = await one.post(
                "/v1/sessions", json={"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 0}
            )
            assert created.status_code == 201
            sid = created.json()["session_id"]
            await one.post(f"/v1/sessions/{sid}/events", json={"type": "meter", "meter_wh": 50})
            after = samples((await one.get("/metrics")).text)
            assert after[("meshnode_documents", ())] == 1
            assert after[("meshnode_sessions", (("state", "charging"),))] == 1
            # The other node's registry saw none of it.
            other = samples((await two.get("/metrics")).text)
            assert other[("meshnode_documents", ())] == 0
            assert ("meshnode_sessions", (("state", "charging"),)) not in other
        nursery.cancel_scope.cancel()


async def test_cloud_metrics_count_ingest_and_ledger_rows(tmp_path: Path):
    async with open_cloud(f"sqlite:///{tmp_path}/cloud.db", signing_key=CLOUD_KEY) as cloud:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cloud.app), base_url="http://cloud") as client:
            before = samples((await client.get("/metrics")).text)
            assert before[("meshnode_cloud_ledger_rows", ())] == 0
            assert before[("meshnode_cloud_sessions_ingested_total", ())] == 0
            assert before[("meshnode_cloud_ingest_seconds_count", ())] == 0
            assert before[("meshnode_cloud_database_up", ())] == 1
            signer = make_signer("node-a")
            leader = Leader("node-a", {"s1": completed("s1", signer)})
            await leader.sync(client)
            after = samples((await client.get("/metrics")).text)
            assert after[("meshnode_cloud_ledger_rows", ())] == 1
            assert after[("meshnode_cloud_receipts", ())] == 1
            assert after[("meshnode_cloud_sessions_ingested_total", ())] == 1
            assert after[("meshnode_cloud_ingest_seconds_count", ())] >= 1
            assert after[("meshnode_cloud_requests_total", ())] >= 1
            # The site has no tariff: the session is billed unpriced and waits for a person (no_tariff).
            assert after[("meshnode_cloud_reviews_pending", ())] == 1


# --- structured logs -------------------------------------------------------------------------


def test_log_format_json_writes_one_object_per_line(tmp_path: Path):
    """A real `meshnode run` and `meshnode cloud` with --log-format json: every stderr line is a JSON object."""
    import json
    import subprocess
    import sys

    from .procs import free_port

    repo = Path(__file__).resolve().parent.parent
    host = "127.0.17.9"
    commands = {
        "node": ["run", "--insecure", "--no-mdns", "--node-id", "n1", "--data-dir", str(tmp_path / "n1"),
                 "--bind", host, "--coap-port", str(free_port(host)), "--http-port", str(free_port(host))],
        "cloud": ["cloud", "--db", f"sqlite:///{tmp_path}/c.db", "--bind", host, "--port", str(free_port(host))],
    }  # fmt: skip
    for name, args in commands.items():
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", *args, "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["ready"] is True
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines, f"{name} logged nothing"
        records = [json.loads(line) for line in lines]  # each line alone is one JSON object
        for record in records:
            assert set(record) >= {"ts", "level", "logger", "message"} and record["ts"].endswith("+00:00")
        wanted = "INSECURE" if name == "node" else "cloud service on"
        assert any(wanted in r["message"] for r in records), records


def test_the_json_formatter_keeps_the_traceback_inside_the_object():
    import json
    import logging

    from meshnode._operator import JsonFormatter

    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("why",), exc_info=True)
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert got["message"] == "failed: why" and got["level"] == "error" and "ValueError: boom" in got["exc"]


async def test_queued_changes_unsent_events_and_coap_codes_move(tmp_path: Path, autojump_clock):
    """A node whose cloud is unreachable queues its changes; a request for no such path counts as 4.04."""
    from uplink import CloudClient

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("no route to the cloud", request=request)

    net = MemoryNetwork()
    async with (
        trio.open_nursery() as nursery,
        net.transport("10.0.0.1:5683") as t1,
        net.transport("10.0.0.2:5683") as t2,
    ):
        cloud = CloudClient(
            "http://cloud.invalid", client=httpx.AsyncClient(transport=httpx.MockTransport(unreachable))
        )
        node = Node(
            NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7, cloud_url="http://cloud.invalid"),
            transport=t1, discovery=StaticDiscovery([]), wall_clock=lambda: NOW + trio.current_time(), cloud=cloud,
        )  # fmt: skip
        await nursery.start(node.serve)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(node)), base_url="http://n") as api:
            before = samples((await api.get("/metrics")).text)
            assert before[("meshnode_queued_changes", (("priority", "state"),))] == 0
            assert before[("meshnode_unsent_events", ())] == 0
            sid = (
                await api.post("/v1/sessions", json={"charger": "c", "connector": 1, "id_token": "T", "meter_wh": 0})
            ).json()["session_id"]
            await api.post(f"/v1/sessions/{sid}/events", json={"type": "meter", "meter_wh": 10})
            await trio.sleep(3)
            after = samples((await api.get("/metrics")).text)
            assert after[("meshnode_queued_changes", (("priority", "state"),))] == 1
            assert after[("meshnode_unsent_events", ())] == 3  # authorize, start, meter
            assert after[("meshnode_is_leader", ())] == 0  # no uplink, no leader
            with pytest.raises(Exception, match="4.04"):
                await t2.request("10.0.0.1:5683", "/no/such/path", b"")
            codes = samples((await api.get("/metrics")).text)
            assert codes[("meshnode_coap_requests_total", (("code", "4.04"),))] == 1
        nursery.cancel_scope.cancel()


def test_log_format_comes_from_the_flag_or_the_config_file(tmp_path: Path):
    from meshnode.cli import ConfigError, build_parser, resolve_run_settings

    config = tmp_path / "node.toml"
    config.write_text('log_format = "json"\n')
    parse = build_parser().parse_args
    assert resolve_run_settings(parse(["run", "--config", str(config)]))["log_format"] == "json"
    assert resolve_run_settings(parse(["run", "--config", str(config), "--log-format", "text"]))["log_format"] == "text"
    assert resolve_run_settings(parse(["run"]))["log_format"] == "text"
    config.write_text('log_format = "yaml"\n')
    with pytest.raises(ConfigError, match="log_format = .yaml. is not valid: it must be text or json"):
        resolve_run_settings(parse(["run", "--config", str(config)]))


def test_the_stop_to_receipt_histogram_counts_each_time_under_its_bound_before_any_scrape() -> None:
    """The histogram counts in plain numbers (prometheus_client loads at the first scrape);
    a time equal to a bound is in that bound's bucket, as Prometheus' `le` says."""
    from types import SimpleNamespace

    from meshnode._metrics import NodeMetrics, _ReconcileCollector

    metrics = NodeMetrics(SimpleNamespace(change_listeners=[]))  # type: ignore[arg-type]
    for seconds in (0.5, 1, 1.5, 3600, 100_000):
        metrics.observe(seconds)
    (family,) = _ReconcileCollector(metrics).collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("meshnode_reconcile_seconds_bucket", "1.0")] == 2
    assert samples[("meshnode_reconcile_seconds_bucket", "2.0")] == 3
    assert samples[("meshnode_reconcile_seconds_bucket", "1800.0")] == 3
    assert samples[("meshnode_reconcile_seconds_bucket", "3600.0")] == 4
    assert samples[("meshnode_reconcile_seconds_bucket", "86400.0")] == 4
    assert samples[("meshnode_reconcile_seconds_bucket", "+Inf")] == 5
    assert samples[("meshnode_reconcile_seconds_count", None)] == 5
    assert samples[("meshnode_reconcile_seconds_sum", None)] == 103_603
