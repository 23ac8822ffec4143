"""Real `meshnode run` processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 90.0
"""Seconds a child may take to print its ready line. Generous: on a loaded machine (many test
processes on two cores) importing the stack alone can take tens of seconds, and start-up time is
not what these tests check."""


class NodeProcess:
    """One `meshnode run` child process bound to its own loopback address."""

    def __init__(
        self,
        name: str,
        host: str,
        data_dir: Path,
        *,
        coap_port: int,
        http_port: int,
        peers: list[str] = (),
        mdns: bool = False,
        extra: list[str] = (),
        insecure: bool = True,
    ) -> None:
        self.name, self.host, self.data_dir = name, host, data_dir
        self.coap_port, self.http_port = coap_port, http_port
        self.peers, self.mdns, self.extra = list(peers), mdns, list(extra)
        self.insecure = insecure  # False: the data dir must be enrolled
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    @property
    def coap(self) -> str:
        return f"{self.host}:{self.coap_port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        args = [
            sys.executable,
            "-m",
            "meshnode.cli",
            "run",
            "--node-id",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--bind",
            self.host,
            "--coap-port",
            str(self.coap_port),
            "--http-port",
            str(self.http_port),
            *self.extra,
        ]
        for p in self.peers:
            args += ["--peer", p]
        if not self.mdns:
            args.append("--no-mdns")
        if self.insecure:
            args.append("--insecure")
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=Path(__file__).resolve().parent.parent
        )
        assert self.proc.stdout is not None
        result: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: result.setdefault("line", self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result.get("line", "")
        if not line:
            self.kill()
            raise AssertionError(f"{self.name} did not start; log:\n{self.log_path.read_text()[-3000:]}")
        assert json.loads(line)["ready"] is True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    @property
    def headers(self) -> dict[str, str]:
        """The operator token of an enrolled node (its data dir's api.token); none for --insecure."""
        token = self.data_dir / "api.token"
        return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, headers=self.headers, timeout=10.0)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=10.0)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


def free_port(host: str = "127.0.0.1", kind: int = 0) -> int:
    """A port free for both UDP and TCP on `host` right now."""
    import socket

    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port


def environ_for_children() -> dict[str, str]:
    return dict(os.environ)
