"""The cloud from outside: only certified devices of the site sync; bodies, nesting, errors (issue 14).

Real `meshnode cloud --site DIR` processes on 127.0.18.x; the attacker posts from
another 127.0.18.x address. The forged session document is the one from the issue: a
session with made-up events, signed by a key of the attacker's own.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import nacl.signing
import pytest
from automerge.core import Document

from crdt import EventSigner, Replica, add_event, new_session_doc
from meshnode._security import create_site, enroll, load_or_create_node_key, site_revoke
from tests.pg import pg_server, pg_url  # noqa: F401
from tests.procs import NodeProcess, free_port, wait_until
from tests.test_api_auth import chunked_post, listen_backlog, rss_peak_kib
from tests.test_e2e_uplink import CloudProcess
from uplink import (
    CloudSyncRequest,
    CloudSyncResponse,
    DeviceCredential,
    SignedSyncRequest,
    compress,
)

pytestmark = pytest.mark.slow

CLOUD = "127.0.18.10"
ATTACKER = "127.0.18.2"
NODE = "127.0.18.11"


@pytest.fixture
def site(tmp_path: Path):
    now = time.time()
    create_site(tmp_path / "site", "field-a", now=now)
    create_site(tmp_path / "other", "field-b", now=now)
    enroll(tmp_path / "site", "gw-1", tmp_path / "gw-1", roles=("gateway",), now=now)
    enroll(tmp_path / "site", "gw-2", tmp_path / "gw-2", roles=("gateway",), now=now)
    enroll(tmp_path / "site", "tool-1", tmp_path / "tool-1", roles=("operator",), now=now)
    enroll(tmp_path / "other", "gw-1", tmp_path / "stranger", roles=("gateway",), now=now)
    return tmp_path


@pytest.fixture
def cloud(site: Path):
    proc = CloudProcess(
        CLOUD,
        free_port(CLOUD),
        f"sqlite:///{site}/cloud.db",
        site / "cloud.key",
        site / "cloud.log",
        extra=["--site", str(site / "site")],
    )
    proc.start()
    yield proc
    proc.kill()


def credential(data_dir: Path) -> DeviceCredential:
    return DeviceCredential(load_or_create_node_key(data_dir), (data_dir / "node.cert").read_bytes())


def forged_session() -> tuple[str, Document]:
    """The issue's forged document: a session signed by a key nobody certified."""
    signer = EventSigner("gw-1", nacl.signing.SigningKey(os.urandom(32)))
    sid = os.urandom(16).hex()
    doc = new_session_doc(
        sid, site="field-a", charger="bay-9", connector=1, id_token="FREE",
        tariff={"currency": "EUR", "per_kwh_cents": 39}, created_by="gw-1",
    )  # fmt: skip
    for kind, meter in (("authorize", None), ("start", 0), ("stop", 50_000)):
        add_event(doc, signer.sign(kind, sid, 1_700_000_000_000, meter_wh=meter), public_key=signer.public_key)
    return sid, doc


def post_sync(
    url: str, node: str, docs: dict[str, Document], cred: DeviceCredential | None, ts: float | None = None
) -> httpx.Response:
    """Sync `docs` with the cloud as a leader would (rounds until neither side has more to say);
    returns the first refusal, or the last answer."""
    replica, ids = Replica(dict(docs)), sorted(docs)
    r: httpx.Response | None = None
    with httpx.Client(transport=httpx.HTTPTransport(local_address=ATTACKER), timeout=10.0) as client:
        for round_ in range(12):
            msgs = {d: replica.generate("cloud", d) for d in ids}
            if r is not None and all(m is None for m in msgs.values()):
                return r
            reset = tuple(ids) if round_ == 0 else ()
            if cred is None:
                request: CloudSyncRequest = CloudSyncRequest(node, "field-a", msgs, reset)
            else:
                stamp = time.time() if ts is None else ts
                request = SignedSyncRequest(node, "field-a", msgs, reset, credential=cred, ts=stamp)
            r = client.post(
                url + "/v1/sync",
                content=compress(request.encode()),
                headers={"Content-Encoding": "deflate", "Content-Type": "application/cbor"},
            )
            if r.status_code != 200:
                return r
            for d, m in CloudSyncResponse.decode(r.content).msgs.items():
                replica.receive("cloud", d, m)
    raise AssertionError("sync with the cloud did not settle")


