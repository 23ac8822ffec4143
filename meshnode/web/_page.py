"""The node's operator page: `GET /`, its assets, a JSON snapshot and a server-sent event stream.

    GET /                     the page (HTML; static, holds no data)
    GET /assets/{file}        its CSS and JavaScript (package data: `meshnode/web/static/`, and the
                              CSS and helper script shared with the cloud's page, `uplink/static/`)
    GET /v1/page/snapshot     what the page shows, as JSON
    GET /v1/page/events       the same, as server-sent events (`event: snapshot`), pushed on change

Everything the page shows comes through the two `/v1/page/...` routes, so a node
that puts bearer-token auth in front of `/v1` protects the data and not the
static files; the page sends `Authorization: Bearer <token>` on both (it reads
the stream with `fetch`, not `EventSource`, which cannot send headers). The field
has no internet: every asset is served by the node, nothing from a CDN.

Cost: one snapshot is built at most once per `MIN_INTERVAL` seconds, however many
pages are open (`LiveFeed` shares it). A stream pushes when the snapshot's
content changed (a document changed, a peer came or went, the leader moved) and
at least every `REFRESH` seconds otherwise (peers' ages move on, and membership
changes are seen that way); at most `MAX_CLIENTS` streams at once (503 after),
and a stream ends after `MAX_STREAM_SECONDS` (the page reconnects), so a
forgotten tab holds nothing for ever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from crdt import SITE_CONFIG_ID

if TYPE_CHECKING:
    from .._node import Node

log = logging.getLogger("meshnode.web")

MIN_INTERVAL = 1.0
"""Seconds between two snapshot builds (shared by every open page)."""
REFRESH = 5.0
"""A stream sends the snapshot at least this often, changed or not (peer ages move on)."""
MAX_CLIENTS = 8
"""Open event streams at once; more get 503 (a phone per organiser, not the public)."""
MAX_STREAM_SECONDS = 600.0
"""A stream ends after this long; the page reconnects (bounds what a forgotten tab holds)."""
MAX_SESSIONS = 200
"""Sessions listed in a snapshot, newest first (the total is given too)."""
MAX_CONFLICTS = 100

# Keys whose values change every second without anything happening; left out of
# the digest that decides whether a snapshot changed.
_VOLATILE = ("generated_ts", "last_seen_s")

STATIC = "static"


def _static_dir() -> str:
    return str(resources.files(__package__).joinpath(STATIC))


# --- the snapshot ------------------------------------------------------------------


def _uplink_state(status: dict[str, Any]) -> str:
    """ONLINE when some live node of the mesh (this one included) leads with a working uplink."""
    explicit = status.get("connectivity")
    if isinstance(explicit, str) and explicit:
        return explicit.upper()
    return "ONLINE" if status.get("leader") else "OFFLINE"


def _chargers(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Chargers and connectors, if the node's status has them (OCPP); read defensively."""
    raw = status.get("chargers")
    if raw is None and isinstance(status.get("ocpp"), dict):
        raw = status["ocpp"].get("chargers")
    if isinstance(raw, dict):
        raw = [
            {"charger_id": k, **v} if isinstance(v, dict) else {"charger_id": k, "status": v} for k, v in raw.items()
        ]
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw[:200]:
        if not isinstance(item, dict):
            continue
        cid = item.get("charger_id", item.get("id", item.get("charge_point_id")))
        connectors = item.get("connectors")
        if isinstance(connectors, dict):
            connectors = [
                {"connector_id": k, **v} if isinstance(v, dict) else {"connector_id": k, "status": v}
                for k, v in connectors.items()
            ]
        if not isinstance(connectors, list):
            connectors = []
        out.append(
            {
                "charger_id": str(cid) if cid is not None else "?",
                "status": _short(item.get("status", item.get("state", "connected" if item.get("connected") else None))),
                "protocol": _short(item.get("protocol", item.get("ocpp_version"))),
                "connectors": [
                    {
                        "connector_id": _short(c.get("connector_id", c.get("id"))),
                        "status": _short(c.get("status", c.get("state"))),
                        "session_id": _short(c.get("session_id")),
                    }
                    for c in connectors[:32]
                    if isinstance(c, dict)
                ],
            }
        )
    return out


def _short(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)[:80]


