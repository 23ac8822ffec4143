"""The cloud's operator page: sites, the ledger, sessions flagged for review, approve / reject.

    GET  /                             the page (HTML; static, holds no data)
    GET  /assets/{file}                its CSS and JavaScript (package data, `uplink/static/`)
    GET  /v1/page/overview             what the page shows, as JSON
    GET  /v1/reviews                   every recorded decision, oldest first
    POST /v1/reviews/{session_id}      {"decision": "approve" | "reject", "reviewer"?, "note"?} -> 201

Flagged for review (`review_kinds`): a session a node let an unknown driver charge on
its offline policy (kind `review`: the ledger's `review` column, set from the authorize
event), one with conflicts (`conflicts`), or a completed session that no tariff priced
(`no_tariff`: its row has no price; it stops being flagged once a tariff valid at its
start prices it, see `uplink/_tariffs.py`). A decision is a row in the ledger's `reviews` table, never changed
afterwards; the latest decision of a session is its standing one, and a later
one (a person changing their mind) is recorded beside it. Deciding changes no
billing: the ledger row and the receipt are the cloud's, the decision is the
operator's note on them, for the finance team and the export.

Sites and their leaders: the sync request names the site and the leader's node id.
`SiteContacts` is an ASGI middleware that reads them from each accepted sync request
(the body is decoded a second time, after the service answered; a batch is at most
`MAX_REQUEST_BYTES`); it keeps the last contact of each site in memory, so after a
restart a site shows its last ledger update and no leader until its leader syncs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import cbor2
import trio
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._tariffs import NO_TARIFF
from ._wire import MAX_INFLATED, SYNC_PATH, CloudSyncRequest, WireError, decompress

if TYPE_CHECKING:
    from ._cloud import CloudService

log = logging.getLogger("uplink.cloud.web")

DECISIONS = ("approve", "reject")
MAX_NOTE = 500
MAX_REVIEWER = 80
MAX_LEDGER_ROWS = 200
"""Ledger rows in the overview, most recently updated first (the total is given too)."""
MAX_SITES = 1000
"""Sites remembered in memory (each sync names one; a bounded table, oldest contact dropped)."""
MAX_SYNC_PEEK = 8 * 1024 * 1024
"""Largest sync body the contact tracker keeps to read (the service refuses larger ones anyway)."""
STATIC = "static"


def _static_dir() -> str:
    return str(resources.files(__package__).joinpath(STATIC))


# --- sites and their leaders -----------------------------------------------------------


@dataclass
class SiteContact:
    site: str
    leader: str
    last_contact_ms: int
    requests: int = 1


@dataclass
class SiteContacts:
    """The last sync of every site: which node sent it and when (in memory, bounded)."""

    limit: int = MAX_SITES
    sites: dict[str, SiteContact] = field(default_factory=dict)

    def note(self, site: str, leader: str, now_ms: int) -> None:
        known = self.sites.get(site)
        if known is not None:
            known.leader, known.last_contact_ms, known.requests = leader, now_ms, known.requests + 1
            return
        if len(self.sites) >= self.limit:
            oldest = min(self.sites.values(), key=lambda c: c.last_contact_ms)
            del self.sites[oldest.site]
        self.sites[site] = SiteContact(site, leader, now_ms)


class TrackContacts:
    """ASGI middleware: after an accepted `POST /v1/sync`, note its site and leader."""

    def __init__(self, app: ASGIApp, contacts: SiteContacts, wall_clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.contacts = contacts
        self.wall_clock = wall_clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != SYNC_PATH:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        status = 0

        async def tee() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request" and size <= MAX_SYNC_PEEK:
                body = message.get("body", b"")
                size += len(body)
                chunks.append(body)
            return message

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, tee, watch)
        if status == 200 and size <= MAX_SYNC_PEEK:
            request = peek_sync_request(b"".join(chunks))
            if request is not None:  # the service accepted it, so it reads; never fail the request
                self.contacts.note(request.site, request.node_id, int(self.wall_clock() * 1000))


def peek_sync_request(body: bytes) -> CloudSyncRequest | None:
    """The plain request inside a sync body the service has accepted: a `CloudSyncRequest`,
    or the `req` of a `SignedSyncRequest` (what every enrolled leader sends to a cloud run
    with `--site`; the service checked its signature, this only reads it). None if neither."""
    try:
        inflated = decompress(body, MAX_INFLATED)
        try:
            return CloudSyncRequest.decode(inflated)
        except WireError:
            outer = cbor2.loads(inflated)
            signed = (
                cbor2.loads(outer["signed"])
                if isinstance(outer, dict) and isinstance(outer.get("signed"), bytes)
                else None
            )
            if isinstance(signed, dict) and isinstance(signed.get("req"), bytes):
                return CloudSyncRequest.decode(signed["req"])
    except Exception:  # cbor2 and the wire decoder raise several types on bad input
        return None
    return None


# --- the overview (pure: rows in, page data out) ---------------------------------------


def review_kinds(row: Mapping[str, Any]) -> list[str]:
    """Why a session waits for a person: `review` (an unknown driver let in offline),
    `conflicts`, `no_tariff` (completed, and no tariff priced it). Empty: not flagged.
    The same rule as the `meshnode_cloud_reviews_pending` gauge (`_metrics.py`)."""
    kinds = []
    if row.get("review"):
        kinds.append("review")
    if int(row.get("conflicts") or 0) > 0:
        kinds.append("conflicts")
    if row.get("cost_cents") is None and row.get("state") in ("completed", "reconciled"):
        kinds.append(NO_TARIFF)
    return kinds


def is_flagged(row: Mapping[str, Any]) -> bool:
    """A session waits for a person (`review_kinds`)."""
    return bool(review_kinds(row))


def _reasons(row: Mapping[str, Any], kinds: list[str]) -> list[str]:
    text = {
        "review": lambda: f"unknown driver ({row['review']})",
        "conflicts": lambda: f"{row['conflicts']} conflict(s)",
        NO_TARIFF: lambda: "no tariff: unpriced",
    }
    return [text[k]() for k in kinds]


def overview(
    rows: list[dict[str, Any]],
    reviews: list[dict[str, Any]],
    contacts: Mapping[str, SiteContact],
    stats: Mapping[str, int],
    now_ms: int,
) -> dict[str, Any]:
    """What the cloud page shows, from the ledger rows, the decisions and the contacts."""
    latest: dict[str, dict[str, Any]] = {}
    for review in reviews:  # oldest first: the last one stands
        latest[review["session_id"]] = review

    sites: dict[str, dict[str, Any]] = {}
    for row in rows:
        site = sites.setdefault(
            row["site"],
            {"site": row["site"], "sessions": 0, "reconciled": 0, "energy_wh": 0, "last_update_ms": 0},
        )
        site["sessions"] += 1
        site["reconciled"] += row["state"] == "reconciled"
        site["energy_wh"] += int(row["energy_wh"] or 0)
        site["last_update_ms"] = max(site["last_update_ms"], int(row["updated"] or 0))
    for name, contact in contacts.items():
        site = sites.setdefault(
            name, {"site": name, "sessions": 0, "reconciled": 0, "energy_wh": 0, "last_update_ms": 0}
        )
        site["leader"] = contact.leader
        site["last_contact_ms"] = contact.last_contact_ms
        site["sync_requests"] = contact.requests
    for site in sites.values():
        site.setdefault("leader", None)
        site.setdefault("last_contact_ms", site["last_update_ms"] or None)
        site.setdefault("sync_requests", None)

    flagged = []
    for row in rows:
        kinds = review_kinds(row)
        if not kinds:
            continue
        decision = latest.get(row["session_id"])
        flagged.append({**_ledger_json(row), "kinds": kinds, "reasons": _reasons(row, kinds), "decision": decision})
    flagged.sort(key=lambda f: (f["decision"] is not None, -(f["updated"] or 0), f["session_id"]))
    recent = sorted(rows, key=lambda r: (-(r["updated"] or 0), r["session_id"]))[:MAX_LEDGER_ROWS]
    return {
        "generated_ms": now_ms,
        "sites": sorted(sites.values(), key=lambda s: s["site"]),
        "ledger": [_ledger_json(r) | {"decision": latest.get(r["session_id"])} for r in recent],
        "ledger_total": len(rows),
        "flagged": flagged,
        "pending_reviews": sum(1 for f in flagged if f["decision"] is None),
        "stats": dict(stats),
    }


def _ledger_json(row: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("session_id", "site", "charger", "connector", "id_token", "start_ts", "stop_ts", "energy_wh",
            "cost_cents", "currency", "tariff_id", "tariff_version", "state", "conflicts", "review", "receipt_ts",
            "first_seen", "updated")  # fmt: skip
    return {k: row.get(k) for k in keys} | {"reconciled": row.get("receipt") is not None}


# --- routes ----------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _text(obj: Mapping[str, Any], key: str, limit: int, default: str) -> str | None:
    """A printable string of at most `limit` characters, `default` when absent; None when invalid."""
    value = obj.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        return None
    return value.strip() or default


@dataclass
class CloudPages:
    """What `_cloud.py` adds to its application: the page's routes and the contact tracker."""

    routes: list[BaseRoute]
    middleware: list[Middleware]
    contacts: SiteContacts


