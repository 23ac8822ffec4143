"""The cloud's HTTP API from another host: the operator's tokens (issue 14, the cloud's read routes).

Real `meshnode cloud --site DIR` processes on 127.0.13.x; the client is on another
127.0.13.x address, as a passer-by who reaches the cloud would be.
"""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from meshnode._security import create_site, enroll
from tests.procs import free_port
from tests.test_e2e_uplink import CloudProcess
from tests.test_security_cloud import credential, forged_session, post_sync
from uplink._cloud import _build_app
from uplink._cloudauth import needs_token

pytestmark = pytest.mark.slow

CLOUD = "127.0.13.10"
STRANGER = "127.0.13.2"
BAD_HEADERS = ({}, {"Authorization": "Bearer mn_" + "x" * 43}, {"Authorization": "Basic YTpi"})


def stranger() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=STRANGER), timeout=10.0)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    create_site(tmp_path / "site", "field-a", now=time.time())
    enroll(tmp_path / "site", "gw-1", tmp_path / "gw-1", roles=("gateway",), now=time.time())
    (tmp_path / "cloud").mkdir()
    return tmp_path


@pytest.fixture
def cloud(site: Path):
    proc = CloudProcess(
        CLOUD, free_port(CLOUD), f"sqlite:///{site}/cloud/cloud.db", site / "cloud" / "cloud.key",
        site / "cloud.log", extra=["--site", str(site / "site")],
    )  # fmt: skip
    proc.start()
    yield proc
    proc.kill()


def tokens(cloud: CloudProcess) -> tuple[str, str]:
    folder = cloud.key.parent
    return (folder / "api.token").read_text().strip(), (folder / "api-read.token").read_text().strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def every_route() -> list[tuple[str, str]]:
    """(method, path) of every route the cloud's app has, parameters filled in: a route added
    later (the page, OCPI, reviews) is covered without touching this test."""
    out = []
    for route in _build_app(lambda request: None).routes:  # type: ignore[arg-type, return-value]
        if isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def test_only_sync_ocpi_the_probe_the_issuer_and_the_page_files_are_open() -> None:
    routes = every_route()
    open_ = sorted({path for _, path in routes if not needs_token(path)})
    ocpi = [p for p in open_ if p.startswith("/ocpi/")]
    assert ocpi and sorted(set(open_) - set(ocpi)) == ["/", "/healthz", "/v1/issuer", "/v1/sync"]
    assert ("GET", "/metrics") in routes and needs_token("/metrics")
    assert needs_token("/v1/sessions") and needs_token("/v1/page/overview") and needs_token("/v1/reviews/x")
    assert not needs_token("/assets/cloud.js") and needs_token("/assetsX") and needs_token("/v1/syncX")


def test_every_route_but_the_open_ones_refuses_a_client_without_the_token(cloud: CloudProcess) -> None:
    protected = [(m, p) for m, p in every_route() if needs_token(p)]
    assert ("GET", "/v1/sessions") in protected and ("POST", "/v1/site/entries") in protected
    with stranger() as client:
        for method, path in protected:
            for headers in BAD_HEADERS:
                r = client.request(method, cloud.url + path, headers=headers, json={"decision": "approve"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["content-type"] == "application/json"
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert "token" in r.json()["error"]
        # What stays open answers without a token, and gives away nothing of the ledger.
        assert client.get(cloud.url + "/healthz").json() == {"ok": True}
        assert len(client.get(cloud.url + "/v1/issuer").json()["issuer"]) == 64
        page = client.get(cloud.url + "/")
        assert page.status_code == 200 and "token-form" in page.text
        assert client.get(cloud.url + "/assets/common.js").status_code == 200


def test_the_read_token_reads_the_operator_token_writes(site: Path, cloud: CloudProcess) -> None:
    write, read = tokens(cloud)
    # A certified device syncs without any token (its request is signed); the row is then there to read.
    sid, doc = forged_session()
    assert post_sync(cloud.url, "gw-1", {sid: doc}, credential(site / "gw-1")).status_code == 200
    with stranger() as client:
        rows = client.get(cloud.url + "/v1/sessions", headers=bearer(read))
        assert rows.status_code == 200 and [r["session_id"] for r in rows.json()["sessions"]] == [sid]
        for path in (f"/v1/sessions/{sid}", "/v1/conflicts", "/v1/stats", "/v1/page/overview", "/v1/reviews"):
            assert client.get(cloud.url + path, headers=bearer(read)).status_code == 200, path
        metrics = client.get(cloud.url + "/metrics", headers=bearer(read))
        assert metrics.status_code == 200 and "meshnode_cloud_ledger_rows" in metrics.text
        # The read token on a write route: 403, and nothing recorded.
        decision = {"decision": "approve", "reviewer": "eve"}
        r = client.post(cloud.url + f"/v1/reviews/{sid}", json=decision, headers=bearer(read))
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        r = client.post(cloud.url + "/v1/site/entries", json={"entry": "00"}, headers=bearer(read))
        assert r.status_code == 403
        assert client.get(cloud.url + "/v1/reviews", headers=bearer(read)).json() == {"reviews": []}
        # The operator token passes the guard: the route itself decides (the session is not flagged).
        r = client.post(cloud.url + f"/v1/reviews/{sid}", json=decision, headers=bearer(write))
        assert r.status_code in (201, 409), r.text
        r = client.post(cloud.url + "/v1/reviews/nope", json=decision, headers=bearer(write))
        assert r.status_code == 404, r.text


def test_token_files_are_private_kept_across_restarts_and_never_logged(cloud: CloudProcess) -> None:
    folder = cloud.key.parent
    for name in ("api.token", "api-read.token", "cloud.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    before = tokens(cloud)
    assert before[0] != before[1] and all(len(t) > 40 for t in before)
    with stranger() as client:
        client.get(cloud.url + "/v1/sessions", headers=bearer(before[1]))
        client.get(cloud.url + "/v1/sessions", headers=bearer("mn_" + "y" * 43))
    cloud.stop()
    cloud.start()
    assert tokens(cloud) == before
    log = cloud.log_path.read_text()
    assert all(token not in log for token in before)


def test_the_ready_line_says_where_the_tokens_are_and_never_shows_one(site: Path) -> None:
    import subprocess
    import sys

    port = free_port(CLOUD)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshnode.cli", "cloud", "--db", f"sqlite:///{site}/cloud/c.db", "--bind", CLOUD,
         "--port", str(port), "--site", str(site / "site")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        # No --key: the key sits next to the SQLite file, and the tokens beside it.
        assert (ready["api"], ready["tokens"]) == ("token", str(site / "cloud"))
        assert (site / "cloud" / "c.db.key").exists()
        line = json.dumps(ready)
        assert (site / "cloud" / "api.token").read_text().strip() not in line
    finally:
        proc.kill()
        proc.wait()


def test_a_cloud_without_a_site_is_open_for_labs(tmp_path: Path) -> None:
    lab = CloudProcess(
        CLOUD, free_port(CLOUD), f"sqlite:///{tmp_path}/lab.db", tmp_path / "lab.key", tmp_path / "lab.log"
    )
    lab.start()
    try:
        with stranger() as client:
            assert client.get(lab.url + "/v1/sessions").json() == {"sessions": []}
        assert not (tmp_path / "api.token").exists()
    finally:
        lab.kill()