class SessionRows:
    """Each session's row as of its heads: a document that did not change is not folded again."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[frozenset[bytes], dict[str, Any], list[dict[str, Any]]]] = {}

    def read(self, node: Node) -> list[tuple[str, frozenset[bytes], dict[str, Any], list[dict[str, Any]]]]:
        """(doc_id, heads, row, conflicts) for every session the node holds."""
        out = []
        docs = node.replica.docs
        for doc_id in list(self._rows):
            if doc_id not in docs:  # archived or dropped
                del self._rows[doc_id]
        for doc_id in list(docs):
            if doc_id == SITE_CONFIG_ID:
                continue
            heads = frozenset(node.documents.heads(doc_id))  # without loading an unloaded document
            cached = self._rows.get(doc_id)
            if cached is None or cached[0] != heads:
                try:
                    data, view = node.fold(doc_id)
                except Exception:  # noqa: BLE001 - a document that does not read as a session is left out
                    continue
                row = {
                    "session_id": doc_id,
                    "state": view.state,
                    "energy_wh": view.energy_wh,
                    "charger": data.charger,
                    "connector": data.connector,
                    "started_ts": view.started_ts,
                    "stopped_ts": view.stopped_ts,
                    "created_by": data.created_by,
                    "reconciled": data.receipt is not None,
                    "conflicts": len(view.conflicts),
                }
                cached = self._rows[doc_id] = (
                    heads,
                    row,
                    [{"session_id": doc_id, **c.to_json()} for c in view.conflicts],
                )
            out.append((doc_id, *cached))
        return out


def node_snapshot(node: Node, wall_now: float, rows: SessionRows | None = None) -> dict[str, Any]:
    """What the page shows, built from the node's public reads.

    Args:
        node: a started node.
        wall_now: seconds since the epoch (the snapshot's timestamp).
        rows: the sessions' rows from the last snapshot (kept by the caller), so that
            only documents that changed are read again.
    """
    status = node.status_json()
    me = node.node_id
    leader = status.get("leader")
    live_direct = {n.node_id: n for n in node.live_neighbours()}

    nodes = [
        {
            "node_id": me,
            "address": status.get("address"),
            "state": "self",
            "uplink_score": status.get("uplink_score"),
            "direct": False,
            "last_seen_s": 0.0,
            "leader": leader == me,
        }
    ]
    for peer in status.get("peers", []):
        nodes.append({**peer, "leader": leader == peer["node_id"]})
    alive = {n["node_id"] for n in nodes if n["state"] in ("self", "alive", "suspect")}
    links: set[tuple[str, str]] = set()
    for peer_id, neighbour in live_direct.items():
        links.add(tuple(sorted((me, peer_id))))  # type: ignore[arg-type]
        for target in neighbour.targets or ():
            if target in alive and target != peer_id:
                links.add(tuple(sorted((peer_id, target))))  # type: ignore[arg-type]

    sessions: list[dict[str, Any]] = []
    conflicts: list[dict[str, Any]] = []
    for doc_id, heads, row, doc_conflicts in (rows or SessionRows()).read(node):
        holders = [n for n in live_direct.values() if doc_id in n.known]
        # This node, and the direct neighbours that told us (or were sent) they hold it;
        # `in_sync_on` counts those whose heads match ours.
        in_sync = 1 + sum(1 for n in holders if frozenset(n.known[doc_id]) == heads)
        sessions.append({**row, "known_on": 1 + len(holders), "in_sync_on": in_sync})
        conflicts.extend(doc_conflicts)
    sessions.sort(key=lambda s: (-(s["started_ts"] or 0), s["session_id"]))
    conflicts.sort(key=lambda c: (c["session_id"], c["kind"], c["event_id"]))

    return {
        "generated_ts": round(wall_now, 3),
        "node": {
            "node_id": me,
            "site": status.get("site"),
            "address": status.get("address"),
            "incarnation": status.get("incarnation"),
            "uplink_score": status.get("uplink_score"),
            "leader": leader,
            "leader_changes": status.get("leader_changes"),
            "cloud_url": status.get("cloud_url"),
            "mesh": status.get("sync_state"),
            "uplink": _uplink_state(status),
            "documents": status.get("documents"),
            "archived": status.get("archived"),
            "documents_not_everywhere": status.get("documents_not_everywhere"),
            "forwarder": status.get("forwarder"),
            "secure": bool((status.get("security") or {}).get("enrolled")),
        },
        "nodes": nodes,
        "links": sorted(list(link) for link in links),
        "sessions": sessions[:MAX_SESSIONS],
        "sessions_total": len(sessions),
        "conflicts": conflicts[:MAX_CONFLICTS],
        "conflicts_total": len(conflicts),
        "chargers": _chargers(status),
    }


def snapshot_digest(snapshot: dict[str, Any]) -> bytes:
    """A digest of what changed meaningfully: ages and timestamps (`_VOLATILE`) are left out,
    at the top level and in the rows of its lists (where they are)."""

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in _VOLATILE}
        return value

    kept = {k: [stable(x) for x in v] if isinstance(v, list) else v for k, v in snapshot.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, default=str).encode()).digest()


# --- the shared feed (sans-IO: `now` is passed in) -----------------------------------


class LiveFeed:
    """One snapshot shared by every open page, rebuilt at most every `min_interval` seconds.

    `version` grows when the content (by `snapshot_digest`) changes. `clients` counts
    open streams; `admit` refuses beyond `max_clients`.
    """

    def __init__(
        self, build: Callable[[], dict[str, Any]], *, min_interval: float = MIN_INTERVAL, max_clients: int = MAX_CLIENTS
    ) -> None:
        self._build = build
        self.min_interval = min_interval
        self.max_clients = max_clients
        self.clients = 0
        self.version = 0
        self.builds = 0
        self._built_at = -math.inf
        self._digest = b""
        self._payload = b""
        self.dirty = False
        """A document changed since the last build."""

    def mark_dirty(self) -> None:
        self.dirty = True

    def next_build_at(self) -> float:
        """The earliest time `get` builds a new snapshot."""
        return self._built_at + self.min_interval

    def get(self, now: float) -> tuple[int, bytes]:
        """The current (version, JSON payload); rebuilt if older than `min_interval`."""
        if now >= self.next_build_at():
            snapshot = self._build()
            digest = snapshot_digest(snapshot)
            if digest != self._digest:
                self._digest = digest
                self.version += 1
            self._payload = json.dumps(snapshot, separators=(",", ":"), default=str).encode()
            self._built_at = now
            self.builds += 1
            self.dirty = False
        return self.version, self._payload

    def admit(self) -> bool:
        if self.clients >= self.max_clients:
            return False
        self.clients += 1
        return True

    def leave(self) -> None:
        self.clients -= 1


def should_send(*, now: float, version: int, sent_version: int, sent_at: float) -> bool:
    """A stream sends the snapshot when its content changed, or `REFRESH` seconds after the last one."""
    return version != sent_version or now - sent_at >= REFRESH


# --- the stream ------------------------------------------------------------------------


class ChangeSignal:
    """Wakes every open stream when a document changes (one `trio.Event` per stream)."""

    def __init__(self) -> None:
        self._events: set[trio.Event] = set()

    def fire(self) -> None:
        for event in self._events:
            event.set()

    def subscribe(self) -> trio.Event:
        event = trio.Event()
        self._events.add(event)
        return event

    def unsubscribe(self, event: trio.Event) -> None:
        self._events.discard(event)


async def snapshot_events(
    feed: LiveFeed, changes: ChangeSignal, *, max_seconds: float = MAX_STREAM_SECONDS
) -> AsyncIterator[bytes]:
    """One page's server-sent events: a snapshot at once, then on change (at most one per
    `feed.min_interval`, so a burst of changes makes one) or after `REFRESH` seconds."""
    changed = changes.subscribe()
    started = trio.current_time()
    sent_version, sent_at = -1, -math.inf
    try:
        yield b"retry: 3000\n\n"
        while trio.current_time() - started < max_seconds:
            now = trio.current_time()
            version, payload = feed.get(now)
            changes.unsubscribe(changed)  # what changed before this point is in the feed (or `dirty`)
            changed = changes.subscribe()
            if should_send(now=now, version=version, sent_version=sent_version, sent_at=sent_at):
                sent_version, sent_at = version, now
                yield b"event: snapshot\ndata: " + payload + b"\n\n"
            if not feed.dirty:  # nothing new since the snapshot we hold: wait for a change
                with trio.move_on_at(sent_at + REFRESH):
                    await changed.wait()
            await trio.sleep_until(feed.next_build_at())  # no rebuild sooner than the feed allows
    finally:
        changes.unsubscribe(changed)


# --- routes ------------------------------------------------------------------------


def page_routes(node: Node, *, wall_clock: Callable[[], float] = time.time) -> list[BaseRoute]:
    """The page's routes, to add to the node's API application."""
    rows = SessionRows()
    feed = LiveFeed(lambda: node_snapshot(node, wall_clock(), rows))
    changes = ChangeSignal()

    def on_change(doc_id: str) -> None:
        feed.mark_dirty()
        changes.fire()

    node.change_listeners.append(on_change)

    async def page(request: Request) -> Response:
        body = resources.files(__package__).joinpath(STATIC, "node.html").read_bytes()
        return Response(body, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def snapshot(request: Request) -> Response:
        _, payload = feed.get(trio.current_time())
        return Response(payload, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        if not feed.admit():
            return JSONResponse(
                {"error": f"too many live pages open (at most {feed.max_clients}); close one and retry"},
                status_code=503,
                headers={"Retry-After": "10"},
            )

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in snapshot_events(feed, changes):
                    yield chunk
            finally:
                feed.leave()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return [
        Route("/", page, methods=["GET"]),
        # The page's own files, then the CSS and helper script it shares with the cloud's page,
        # kept once in uplink's package data (uplink is below meshnode; the cloud cannot reach ours).
        Mount("/assets", app=StaticFiles(directory=_static_dir(), packages=[("uplink", "static")]), name="assets"),
        Route("/v1/page/snapshot", snapshot, methods=["GET"]),
        Route("/v1/page/events", events, methods=["GET"]),
    ]