def cloud_pages(resolve: Callable[[Request], CloudService], wall_clock: Callable[[], float] = time.time) -> CloudPages:
    """The page's routes and middleware, for the service `resolve` finds."""
    contacts = SiteContacts()

    async def page(request: Request) -> Response:
        body = resources.files(__package__).joinpath(STATIC, "cloud.html").read_bytes()
        return Response(body, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    def read_overview(cloud: CloudService) -> dict[str, Any]:
        with cloud.ledger.read() as tx:
            rows, reviews = tx.ledger_rows(), tx.reviews()
        return overview(rows, reviews, dict(contacts.sites), cloud.stats(), int(wall_clock() * 1000))

    async def get_overview(request: Request) -> Response:
        data = await trio.to_thread.run_sync(read_overview, resolve(request))
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    async def list_reviews(request: Request) -> Response:
        cloud = resolve(request)

        def read() -> list[dict[str, Any]]:
            with cloud.ledger.read() as tx:
                return tx.reviews(request.query_params.get("session_id"))

        return JSONResponse({"reviews": await trio.to_thread.run_sync(read)})

    async def decide(request: Request) -> Response:
        cloud = resolve(request)
        session_id = request.path_params["session_id"]
        body = await request.body()
        if len(body) > 4096:
            return _error(413, "request body is larger than 4096 bytes")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        if not isinstance(obj, dict):
            return _error(400, "request body must be a JSON object")
        decision = obj.get("decision")
        if decision not in DECISIONS:
            return _error(400, f"'decision' must be one of {', '.join(DECISIONS)}")
        reviewer = _text(obj, "reviewer", MAX_REVIEWER, "operator")
        note = _text(obj, "note", MAX_NOTE, "")
        if reviewer is None or note is None:
            return _error(400, f"'reviewer' and 'note' must be printable text (at most {MAX_REVIEWER} / {MAX_NOTE})")
        now = int(wall_clock() * 1000)

        def record() -> tuple[int, dict[str, Any]]:
            with cloud.ledger.transaction() as tx:
                row = tx.ledger_row(session_id)
                if row is None:
                    return 404, {"error": f"no session {session_id!r}"}
                if not is_flagged(row):
                    return 409, {"error": f"session {session_id!r} is not flagged for review"}
                tx.add_review(session_id, decision, reviewer, note, now)
            return 201, {
                "session_id": session_id, "decision": decision, "reviewer": reviewer, "note": note, "decided_ts": now,
            }  # fmt: skip

        status, out = await trio.to_thread.run_sync(record)
        if status == 201:
            log.info("session %r: %s by %r", session_id, decision, reviewer)
        return JSONResponse(out, status_code=status)

    routes: list[BaseRoute] = [
        Route("/", page, methods=["GET"]),
        Mount("/assets", app=StaticFiles(directory=_static_dir()), name="assets"),
        Route("/v1/page/overview", get_overview, methods=["GET"]),
        Route("/v1/reviews", list_reviews, methods=["GET"]),
        Route("/v1/reviews/{session_id}", decide, methods=["POST"]),
    ]
    return CloudPages(routes, [Middleware(TrackContacts, contacts=contacts, wall_clock=wall_clock)], contacts)
