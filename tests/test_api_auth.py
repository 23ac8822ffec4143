"""The node's HTTP API from another host on the LAN: tokens, roles, limits (issue 14, holes 1 and 4).

Every test runs a real `meshnode run` process on a 127.0.18.x address and talks to it
from another 127.0.18.x address, as a passer-by on the site network would.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from meshnode._api import build_app
from meshnode._security import create_site, enroll
from tests.procs import NodeProcess, free_port

pytestmark = pytest.mark.slow

HOST = "127.0.18.1"
STRANGER = "127.0.18.2"


def stranger() -> httpx.Client:
    """A client on another address of the 'LAN'."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=STRANGER), timeout=10.0)


@pytest.fixture
def enrolled(tmp_path: Path):
    create_site(tmp_path / "site", "field", now=time.time())
    enroll(tmp_path / "site", "bay-1", tmp_path / "bay-1", now=time.time())
    node = NodeProcess(
        "bay-1", HOST, tmp_path / "bay-1", coap_port=free_port(HOST), http_port=free_port(HOST), insecure=False
    )
    node.start()
    yield node
    node.kill()


def tokens(node: NodeProcess) -> tuple[str, str]:
    return (node.data_dir / "api.token").read_text().strip(), (node.data_dir / "api-read.token").read_text().strip()