def test_a_forged_session_document_creates_no_ledger_row(site: Path, cloud: CloudProcess) -> None:
    sid, doc = forged_session()
    r = post_sync(cloud.url, "gw-1", {sid: doc}, None)
    assert r.status_code == 401 and "certified devices" in r.json()["error"]
    assert cloud.ledger() == {}
    assert cloud.get("/v1/stats")["sessions"] == 0


@pytest.mark.parametrize(
    "who,as_node,skew,status",
    [
        ("stranger", "gw-1", 0, 401),  # a genuine certificate of another site, same node id
        ("tool-1", "tool-1", 0, 403),  # our site, but an operator tool may not forward
        ("gw-2", "gw-1", 0, 403),  # our device, speaking for another
        ("gw-1", "gw-1", -3600, 401),  # a captured request an hour old
    ],
)
def test_signed_requests_that_prove_too_little_change_nothing(
    site: Path, cloud: CloudProcess, who: str, as_node: str, skew: float, status: int
) -> None:
    sid, doc = forged_session()
    r = post_sync(cloud.url, as_node, {sid: doc}, credential(site / who), ts=time.time() + skew)
    assert r.status_code == status, r.text
    assert cloud.ledger() == {}


def test_a_certified_device_syncs_until_the_site_revokes_it(site: Path, cloud: CloudProcess) -> None:
    gw = credential(site / "gw-1")
    signer = EventSigner("gw-1", gw.signing_key)
    sid = os.urandom(16).hex()
    doc = new_session_doc(
        sid, site="field-a", charger="bay-1", connector=1, id_token="D1",
        tariff={"currency": "EUR", "per_kwh_cents": 39}, created_by="gw-1",
    )  # fmt: skip
    now_ms = int(time.time() * 1000)
    for kind, meter, dt in (("authorize", None, 0), ("start", 0, 0), ("stop", 2_000, 600_000)):
        add_event(doc, signer.sign(kind, sid, now_ms + dt, meter_wh=meter), public_key=gw.certificate)
    r = post_sync(cloud.url, "gw-1", {sid: doc}, gw)
    assert r.status_code == 200, r.text
    assert cloud.ledger()[sid]["energy_wh"] == 2_000

    # The forged document, carried by a genuine device, bills nothing: its events do not verify.
    fid, fdoc = forged_session()
    assert post_sync(cloud.url, "gw-1", {fid: fdoc}, gw).status_code == 200
    row = cloud.ledger()[fid]
    assert (row["energy_wh"], row["receipt"], row["state"]) == (0, None, "idle")

    # The site revokes gw-1 (the entry lands in SITE/entries, which the cloud follows).
    site_revoke(site / "site", node_id="gw-1", now=time.time(), reason="stolen")
    sid2, doc2 = forged_session()
    r = post_sync(cloud.url, "gw-1", {sid2: doc2}, gw)
    assert r.status_code == 403 and "revoked" in r.json()["error"]
    assert sid2 not in cloud.ledger()
    assert post_sync(cloud.url, "gw-2", {sid2: doc2}, credential(site / "gw-2")).status_code == 200


