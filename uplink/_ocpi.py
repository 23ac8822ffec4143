"""OCPI 2.2.1 export: the cloud as a CPO's Sender interface for `cdrs`, `sessions`, `tariffs`.

Routes (mounted under `/ocpi` when the operator gives a token, `meshnode cloud
--ocpi-token TOKEN`; without one they are not mounted and answer 404):

    GET /ocpi/versions                 [{version: "2.2.1", url}]
    GET /ocpi/2.2.1                    {version, endpoints: [{identifier, role: SENDER, url}]}
    GET /ocpi/2.2.1/cdrs               CDR objects     } `date_from`, `date_to` (on last_updated,
    GET /ocpi/2.2.1/sessions           Session objects }  from inclusive, to exclusive), `offset`,
    GET /ocpi/2.2.1/tariffs            Tariff objects  }  `limit`; `X-Total-Count`, `X-Limit`, `Link`

Every answer is the OCPI envelope `{data, status_code, status_message, timestamp}`
(1000 success, 2001 invalid or missing parameters, 2000 for a refused token with
HTTP 401). Authentication (OCPI 2.2.1 transport_and_format, "Authorization
header"): `Authorization: Token <base64 of the token>`, compared in constant time.

What the ledger does not know, a CPO must still send (OCPI fields of cardinality 1):
the location's address, city, country and coordinates, the connector's standard,
format and power type. They come from `OperatorConfig.ocpi_locations` per site; the
defaults are documented placeholders (docs/ocpi.md). One CDR per ledger session that
has a receipt and a price. An unpriced session (no site tariff valid at its start) has
no CDR: OCPI requires `total_cost`, and the cloud never invents one. When a tariff
that covers its start reaches the cloud, the session is priced and its CDR appears,
with `last_updated` the time it was priced (a CDR's `last_updated`, and the date
filter of `cdrs`, is its ledger row's last change: the receipt, or that pricing).
The `sessions` module lists every session, priced or not (`total_cost` only when
priced).

The object builders are pure functions of ledger rows and tariffs; the routes only
read the ledger in a worker thread and page.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._tariffs import Tariff

if TYPE_CHECKING:
    from ._cloud import CloudService

log = logging.getLogger("uplink.ocpi")

VERSION = "2.2.1"
MODULES = ("cdrs", "sessions", "tariffs")
MAX_LIMIT = 100
"""The most objects one page holds (`X-Limit` says what was applied)."""

SUCCESS, CLIENT_ERROR, INVALID_PARAMETERS = 1000, 2000, 2001

DEFAULT_LOCATION: Mapping[str, str] = {
    "address": "unknown",
    "city": "unknown",
    "country": "NLD",
    "latitude": "0.000000",
    "longitude": "0.000000",
    "connector_standard": "IEC_62196_T2",
    "connector_format": "SOCKET",
    "connector_power_type": "AC_3_PHASE",
}


# --- formats -----------------------------------------------------------------------


def ocpi_datetime(ms: int | float) -> str:
    """An OCPI DateTime: RFC 3339 in UTC with a Z, seconds precision."""
    when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> int:
    """An OCPI DateTime (UTC when no zone is given) as ms since the epoch. Raises ValueError."""
    if len(text) > 32:
        raise ValueError("too long")
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def _id36(text: str) -> str:
    """A CiString(36) id: the text when it fits, else a stable 36-character digest of it."""
    return (
        text
        if len(text) <= 36 and text.isascii() and text.isprintable()
        else hashlib.sha256(text.encode()).hexdigest()[:36]
    )


def _price(cents: int | None) -> dict[str, float] | None:
    return None if cents is None else {"excl_vat": float(Decimal(cents) / 100)}


def _hours(seconds: float) -> float:
    return round(seconds / 3600, 6)


def ocpi_tariff_id(tariff_id: str, version: int) -> str:
    return f"{tariff_id}-{version}"


# --- objects -----------------------------------------------------------------------


class Party:
    """This CPO's identity and the location data the ledger lacks."""

    def __init__(self, country_code: str, party_id: str, locations: Mapping[str, Mapping[str, str]]) -> None:
        self.country_code = country_code
        self.party_id = party_id
        self.locations = locations

    def location(self, site: str) -> dict[str, str]:
        return {**DEFAULT_LOCATION, **self.locations.get(site, {})}


