"""Helpers for the OCPP tests: `meshnode run` processes with OCPP on, and their charger URLs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .procs import NodeProcess, free_port, wait_until

HOSTS = [f"127.0.14.{i}" for i in range(1, 8)]
"""Loopback addresses of these tests."""


class OcppNode(NodeProcess):
    """A `meshnode run` child with its OCPP port; `ocpp_url` is what a charger is given."""

    def __init__(
        self, name: str, host: str, data_dir: Path, *, peers: list[str] = (), extra: list[str] = (), **kw: Any
    ) -> None:
        self.ocpp_port = free_port(host)
        super().__init__(
            name, host, data_dir, coap_port=free_port(host), http_port=free_port(host),
            peers=list(peers), extra=["--ocpp-port", str(self.ocpp_port), *extra], **kw,
        )  # fmt: skip

    @property
    def ocpp_url(self) -> str:
        return f"ws://{self.host}:{self.ocpp_port}/ocpp"

    def sessions(self, charger: str | None = None) -> list[dict[str, Any]]:
        listed = self.get("/v1/sessions")["sessions"]
        return [s for s in listed if charger is None or s["charger"] == charger]

    def charger(self, charger_id: str) -> dict[str, Any] | None:
        return next((c for c in self.get("/v1/status").get("chargers", []) if c["charger_id"] == charger_id), None)


def start_nodes(tmp_path: Path, count: int, *, peered: bool = True, extra: list[str] = ()) -> list[OcppNode]:
    """`count` nodes on this module's addresses, each given the others as static peers."""
    nodes = [OcppNode(f"n{i + 1}", HOSTS[i], tmp_path / f"n{i + 1}", extra=extra) for i in range(count)]
    if peered:
        for n in nodes:
            n.peers = [m.coap for m in nodes if m is not n]
    started = []
    try:
        for n in nodes:
            n.start()
            started.append(n)
    except BaseException:
        for n in started:
            n.kill()
        raise
    return nodes


def wait_peers(nodes: list[OcppNode], timeout: float = 60.0) -> None:
    names = {n.name for n in nodes}

    def formed() -> bool:
        for n in nodes:
            alive = {p["node_id"] for p in n.get("/v1/status")["peers"] if p["state"] == "alive"}
            if alive < names - {n.name}:
                return False
        return True

    wait_until(formed, timeout, what="the mesh to form")


async def in_thread(fn: Any, *args: Any) -> Any:
    """A blocking call (HTTP to a node) from the chargers' asyncio loop, which must keep serving."""
    return await asyncio.to_thread(fn, *args)


async def eventually(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a blocking predicate from asyncio until it holds (bounded)."""
    await asyncio.to_thread(wait_until, predicate, timeout, 0.2, what)