def test_an_enrolled_node_forwards_to_a_cloud_that_trusts_its_site(site: Path, cloud: CloudProcess) -> None:
    """The real forwarder signs: a session started on an enrolled node reaches the ledger."""
    node = NodeProcess(
        "gw-2", NODE, site / "gw-2", coap_port=free_port(NODE), http_port=free_port(NODE), insecure=False,
        extra=["--cloud-url", cloud.url, "--probe-interval", "0.5"],
    )  # fmt: skip
    node.start()
    try:
        r = node.post("/v1/sessions", {"charger": "bay-2", "connector": 1, "id_token": "D2", "meter_wh": 100})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        wait_until(lambda: sid in cloud.ledger(), timeout=60, what="the session in the ledger")
        time.sleep(3)  # a few more probes (every 0.5 s)
    finally:
        node.kill()
    assert "refused sync request" not in (site / "cloud.log").read_text()
    probes = [line for line in node.log_path.read_text().splitlines() if "/healthz" in line]
    assert probes == []  # probes log at DEBUG, not one INFO line each


# --- limits -----------------------------------------------------------------------------------


def test_a_500_mib_chunked_sync_is_cut_off_while_it_streams(cloud: CloudProcess) -> None:
    assert cloud.proc is not None
    before = rss_peak_kib(cloud.proc.pid)
    sent, answer = chunked_post(CLOUD, cloud.port, "/v1/sync", 500 << 20, headers="Content-Encoding: deflate\r\n")
    assert sent < 100 << 20, f"the cloud read {sent >> 20} MiB before refusing"
    assert not answer or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    grown = rss_peak_kib(cloud.proc.pid) - before
    assert grown < 48 * 1024, f"peak RSS grew by {grown} KiB"
    assert cloud.get("/healthz")["ok"] is True


def test_nested_cbor_errors_and_backlog(site: Path, cloud: CloudProcess) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=ATTACKER), timeout=10.0) as client:
        nested = compress(b"\x81" * 60_000 + b"\x00")
        r = client.post(cloud.url + "/v1/sync", content=nested, headers={"Content-Encoding": "deflate"})
        assert r.status_code in (400, 401) and "error" in r.json(), r.text
        for method, path, code in (("GET", "/v1/nothing-here", 404), ("DELETE", "/v1/sync", 405)):
            r = client.request(method, cloud.url + path, headers=cloud.headers())  # past the token check
            assert r.status_code == code and r.headers["content-type"] == "application/json", r.text
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_backlog(CLOUD, cloud.port) == min(2048, somaxconn)
    assert cloud.get("/v1/stats")["sessions"] == 0
    assert "Traceback" not in (site / "cloud.log").read_text()


def test_the_cloud_never_prints_a_database_password(tmp_path: Path) -> None:
    import sys

    port = free_port(CLOUD)
    result = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "cloud", "--db", f"postgresql://meter:S3cretPW@{CLOUD}:{port}/ledger",
         "--bind", CLOUD, "--port", str(port), "--key", str(tmp_path / "cloud.key")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "S3cretPW" not in out, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshnode cloud:")]
    assert len(errors) == 1 and "cannot connect to PostgreSQL" in errors[0], result.stderr


def test_a_running_cloud_keeps_the_database_password_out_of_its_ready_line_and_log(tmp_path: Path, pg_url: str) -> None:
    import json
    import signal
    import sys
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(pg_url)
    user = parts.username or "postgres"
    secret_url = urlunsplit(parts._replace(netloc=f"{user}:S3cretPW@{parts.hostname}:{parts.port}"))
    port = free_port(CLOUD)
    log = tmp_path / "cloud.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", "cloud", "--db", secret_url, "--bind", CLOUD, "--port", str(port),
             "--key", str(tmp_path / "cloud.key"), "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["ready"] is True and ready["db"] == secret_url.replace("S3cretPW", "***")
            assert "no --site" in ready["insecure"]
            httpx.get(f"http://{CLOUD}:{port}/healthz", timeout=10).raise_for_status()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert "S3cretPW" not in log.read_text()


