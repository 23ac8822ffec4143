"""A real Prometheus server (Debian's `prometheus`) scrapes a real node and a real cloud.

Everything runs as separate processes on loopback (127.0.17.x): `meshnode cloud --site`,
an enrolled `meshnode run` with `--cloud-url` (it leads and forwards), and the `prometheus` binary
started directly with a temporary config and TSDB (never as a service). The test
records a session on the node, then asks Prometheus's HTTP query API until the node's
and the cloud's series appear with the values the session implies. The cloud's
`/metrics` wants a token: Prometheus reads the cloud's read-only token from its file
(`authorization: credentials_file`, docs/metrics.md); a job without it is down (401).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from .procs import NodeProcess, free_port, wait_until
from .test_e2e_uplink import CloudProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOST_CLOUD = "127.0.17.1"
HOST_NODE = "127.0.17.2"
HOST_PROM = "127.0.17.3"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: meshnode
    static_configs:
      - targets: ["{node}"]
  - job_name: meshnode-cloud
    authorization:
      credentials_file: {token_file}
    static_configs:
      - targets: ["{cloud}"]
  - job_name: meshnode-cloud-without-token
    static_configs:
      - targets: ["{cloud}"]
"""


class PrometheusProcess:
    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = free_port(HOST_PROM)
        self.config = tmp / "prometheus.yml"
        self.config.write_text(CONFIG.format(**targets))
        self.log_path = tmp / "prometheus.log"
        self.args = [
            PROMETHEUS,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={HOST_PROM}:{self.port}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST_PROM}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        wait_until(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, 60, what="prometheus ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_a_node_and_the_cloud(tmp_path: Path) -> None:
    import time

    from meshnode._security import create_site, enroll

    create_site(tmp_path / "site", "field", now=time.time())
    enroll(tmp_path / "site", "n1", tmp_path / "n1", now=time.time())
    (tmp_path / "cloud").mkdir()
    cloud_port = free_port(HOST_CLOUD)
    cloud = CloudProcess(
        HOST_CLOUD, cloud_port, f"sqlite:///{tmp_path}/cloud/cloud.db", tmp_path / "cloud" / "cloud.key",
        tmp_path / "cloud.log", extra=["--site", str(tmp_path / "site")],
    )  # fmt: skip
    node = NodeProcess(
        "n1", HOST_NODE, tmp_path / "n1", coap_port=free_port(HOST_NODE), http_port=free_port(HOST_NODE),
        extra=["--cloud-url", cloud.url, "--probe-interval", "0.5"], insecure=False,
    )  # fmt: skip
    targets = {"node": f"{HOST_NODE}:{node.http_port}", "cloud": f"{HOST_CLOUD}:{cloud_port}"}
    prom = PrometheusProcess(tmp_path, {**targets, "token_file": str(tmp_path / "cloud" / "api-read.token")})
    try:
        cloud.start()
        node.start()
        prom.start()
        created = node.post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 0})
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        assert node.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 1000}).status_code == 201
        # The node leads alone and forwards; the cloud issues a receipt.
        wait_until(lambda: node.get(f"/v1/sessions/{sid}")["state"] == "reconciled", 90, what="receipt on the node")

        def scraped() -> bool:
            up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
            return up == {"meshnode": "1", "meshnode-cloud": "1", "meshnode-cloud-without-token": "0"}

        # With the cloud's read-only token the cloud is up; the same target without it is down.
        wait_until(scraped, 60, 0.5, what="node and cloud up in Prometheus, the job without a token down")
        wait_until(lambda: prom.value('meshnode_sessions{state="reconciled"}') == 1, 60, 0.5, what="node series")
        wait_until(lambda: prom.value("meshnode_cloud_ledger_rows") == 1, 60, 0.5, what="cloud ledger rows")
        wait_until(lambda: (prom.value("meshnode_cloud_receipts") or 0) == 1, 60, 0.5, what="cloud receipts")
        wait_until(lambda: (prom.value("meshnode_reconcile_seconds_count") or 0) >= 1, 60, 0.5, what="histogram")
        wait_until(lambda: (prom.value("meshnode_cloud_sessions_ingested_total") or 0) >= 1, 60, 0.5, what="ingested")
        assert prom.value('meshnode_is_leader{node_id="n1"}') == 1
        assert prom.value("meshnode_cloud_ingest_seconds_count") >= 1
        names = {r["metric"]["__name__"] for r in prom.query('{__name__=~"meshnode_.+"}')}
        for expected in (
            "meshnode_queued_changes", "meshnode_unsent_events", "meshnode_connectivity_state",
            "meshnode_peers_alive", "meshnode_coap_requests_total", "meshnode_leader_changes_total",
            "meshnode_sync_errors_total", "meshnode_cloud_reviews_pending", "meshnode_cloud_requests_total",
        ):  # fmt: skip
            assert expected in names, sorted(names)
    finally:
        prom.stop()
        node.kill()
        cloud.kill()