def every_v1_route() -> list[tuple[str, str]]:
    """(method, path) of every /v1 route the node's app has, parameters filled in: a route
    another part adds later is covered without touching this test."""

    class NoNode:
        identity = None
        change_listeners: list = []  # the page and the metrics subscribe to changes

    out = []
    for route in build_app(NoNode()).routes:  # type: ignore[arg-type]
        if isinstance(route, Route) and route.path.startswith("/v1"):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def test_token_files_are_made_at_start_private_and_kept(enrolled: NodeProcess) -> None:
    for name in ("api.token", "api-read.token"):
        mode = stat.S_IMODE((enrolled.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    before = tokens(enrolled)
    assert before[0] != before[1] and all(len(t) > 40 for t in before)
    assert enrolled.stop() == 0
    enrolled.start()
    assert tokens(enrolled) == before  # kept across restarts


def test_every_v1_route_refuses_a_client_without_a_token(enrolled: NodeProcess) -> None:
    routes = every_v1_route()
    assert ("POST", "/v1/sessions") in routes and ("GET", "/v1/status") in routes
    with stranger() as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer mn_" + "x" * 43}, {"Authorization": "Basic YTpi"}):
                r = client.request(method, enrolled.url + path, headers=headers, json={"charger": "c"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert "token" in r.json()["error"]
        # The attack: read every driver's id token, start a session. Nothing happened.
        write, read = tokens(enrolled)
        assert client.get(enrolled.url + "/v1/sessions", headers={"Authorization": f"Bearer {read}"}).json() == {
            "sessions": []
        }


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length; status 0 if the server closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(rest) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def test_a_refused_request_leaves_the_connection_ready_for_the_next(enrolled: NodeProcess) -> None:
    """A client on keep-alive sends its next request on the same connection. The guard refused
    before the body arrived and the server then dropped the connection, so the next request got
    no answer at all (seen as "Server disconnected without sending a response")."""
    host, port = enrolled.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"charger": "c"}).encode()
    head = f"GET /v1/sessions/x HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.3)  # the body comes later, as over a slow link
        sock.sendall(body)
        status, headers, answer = _read_response(sock)
        assert status == 401 and "token" in json.loads(answer)["error"]
        assert headers.get("connection", "").lower() != "close"
        sock.sendall(f"{head}Content-Length: 0\r\n\r\n".encode())
        status, _, answer = _read_response(sock)
        assert status == 401, answer


def test_read_token_reads_write_token_writes(enrolled: NodeProcess) -> None:
    write, read = tokens(enrolled)
    start = {"charger": "bay-1", "connector": 1, "id_token": "DRIVER-1", "meter_wh": 0}
    with stranger() as client:
        url = enrolled.url
        r = client.post(url + "/v1/sessions", json=start, headers={"Authorization": f"Bearer {read}"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert client.get(url + "/v1/sessions", headers={"Authorization": f"Bearer {read}"}).json()["sessions"] == []
        r = client.post(url + "/v1/sessions", json=start, headers={"Authorization": f"Bearer {write}"})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        got = client.get(url + f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {read}"})
        assert got.status_code == 200 and got.json()["id_token"] == "DRIVER-1"
        status = client.get(url + "/v1/status", headers={"Authorization": f"Bearer {read}"}).json()
        assert status["security"]["api"] == "token"


def test_event_stream_may_carry_the_token_in_the_query_nothing_else_may(enrolled: NodeProcess) -> None:
    _, read = tokens(enrolled)
    with stranger() as client:
        url = enrolled.url + f"/v1/status?access_token={read}"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Accept": "text/event-stream"}).status_code == 200
        assert client.post(url, headers={"Accept": "text/event-stream"}).status_code == 401
    log = enrolled.log_path.read_text()
    assert all(token not in log for token in tokens(enrolled))  # no token in the node's log


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True, text=True, timeout=60)


def test_meshnode_status_uses_the_token_from_the_data_dir(enrolled: NodeProcess) -> None:
    ok = cli("status", "--http", enrolled.url, "--data-dir", str(enrolled.data_dir))
    assert ok.returncode == 0, ok.stderr
    assert "node bay-1" in ok.stdout
    refused = cli("status", "--http", enrolled.url, "--data-dir", str(enrolled.data_dir / "nowhere"))
    assert refused.returncode == 1 and "wants a token" in refused.stderr and "Traceback" not in refused.stderr


def test_an_insecure_node_is_open_and_says_so(tmp_path: Path) -> None:
    node = NodeProcess("lab-1", HOST, tmp_path / "lab-1", coap_port=free_port(HOST), http_port=free_port(HOST))
    node.start()
    try:
        with stranger() as client:
            status = client.get(node.url + "/v1/status").json()
        assert status["security"] == {"enrolled": False, "mode": "insecure", "api": "open"}
        assert not (node.data_dir / "api.token").exists()
        assert node.stop() == 0
    finally:
        node.kill()
    log = node.log_path.read_text()
    assert "INSECURE: the HTTP API" in log


# --- limits: bodies while they stream, nesting, backlog, JSON errors (hole 4) -------------------


def rss_peak_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


def chunked_post(host: str, port: int, path: str, total: int, headers: str = "") -> tuple[int, bytes]:
    """POST `total` bytes of a chunked body in 1 MiB chunks; returns (bytes sent before the
    server cut us off, what it answered)."""
    chunk = b"[" * (1 << 20)
    sent = 0
    with socket.create_connection((host, port), source_address=(STRANGER, 0)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n{headers}\r\n".encode()
        )
        try:
            while sent < total:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        answer = b""
        try:
            while part := sock.recv(65536):
                answer += part
        except (ConnectionResetError, TimeoutError):
            pass
    return sent, answer


def test_a_500_mib_chunked_body_is_cut_off_while_it_streams(enrolled: NodeProcess) -> None:
    write, _ = tokens(enrolled)
    assert enrolled.proc is not None
    before = rss_peak_kib(enrolled.proc.pid)
    sent, answer = chunked_post(
        HOST, enrolled.http_port, "/v1/sessions", 500 << 20, headers=f"Authorization: Bearer {write}\r\n"
    )
    assert sent < 100 << 20, f"the node read {sent >> 20} MiB before refusing"
    assert not answer or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    grown = rss_peak_kib(enrolled.proc.pid) - before
    assert grown < 32 * 1024, f"peak RSS grew by {grown} KiB"
    # Without a token the body is not even read.
    sent, answer = chunked_post(HOST, enrolled.http_port, "/v1/sessions", 500 << 20)
    assert sent < 100 << 20 and (not answer or answer.startswith(b"HTTP/1.1 401"))
    assert enrolled.get("/v1/status")["node_id"] == "bay-1"  # still serving


def test_nested_json_is_a_400_and_errors_are_json(enrolled: NodeProcess) -> None:
    write, _ = tokens(enrolled)
    auth = {"Authorization": f"Bearer {write}"}
    with stranger() as client:
        url = enrolled.url
        r = client.post(url + "/v1/sessions", content=b"[" * 60_000, headers=auth)
        assert r.status_code == 400 and "deeper" in r.json()["error"]
        r = client.post(url + "/v1/sessions", content=json.dumps({"charger": [[[[["x"]]]]]}), headers=auth)
        assert r.status_code == 400  # shallow enough to parse, still not a charger name
        r = client.post(url + "/v1/sessions", content=b"x" * (65 * 1024), headers=auth)
        assert r.status_code == 413 and "larger" in r.json()["error"]
        for method, path, code in (("GET", "/v1/nothing-here", 404), ("DELETE", "/v1/sessions", 405)):
            r = client.request(method, url + path, headers=auth)
            assert r.status_code == code and r.headers["content-type"] == "application/json", (path, r.text)
            assert "error" in r.json()
        assert client.get(url + "/v1/status", headers=auth).status_code == 200


def listen_backlog(host: str, port: int) -> int:
    """The accept queue size of a listening TCP socket (ss shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[3] == f"{host}:{port}":
            return int(fields[2])
    raise AssertionError(f"nothing listens on {host}:{port}: {out!r}")


def test_the_accept_backlog_fits_a_site(enrolled: NodeProcess) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_backlog(HOST, enrolled.http_port) == min(2048, somaxconn)
    assert min(2048, somaxconn) >= 1000