def test_a_revocation_handed_to_the_cloud_takes_effect(site: Path) -> None:
    """The cloud holds only a copy of the site's public files; the operator hands it the entry."""
    import shutil
    import sys

    public = site / "cloud-site"
    public.mkdir()
    for name in ("site.pub", "site.toml"):
        shutil.copy(site / "site" / name, public / name)
    cloud = CloudProcess(
        CLOUD,
        free_port(CLOUD),
        f"sqlite:///{site}/c2.db",
        site / "c2.key",
        site / "c2.log",
        extra=["--site", str(public)],
    )
    cloud.start()
    try:
        sid, doc = forged_session()
        gw = credential(site / "gw-1")
        assert post_sync(cloud.url, "gw-1", {sid: doc}, gw).status_code == 200
        with httpx.Client(transport=httpx.HTTPTransport(local_address=ATTACKER), timeout=10.0) as client:
            forged = site_revoke(site / "other", node_id="gw-1", now=time.time())[1]  # another site's entry
            r = client.post(cloud.url + "/v1/site/entries", json={"entry": forged.hex()})
            assert r.status_code == 401, r.text  # no operator token: not even read
            operator = cloud.headers()
            r = client.post(cloud.url + "/v1/site/entries", json={"entry": forged.hex()}, headers=operator)
            assert r.status_code == 400, r.text
            r = client.post(cloud.url + "/v1/site/entries", content=b"[" * 60_000, headers=operator)
            assert r.status_code == 400
        assert post_sync(cloud.url, "gw-1", {sid: doc}, gw).status_code == 200  # nothing revoked yet
        handed = subprocess.run(
            [sys.executable, "-m", "meshnode.cli", "site", "revoke", "--site", str(site / "site"), "--node-id", "gw-1",
             "--http", cloud.url, "--data-dir", str(site)],  # the cloud's folder: its api.token
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert handed.returncode == 0, handed.stderr
        r = post_sync(cloud.url, "gw-1", {sid: doc}, gw)
        assert r.status_code == 403 and "revoked" in r.json()["error"]
    finally:
        cloud.kill()


def test_a_replayed_signed_request_is_refused_and_changes_nothing(site: Path, cloud: CloudProcess) -> None:
    """A request captured on the wire and sent again inside the 15-minute window: 409, and the
    stats, the page's site contact and the ledger stay as they were."""
    sid, doc = forged_session()
    replica = Replica({sid: doc})
    request = SignedSyncRequest(
        "gw-1", "field-a", {sid: replica.generate("cloud", sid)}, (sid,), credential=credential(site / "gw-1"),
        ts=time.time(),
    )  # fmt: skip
    captured = compress(request.encode())
    headers = {"Content-Encoding": "deflate", "Content-Type": "application/cbor"}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=ATTACKER), timeout=10.0) as client:
        assert client.post(cloud.url + "/v1/sync", content=captured, headers=headers).status_code == 200
        before = (cloud.get("/v1/stats"), cloud.ledger(), cloud.get("/v1/page/overview")["sites"])
        for _ in range(3):
            r = client.post(cloud.url + "/v1/sync", content=captured, headers=headers)
            assert r.status_code == 409 and "replay" in r.json()["error"], r.text
    after = (cloud.get("/v1/stats"), cloud.ledger(), cloud.get("/v1/page/overview")["sites"])
    assert after == before
    # The device itself goes on: each request it sends is signed afresh.
    assert post_sync(cloud.url, "gw-1", {sid: doc}, credential(site / "gw-1")).status_code == 200


def test_the_replay_memory_forgets_what_the_clock_check_refuses_and_stays_bounded() -> None:
    from uplink._cloudauth import SeenRequests

    seen = SeenRequests(window=900, limit=3)
    assert seen.first_sight(b"a", ts=1000, now=1000) and not seen.first_sight(b"a", ts=1000, now=1899)
    assert len(seen) == 1
    assert seen.first_sight(b"b", ts=1900, now=1901) and len(seen) == 1  # "a" expired with its window
    for sig in (b"c", b"d", b"e"):
        assert seen.first_sight(sig, ts=1900, now=1901)
    assert len(seen) == 3  # bounded: "b", the oldest, was forgotten for "e"
    assert not seen.first_sight(b"e", ts=1900, now=1902) and not seen.first_sight(b"c", ts=1900, now=1902)