def tariff_object(party: Party, tariff: Tariff) -> dict[str, Any]:
    components = [{"type": "ENERGY", "price": float(tariff.energy_per_kwh), "step_size": 1}]
    if tariff.time_per_hour:
        components.append({"type": "TIME", "price": float(tariff.time_per_hour), "step_size": 1})
    if tariff.idle_per_hour:
        components.append({"type": "PARKING_TIME", "price": float(tariff.idle_per_hour), "step_size": 1})
    text = (
        f"{tariff.energy_per_kwh} {tariff.currency}/kWh, {tariff.time_per_hour} {tariff.currency}/h charging, "
        f"{tariff.idle_per_hour} {tariff.currency}/h plugged in after charging ends "
        f"(first {tariff.idle_grace_minutes} min free)"
    )
    out: dict[str, Any] = {
        "country_code": party.country_code,
        "party_id": party.party_id,
        "id": ocpi_tariff_id(tariff.tariff_id, tariff.version),
        "currency": tariff.currency,
        "type": "REGULAR",
        "tariff_alt_text": [{"language": "en", "text": text[:512]}],
        "elements": [{"price_components": components}],
        "last_updated": ocpi_datetime(tariff.issued * 1000),
    }
    if tariff.valid_from is not None:
        out["start_date_time"] = ocpi_datetime(tariff.valid_from * 1000)
    if tariff.valid_to is not None:
        out["end_date_time"] = ocpi_datetime(tariff.valid_to * 1000)
    return out


def _cdr_token(row: Mapping[str, Any]) -> dict[str, str]:
    token = _id36(str(row["id_token"]))
    return {"uid": token, "type": "RFID", "contract_id": token}


