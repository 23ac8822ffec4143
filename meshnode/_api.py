"""The node's local HTTP API (JSON), served by Hypercorn's trio worker.

Routes and field names are fixed (other tools rely on them):

    POST /v1/sessions                       {"charger", "connector", "id_token", "meter_wh"} -> 201 session
    POST /v1/sessions/{session_id}/events   {"type", "meter_wh"} -> 201 event
    GET  /v1/sessions                       {"sessions": [session, ...]}
    GET  /v1/sessions/{session_id}          session
    GET  /v1/sessions/{session_id}/automerge   the saved Automerge document
    GET  /v1/status                         node, peers, documents, sync state
    POST /v1/site/entries                   {"entry": hex} a signed revocation, network-key grant,
                                            id-token list entry or tariff -> 201 (replicated to the mesh)
    GET  /metrics                           Prometheus exposition (docs/metrics.md)

`POST /v1/sessions` requires "meter_wh", the charger's cumulative register at the start:
energy is the last reading minus the first, so a session started without one would be
billed from its first "meter" event and lose what was charged before it ("meter 1500,
stop 1700" billed 200 Wh, issue 14); a create without it is a 400 that says so. (OCPP
starts go through the bridge: 1.6's StartTransaction always has meterStart; a 2.0.1
transaction without a start reading starts at its first sampled value.)
It takes an optional "driver_token" (a token the cloud signed, checked offline; a driver
the offline policy refuses gets 403) and an optional "request_id" (a retried start finds
its session: 200).

Every route under /v1 of an enrolled node wants `Authorization: Bearer TOKEN`
(`meshnode._apiauth`: 401 without, 403 for a write with the read-only token); the
guard wraps the whole application in `serve_api`, so a route added here is covered.

A 201 means the event is durable on this node. Every refusal is a 4xx with
`{"error": "..."}` saying what is wrong; the server keeps serving. The node's
services refuse commands with domain errors (`meshnode.services`); `ERROR_STATUS`
below is the one place that gives them HTTP codes. A body that is not JSON, too
large, or missing a field is refused here, before any service sees it (400, 413).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._metrics import NodeMetrics
from ._apiauth import MAX_JSON_DEPTH, ApiGuard, ApiTokens, json_depth_ok
from ._node import Node
from .ocpp import remote_command_routes
from .services import (
    API_EVENT_TYPES,
    Conflict,
    InvalidCommand,
    NotAuthorised,
    NotFound,
    ServiceError,
)
from .web import page_routes

log = logging.getLogger("meshnode.api")

MAX_BODY = 64 * 1024
MAX_TEXT = 128

ERROR_STATUS: dict[type[ServiceError], int] = {
    NotFound: 404,
    NotAuthorised: 403,
    InvalidCommand: 400,
    Conflict: 409,
}
"""The HTTP status of each kind of service error (a subclass takes its nearest base's)."""


def status_of(exc: ServiceError) -> int:
    """The HTTP status for a service error: its class's entry in `ERROR_STATUS`, else 400."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]  # type: ignore[index]
    return 400


def _bad(status: int, message: str) -> HTTPException:
    """The request itself is unacceptable (not JSON, too large, a field missing)."""
    return HTTPException(status, message)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a huge body is never held whole
        size += len(chunk)
        if size > MAX_BODY:
            raise _bad(413, f"request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not json_depth_ok(body):
        raise _bad(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _bad(400, "request body must be a JSON object")
    return obj


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT or not value.isprintable():
        raise _bad(400, f"{key!r} must be a non-empty printable string of at most {MAX_TEXT} characters")
    return value


def _int(obj: dict[str, Any], key: str, *, required: bool, low: int, high: int) -> int | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(400, f"{key!r} must be an integer from {low} to {high}")
    return value


def _start_meter(obj: dict[str, Any]) -> int:
    """A create's "meter_wh": required, so that energy is billed from the start (see the module docstring)."""
    if obj.get("meter_wh") is None:
        raise _bad(
            400,
            "'meter_wh' is required: the charger's cumulative meter register at the start, in Wh "
            "(energy is billed from it; without it the energy before the first reading would be lost)",
        )
    return _int(obj, "meter_wh", required=True, low=0, high=2**53)  # type: ignore[return-value]


def _optional_text(obj: dict[str, Any], key: str, limit: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise _bad(400, f"{key!r} must be a printable string of at most {limit} characters")
    return value


def build_app(node: Node) -> Starlette:
    """The Starlette application for one node."""

    async def create_session(request: Request) -> Response:
        obj = await _json_body(request)
        session = await node.create_session(
            _text(obj, "charger"),
            _int(obj, "connector", required=True, low=0, high=1000),  # type: ignore[arg-type]
            _text(obj, "id_token"),
            meter_wh=_start_meter(obj),
            driver_token=_optional_text(obj, "driver_token", 4096),
            request_id=_optional_text(obj, "request_id", 128),
        )
        # A retried start (same request_id) gets the session it made: 200, not a second 201.
        return JSONResponse(session, status_code=200 if session.pop("existing", False) else 201)

    async def add_site_entry(request: Request) -> Response:
        obj = await _json_body(request)
        text = _optional_text(obj, "entry", 64 * 1024)
        try:
            entry = bytes.fromhex(text or "")
        except ValueError as exc:
            raise _bad(400, "'entry' must be the entry's bytes in hex") from exc
        if not entry:
            raise _bad(400, "'entry' is required: the signed entry's bytes in hex")
        return JSONResponse(await node.add_site_entry(entry), status_code=201)

    async def add_event(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        obj = await _json_body(request)
        kind = obj.get("type")
        if kind not in API_EVENT_TYPES:
            raise _bad(400, f"'type' must be one of {', '.join(API_EVENT_TYPES)}")
        meter = _int(obj, "meter_wh", required=kind in ("meter", "stop"), low=0, high=2**53)
        event = await node.record_event(session_id, kind, meter)
        return JSONResponse({"event": event, "session": node.session_json(session_id)}, status_code=201)

    async def list_sessions(request: Request) -> Response:
        return JSONResponse({"sessions": node.sessions_json()})

    async def get_session(request: Request) -> Response:
        return JSONResponse(node.session_json(request.path_params["session_id"]))

    async def get_automerge(request: Request) -> Response:
        data = node.automerge_bytes(request.path_params["session_id"])
        return Response(data, media_type="application/octet-stream")

    async def status(request: Request) -> Response:
        out = node.status_json()
        ocpp = getattr(node, "ocpp", None)  # set by meshnode.ocpp.serve_ocpp when OCPP is on
        if ocpp is not None:
            out["chargers"] = ocpp.status_json()
        # An enrolled node's API takes tokens (serve_api); an --insecure one is open, and says so.
        out.setdefault("security", {})["api"] = "open" if node.identity is None else "token"
        return JSONResponse(out)

    metrics = NodeMetrics(node)

    async def get_metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # at the first scrape

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return _error(status_of(exc), exc.message)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    return Starlette(
        routes=[
            Route("/v1/sessions", create_session, methods=["POST"]),
            Route("/v1/sessions", list_sessions, methods=["GET"]),
            Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
            Route("/v1/sessions/{session_id}/events", add_event, methods=["POST"]),
            Route("/v1/sessions/{session_id}/automerge", get_automerge, methods=["GET"]),
            Route("/v1/status", status, methods=["GET"]),
            Route("/v1/site/entries", add_site_entry, methods=["POST"]),
            *remote_command_routes(node),  # POST /v1/chargers/{id}/start, /v1/sessions/{id}/stop
            *page_routes(node),  # the operator page: GET /, /assets, /v1/page/... (meshnode/web)
            Route("/metrics", get_metrics, methods=["GET"]),
        ],
        exception_handlers={ServiceError: on_service_error, HTTPException: on_http_error},
    )


BACKLOG = 2048
"""Listen backlog: a site's chargers and tools connecting at once must not be reset
(Hypercorn's default is 100; the kernel caps it at net.core.somaxconn)."""


async def serve_api(
    node: Node,
    bind: str,
    port: int,
    *,
    tokens: ApiTokens | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the node's HTTP API until cancelled.

    Args:
        tokens: the API tokens every `/v1` request must carry (`meshnode._apiauth`);
            None serves an open API (only for `--insecure` nodes).
    """
    config = HypercornConfig()
    config.bind = [f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("meshnode.api.server")
    config.graceful_timeout = 0.5
    config.backlog = BACKLOG
    app = ApiGuard(build_app(node), tokens=tokens, max_body=MAX_BODY)
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]
