"""A wiped node re-enrols under a new certificate and chain; its old events still verify (issue 14, hole 6).

Real processes: a cloud that trusts the site, an uplink node `bay-1` and a peer `bay-2`.
`bay-1` bills a session, loses its disk, is enrolled again with `meshnode enroll` (a new
key under the same id) and bills another. Before the fix the new key started its chain
at seq 1 again: the cloud took every new event for a fork of the old chain and billed
nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode._security import create_site
from tests.procs import NodeProcess, free_port, wait_until
from tests.test_e2e_uplink import CloudProcess

pytestmark = pytest.mark.slow

CLOUD, HOSTS = "127.0.18.30", {"bay-1": "127.0.18.31", "bay-2": "127.0.18.32"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True, text=True, timeout=60)


def test_a_wiped_node_re_enrols_and_both_its_chains_bill(tmp_path: Path) -> None:
    site = tmp_path / "site"
    create_site(site, "depot", now=time.time())
    for name in HOSTS:
        enrolled = cli("enroll", "--node-id", name, "--data-dir", str(tmp_path / name), "--site", str(site))
        assert enrolled.returncode == 0, enrolled.stderr
    cloud = CloudProcess(
        CLOUD, free_port(CLOUD), f"sqlite:///{tmp_path}/cloud.db", tmp_path / "cloud.key", tmp_path / "cloud.log",
        extra=["--site", str(site)],
    )  # fmt: skip
    ports = {name: (free_port(host), free_port(host)) for name, host in HOSTS.items()}

    def node(name: str) -> NodeProcess:
        other = next(n for n in HOSTS if n != name)
        extra = ["--cloud-url", cloud.url, "--probe-interval", "0.5"] if name == "bay-1" else []
        return NodeProcess(
            name, HOSTS[name], tmp_path / name, coap_port=ports[name][0], http_port=ports[name][1],
            peers=[f"{HOSTS[other]}:{ports[other][0]}"], insecure=False, extra=extra,
        )  # fmt: skip

    def charge(n: NodeProcess, start: int, stop: int) -> str:
        r = n.post("/v1/sessions", {"charger": "cp-1", "connector": 1, "id_token": "D1", "meter_wh": start})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert n.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": stop}).status_code == 201
        return str(sid)

    def reconciled(sid: str) -> bool:
        row = cloud.ledger().get(sid)
        return row is not None and row["state"] == "reconciled"

    nodes = {name: node(name) for name in HOSTS}
    cloud.start()
    try:
        for n in nodes.values():
            n.start()
        old = charge(nodes["bay-1"], 1_000, 3_000)
        wait_until(lambda: reconciled(old), timeout=90, what="the first session billed")
        wait_until(lambda: nodes["bay-2"].get(f"/v1/sessions/{old}")["state"] == "reconciled", timeout=60)

        # bay-1 loses its disk; the operator enrols it again: a new key, a new certificate.
        nodes["bay-1"].kill()
        shutil.rmtree(tmp_path / "bay-1")
        again = cli("enroll", "--node-id", "bay-1", "--data-dir", str(tmp_path / "bay-1"), "--site", str(site))
        assert again.returncode == 0 and "new chain" in again.stdout, again.stderr
        nodes["bay-1"] = node("bay-1")
        nodes["bay-1"].start()
        new = charge(nodes["bay-1"], 5_000, 9_000)
        wait_until(lambda: reconciled(new), timeout=90, what="the session of the re-enrolled node billed")

        ledger = cloud.ledger()
        assert (ledger[old]["energy_wh"], ledger[old]["conflicts"]) == (2_000, 0)
        assert (ledger[new]["energy_wh"], ledger[new]["conflicts"]) == (4_000, 0)
        # The old session, signed by the lost key, still verifies on the peer and on bay-1 itself.
        wait_until(lambda: old in {s["session_id"] for s in nodes["bay-1"].get("/v1/sessions")["sessions"]}, 60)
        for n in nodes.values():
            for sid in (old, new):
                wait_until(lambda: sid in {s["session_id"] for s in n.get("/v1/sessions")["sessions"]}, 60)
                session = n.get(f"/v1/sessions/{sid}")
                assert session["conflicts"] == [] and session["state"] == "reconciled", (n.name, session)
    finally:
        for n in nodes.values():
            n.kill()
        cloud.kill()