def _pricing(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        detail = json.loads(row.get("pricing") or "{}")
    except ValueError:
        detail = {}
    return detail if isinstance(detail, dict) else {}


def _periods(row: Mapping[str, Any], detail: Mapping[str, Any], tariff_id: str | None) -> list[dict[str, Any]]:
    start = row["start_ts"] if row["start_ts"] is not None else row["first_seen"]
    charging = float(detail.get("charging_seconds", max(0, ((row["stop_ts"] or start) - start) / 1000)))
    idle = float(detail.get("idle_seconds", 0.0))
    first: dict[str, Any] = {
        "start_date_time": ocpi_datetime(start),
        "dimensions": [
            {"type": "ENERGY", "volume": row["energy_wh"] / 1000},
            {"type": "TIME", "volume": _hours(charging)},
        ],
    }
    periods = [first]
    if idle > 0:
        periods.append(
            {
                "start_date_time": ocpi_datetime(start + charging * 1000),
                "dimensions": [{"type": "PARKING_TIME", "volume": _hours(idle)}],
            }
        )
    if tariff_id is not None:
        for period in periods:
            period["tariff_id"] = tariff_id
    return periods


def _site_tariff(row: Mapping[str, Any], tariffs: Mapping[tuple[str, int], Tariff]) -> Tariff | None:
    if row.get("tariff_id") is None or row.get("tariff_version") is None:
        return None
    return tariffs.get((row["tariff_id"], int(row["tariff_version"])))


def cdr_object(party: Party, row: Mapping[str, Any], tariffs: Mapping[tuple[str, int], Tariff]) -> dict[str, Any]:
    """The CDR of a priced, receipted ledger row (its tariff as it was when the session started)."""
    detail = _pricing(row)
    tariff = _site_tariff(row, tariffs)
    tariff_ocpi_id = ocpi_tariff_id(tariff.tariff_id, tariff.version) if tariff is not None else None
    location = party.location(row["site"])
    start = row["start_ts"] if row["start_ts"] is not None else row["first_seen"]
    stop = row["stop_ts"] if row["stop_ts"] is not None else row["receipt_ts"]
    cdr: dict[str, Any] = {
        "country_code": party.country_code,
        "party_id": party.party_id,
        "id": _id36(row["session_id"]),
        "start_date_time": ocpi_datetime(start),
        "end_date_time": ocpi_datetime(stop),
        "session_id": _id36(row["session_id"]),
        "cdr_token": _cdr_token(row),
        "auth_method": "WHITELIST",
        "cdr_location": {
            "id": _id36(row["site"]),
            "name": row["site"][:255],
            "address": location["address"][:45],
            "city": location["city"][:45],
            "country": location["country"][:3],
            "coordinates": {"latitude": location["latitude"], "longitude": location["longitude"]},
            "evse_uid": _id36(row["charger"]),
            "evse_id": row["charger"][:48],
            "connector_id": str(row["connector"])[:36],
            "connector_standard": location["connector_standard"],
            "connector_format": location["connector_format"],
            "connector_power_type": location["connector_power_type"],
        },
        "currency": row["currency"],
        "tariffs": [tariff_object(party, tariff)] if tariff is not None else [],
        "charging_periods": _periods(row, detail, tariff_ocpi_id),
        "total_cost": _price(row["cost_cents"]),
        "total_energy": row["energy_wh"] / 1000,
        "total_time": _hours(max(0, stop - start) / 1000),
        "last_updated": ocpi_datetime(row["updated"]),
    }
    if detail.get("source") == "site":
        cdr["total_energy_cost"] = _price(detail["energy_cents"])
        cdr["total_time_cost"] = _price(detail["time_cents"])
        cdr["total_parking_time"] = _hours(float(detail["idle_seconds"]))
        cdr["total_parking_cost"] = _price(detail["idle_cents"])
    return cdr


_SESSION_STATUS = {"completed": "COMPLETED", "reconciled": "COMPLETED", "charging": "ACTIVE", "paused": "ACTIVE"}


def session_object(party: Party, row: Mapping[str, Any], tariffs: Mapping[tuple[str, int], Tariff]) -> dict[str, Any]:
    detail = _pricing(row)
    tariff = _site_tariff(row, tariffs)
    start = row["start_ts"] if row["start_ts"] is not None else row["first_seen"]
    out: dict[str, Any] = {
        "country_code": party.country_code,
        "party_id": party.party_id,
        "id": _id36(row["session_id"]),
        "start_date_time": ocpi_datetime(start),
        "kwh": row["energy_wh"] / 1000,
        "cdr_token": _cdr_token(row),
        "auth_method": "WHITELIST",
        "location_id": _id36(row["site"]),
        "evse_uid": _id36(row["charger"]),
        "connector_id": str(row["connector"])[:36],
        "currency": row["currency"] or (tariff.currency if tariff is not None else "EUR"),
        "charging_periods": _periods(
            row, detail, ocpi_tariff_id(tariff.tariff_id, tariff.version) if tariff is not None else None
        ),
        "status": _SESSION_STATUS.get(row["state"], "PENDING"),
        "last_updated": ocpi_datetime(row["updated"]),
    }
    if row["stop_ts"] is not None and out["status"] == "COMPLETED":
        out["end_date_time"] = ocpi_datetime(row["stop_ts"])
    if row["cost_cents"] is not None:
        out["total_cost"] = _price(row["cost_cents"])
    return out


# --- reading the ledger ----------------------------------------------------------------

_CDR_WHERE = "receipt IS NOT NULL AND cost_cents IS NOT NULL AND currency IS NOT NULL"


def _page(
    cloud: CloudService, module: str, since: int | None, until: int | None, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of (module's rows, total matching), ordered by (last_updated, id)."""
    from ._ledger import LEDGER_COLUMNS

    stamp = "updated"
    where = [_CDR_WHERE] if module == "cdrs" else ["1 = 1"]
    params: list[Any] = []
    if since is not None:
        where.append(f"{stamp} >= ?")
        params.append(since)
    if until is not None:
        where.append(f"{stamp} < ?")
        params.append(until)
    clause = " AND ".join(where)
    with cloud.ledger.read() as tx:
        total = int(tx.query(f"SELECT count(*) AS n FROM ledger WHERE {clause}", params)[0]["n"])
        rows = tx.query(
            f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE {clause} "
            f"ORDER BY {stamp}, session_id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
    return rows, total


def _tariff_index(cloud: CloudService) -> dict[tuple[str, int], Tariff]:
    return {
        (t.tariff_id, t.version): t for site in cloud.site_configs.sites() for t in cloud.site_configs.tariffs(site)
    }


# --- HTTP --------------------------------------------------------------------------------


def envelope(data: Any, status_code: int = SUCCESS, message: str = "Success", now_ms: float | None = None) -> dict:
    now = now_ms if now_ms is not None else datetime.datetime.now(datetime.UTC).timestamp() * 1000
    body: dict[str, Any] = {"status_code": status_code, "status_message": message, "timestamp": ocpi_datetime(now)}
    if data is not None:
        body["data"] = data
    return body


def token_matches(header: str | None, token: str) -> bool:
    """OCPI 2.2.1: `Authorization: Token <base64(token)>`; constant-time comparison."""
    if not header or not header.startswith("Token "):
        return False
    try:
        presented = base64.b64decode(header[len("Token ") :].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(presented, token.encode())


def ocpi_routes(resolve: Callable[[Request], CloudService]) -> list[Route]:
    """The OCPI routes; each checks the token of the service it resolves."""

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/ocpi"

    def refused(request: Request) -> Response | None:
        cloud = resolve(request)
        token = cloud.operator.ocpi_token
        if token is None:
            return JSONResponse(envelope(None, CLIENT_ERROR, "OCPI is not enabled on this service"), status_code=404)
        if not token_matches(request.headers.get("authorization"), token):
            client = request.client.host if request.client else "?"
            log.warning("OCPI request from %s refused: invalid or missing token", client)
            return JSONResponse(
                envelope(None, CLIENT_ERROR, "Authorization: Token <base64 of the token> is missing or wrong"),
                status_code=401,
            )
        return None

    async def versions(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        return JSONResponse(envelope([{"version": VERSION, "url": f"{base(request)}/{VERSION}"}]))

    async def details(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        endpoints = [{"identifier": m, "role": "SENDER", "url": f"{base(request)}/{VERSION}/{m}"} for m in MODULES]
        return JSONResponse(envelope({"version": VERSION, "endpoints": endpoints}))

    def listing(module: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            if (no := refused(request)) is not None:
                return no
            cloud = resolve(request)
            q = request.query_params
            try:
                since = parse_datetime(q["date_from"]) if "date_from" in q else None
                until = parse_datetime(q["date_to"]) if "date_to" in q else None
                offset = int(q.get("offset", "0"))
                asked = int(q.get("limit", str(MAX_LIMIT)))
                if offset < 0 or asked < 0:
                    raise ValueError("offset and limit must not be negative")
            except (ValueError, OverflowError) as exc:
                return JSONResponse(envelope(None, INVALID_PARAMETERS, f"invalid parameter: {exc}"), status_code=400)
            limit = min(asked, MAX_LIMIT)
            party = Party(cloud.operator.ocpi_country_code, cloud.operator.ocpi_party_id, cloud.operator.ocpi_locations)
            if module == "tariffs":
                data, total = _tariff_page(cloud, party, since, until, offset, limit)
            else:
                rows, total = await trio.to_thread.run_sync(_page, cloud, module, since, until, offset, limit)
                index = _tariff_index(cloud)
                build = cdr_object if module == "cdrs" else session_object
                data = [build(party, row, index) for row in rows]
            headers = {"X-Total-Count": str(total), "X-Limit": str(limit)}
            if offset + len(data) < total:
                params = {k: v for k, v in q.items() if k not in ("offset", "limit")}
                params.update(offset=str(offset + len(data)), limit=str(limit))
                headers["Link"] = f'<{base(request)}/{VERSION}/{module}?{urlencode(params)}>; rel="next"'
            return JSONResponse(envelope(data), headers=headers)

        return handler

    return [
        Route("/ocpi/versions", versions, methods=["GET"]),
        Route(f"/ocpi/{VERSION}", details, methods=["GET"]),
        *(Route(f"/ocpi/{VERSION}/{m}", listing(m), methods=["GET"]) for m in MODULES),
    ]


def _tariff_page(
    cloud: CloudService, party: Party, since: int | None, until: int | None, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """Every verified tariff of every site, filtered on last_updated (when it was signed)."""
    every = sorted(_tariff_index(cloud).values(), key=lambda t: (t.issued, t.tariff_id, t.version))
    chosen = [
        t for t in every if (since is None or t.issued * 1000 >= since) and (until is None or t.issued * 1000 < until)
    ]
    return [tariff_object(party, t) for t in chosen[offset : offset + limit]], len(chosen)
