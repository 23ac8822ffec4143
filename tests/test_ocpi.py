"""OCPI 2.2.1 export: envelope, token auth, pagination, and objects checked against the spec.

The JSON schemas below are written from the OCPI 2.2.1 field tables (mod_cdrs,
mod_sessions, mod_tariffs, types, version_information_endpoint): required fields
(cardinality 1 / +), string lengths (string(n), CiString(n)), enums, the DateTime
format, and no field the spec does not define. The cloud is the real app, fed by a
leader through the sync API with a site tariff, as in tests/test_tariffs.py.
"""

from __future__ import annotations

import base64
import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jsonschema
import pytest

from crdt import SITE_CONFIG_ID, site_config_put
from uplink._tariffs import OperatorConfig

from .conftest import make_signer
from .test_cloud import Leader, asgi_cloud
from .test_tariffs import SITE_PUB, T0, entry, session, site_config

TOKEN = "finance-team-token"
AUTH = {"Authorization": "Token " + base64.b64encode(TOKEN.encode()).decode()}
OPERATOR = OperatorConfig(site_keys={"field": [SITE_PUB]}, ocpi_token=TOKEN)

# --- schemas from the OCPI 2.2.1 field tables --------------------------------------------


def ci(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n, "pattern": r"^[\x20-\x7E]*$"}


def s(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


DATETIME = {"type": "string", "maxLength": 25, "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z?$"}
NUMBER = {"type": "number"}
PRICE = obj({"excl_vat": NUMBER}, {"incl_vat": NUMBER})
CONNECTOR_TYPES = [
    "CHADEMO", "CHAOJI", "DOMESTIC_A", "DOMESTIC_B", "DOMESTIC_C", "DOMESTIC_D", "DOMESTIC_E", "DOMESTIC_F",
    "DOMESTIC_G", "DOMESTIC_H", "DOMESTIC_I", "DOMESTIC_J", "DOMESTIC_K", "DOMESTIC_L", "DOMESTIC_M", "DOMESTIC_N",
    "DOMESTIC_O", "GBT_AC", "GBT_DC", "IEC_60309_2_single_16", "IEC_60309_2_three_16", "IEC_60309_2_three_32",
    "IEC_60309_2_three_64", "IEC_62196_T1", "IEC_62196_T1_COMBO", "IEC_62196_T2", "IEC_62196_T2_COMBO",
    "IEC_62196_T3A", "IEC_62196_T3C", "NEMA_5_20", "NEMA_6_30", "NEMA_6_50", "NEMA_10_30", "NEMA_10_50",
    "NEMA_14_30", "NEMA_14_50", "PANTOGRAPH_BOTTOM_UP", "PANTOGRAPH_TOP_DOWN", "TESLA_R", "TESLA_S",
]  # fmt: skip
CDR_TOKEN = obj({"uid": ci(36), "type": {"enum": ["AD_HOC_USER", "APP_USER", "OTHER", "RFID"]}, "contract_id": ci(36)})
DIMENSION = obj({
    "type": {"enum": ["CURRENT", "ENERGY", "ENERGY_EXPORT", "ENERGY_IMPORT", "MAX_CURRENT", "MIN_CURRENT",
                      "MAX_POWER", "MIN_POWER", "PARKING_TIME", "POWER", "RESERVATION_TIME", "STATE_OF_CHARGE",
                      "TIME"]},
    "volume": NUMBER,
})  # fmt: skip
CHARGING_PERIOD = obj(
    {"start_date_time": DATETIME, "dimensions": {"type": "array", "items": DIMENSION, "minItems": 1}},
    {"tariff_id": ci(36)},
)
GEO = obj({
    "latitude": {"type": "string", "maxLength": 10, "pattern": r"^-?[0-9]{1,2}\.[0-9]{5,7}$"},
    "longitude": {"type": "string", "maxLength": 11, "pattern": r"^-?[0-9]{1,3}\.[0-9]{5,7}$"},
})  # fmt: skip
CDR_LOCATION = obj(
    {
        "id": ci(36), "address": s(45), "city": s(45), "country": s(3), "coordinates": GEO, "evse_uid": ci(36),
        "evse_id": ci(48), "connector_id": ci(36), "connector_standard": {"enum": CONNECTOR_TYPES},
        "connector_format": {"enum": ["SOCKET", "CABLE"]},
        "connector_power_type": {"enum": ["AC_1_PHASE", "AC_2_PHASE", "AC_2_PHASE_SPLIT", "AC_3_PHASE", "DC"]},
    },
    {"name": s(255), "postal_code": s(10), "state": s(20)},
)  # fmt: skip
PRICE_COMPONENT = obj(
    {"type": {"enum": ["ENERGY", "FLAT", "PARKING_TIME", "TIME"]}, "price": NUMBER, "step_size": {"type": "integer"}},
    {"vat": NUMBER},
)
TARIFF = obj(
    {
        "country_code": ci(2), "party_id": ci(3), "id": ci(36), "currency": s(3),
        "elements": {"type": "array", "minItems": 1, "items": obj(
            {"price_components": {"type": "array", "minItems": 1, "items": PRICE_COMPONENT}},
            {"restrictions": {"type": "object"}},
        )},
        "last_updated": DATETIME,
    },
    {
        "type": {"enum": ["AD_HOC_PAYMENT", "PROFILE_CHEAP", "PROFILE_FAST", "PROFILE_GREEN", "REGULAR"]},
        "tariff_alt_text": {"type": "array", "items": obj({"language": s(2), "text": s(512)})},
        "tariff_alt_url": {"type": "string"}, "min_price": PRICE, "max_price": PRICE,
        "start_date_time": DATETIME, "end_date_time": DATETIME, "energy_mix": {"type": "object"},
    },
)  # fmt: skip
AUTH_METHOD = {"enum": ["AUTH_REQUEST", "COMMAND", "WHITELIST"]}
CDR = obj(
    {
        "country_code": ci(2), "party_id": ci(3), "id": ci(39), "start_date_time": DATETIME,
        "end_date_time": DATETIME, "cdr_token": CDR_TOKEN, "auth_method": AUTH_METHOD, "cdr_location": CDR_LOCATION,
        "currency": s(3), "charging_periods": {"type": "array", "minItems": 1, "items": CHARGING_PERIOD},
        "total_cost": PRICE, "total_energy": NUMBER, "total_time": NUMBER, "last_updated": DATETIME,
    },
    {
        "session_id": ci(36), "authorization_reference": ci(36), "meter_id": s(255),
        "tariffs": {"type": "array", "items": TARIFF}, "signed_data": {"type": "object"},
        "total_fixed_cost": PRICE, "total_energy_cost": PRICE, "total_time_cost": PRICE,
        "total_parking_time": NUMBER, "total_parking_cost": PRICE, "total_reservation_cost": PRICE,
        "remark": s(255), "invoice_reference_id": ci(39), "credit": {"type": "boolean"},
        "credit_reference_id": ci(39), "home_charging_compensation": {"type": "boolean"},
    },
)  # fmt: skip
SESSION = obj(
    {
        "country_code": ci(2), "party_id": ci(3), "id": ci(36), "start_date_time": DATETIME, "kwh": NUMBER,
        "cdr_token": CDR_TOKEN, "auth_method": AUTH_METHOD, "location_id": ci(36), "evse_uid": ci(36),
        "connector_id": ci(36), "currency": s(3),
        "status": {"enum": ["ACTIVE", "COMPLETED", "INVALID", "PENDING", "RESERVATION"]}, "last_updated": DATETIME,
    },
    {
        "end_date_time": DATETIME, "authorization_reference": ci(36), "meter_id": s(255),
        "charging_periods": {"type": "array", "items": CHARGING_PERIOD}, "total_cost": PRICE,
    },
)  # fmt: skip
VERSION_NUMBER = {"enum": ["2.0", "2.1", "2.1.1", "2.2", "2.2.1"]}
VERSIONS = {"type": "array", "minItems": 1, "items": obj({"version": VERSION_NUMBER, "url": s(255)})}
VERSION_DETAILS = obj({
    "version": VERSION_NUMBER,
    "endpoints": {"type": "array", "minItems": 1, "items": obj({
        "identifier": {"enum": ["cdrs", "chargingprofiles", "commands", "credentials", "hubclientinfo", "locations",
                                "sessions", "tariffs", "tokens"]},
        "role": {"enum": ["SENDER", "RECEIVER"]},
        "url": s(255),
    })},
})  # fmt: skip


def envelope_of(data: dict[str, Any]) -> dict[str, Any]:
    return obj(
        {"status_code": {"type": "integer", "minimum": 1000, "maximum": 4999}, "status_message": s(255),
         "timestamp": DATETIME},
        {"data": data},
    )  # fmt: skip


def check(body: Any, data_schema: dict[str, Any]) -> Any:
    jsonschema.validate(body, envelope_of(data_schema))
    return body.get("data")


# --- a cloud with priced sessions ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = float(T0 + 86400)

    def __call__(self) -> float:
        return self.now


async def fill(client: httpx.AsyncClient, clock: Clock, count: int) -> list[str]:
    """`count` sessions, each synced (and receipted) one minute after the previous one."""
    ids = []
    leader = Leader("node-a", {SITE_CONFIG_ID: site_config(entry())})
    signer = make_signer("node-a")
    for i in range(count):
        sid = f"sess-{i:02d}"
        leader.replica.add(sid, session(sid, start_s=T0 + i * 60, signer=signer))
        clock.now += 60
        await leader.sync(client)
        ids.append(sid)
    assert leader.errors == {}
    return ids


async def test_the_routes_are_off_without_a_token(tmp_path: Path):
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db") as (_, client):
        r = await client.get("/ocpi/versions", headers=AUTH)
        assert r.status_code == 404 and "not enabled" in r.json()["status_message"]
        check(r.json(), {})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Token {TOKEN}"},  # not base64: OCPI 2.2.1 wants the encoded token
        {"Authorization": "Token " + base64.b64encode(b"someone-else").decode()},
        {"Authorization": "Bearer " + base64.b64encode(TOKEN.encode()).decode()},
        {"Authorization": "Token !!!"},
    ],
)
async def test_a_missing_or_wrong_token_is_refused(tmp_path: Path, headers: dict[str, str]):
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (_, client):
        for path in ("/ocpi/versions", "/ocpi/2.2.1", "/ocpi/2.2.1/cdrs"):
            r = await client.get(path, headers=headers)
            assert r.status_code == 401, path
            body = r.json()
            check(body, {})
            assert body["status_code"] == 2000 and "data" not in body


async def test_versions_and_details_lead_to_the_three_sender_modules(tmp_path: Path):
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (_, client):
        r = await client.get("/ocpi/versions", headers=AUTH)
        assert r.status_code == 200
        versions = check(r.json(), VERSIONS)
        assert r.json()["status_code"] == 1000 and versions[0]["version"] == "2.2.1"
        details = check((await client.get(urlsplit(versions[0]["url"]).path, headers=AUTH)).json(), VERSION_DETAILS)
        assert {(e["identifier"], e["role"]) for e in details["endpoints"]} == {
            ("cdrs", "SENDER"), ("sessions", "SENDER"), ("tariffs", "SENDER"),
        }  # fmt: skip


async def test_cdrs_page_with_link_and_counts_and_filter_on_last_updated(tmp_path: Path):
    clock = Clock()
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR, wall_clock=clock) as (_, client):
        ids = await fill(client, clock, 5)
        seen: list[str] = []
        url: str | None = "/ocpi/2.2.1/cdrs?limit=2"
        pages = 0
        while url is not None:
            r = await client.get(url, headers=AUTH)
            assert r.status_code == 200
            page = check(r.json(), {"type": "array", "items": CDR})
            assert r.headers["X-Total-Count"] == "5" and r.headers["X-Limit"] == "2" and len(page) <= 2
            seen += [c["id"] for c in page]
            pages += 1
            link = r.headers.get("Link")
            if link is None:
                url = None
            else:
                target, rel = link.split(";")
                assert rel.strip() == 'rel="next"'
                parts = urlsplit(target.strip()[1:-1])
                assert parse_qs(parts.query)["offset"] == [str(len(seen))]
                url = f"{parts.path}?{parts.query}"
        assert seen == ids and pages == 3
        # The server caps the page size and says so.
        big = await client.get("/ocpi/2.2.1/cdrs?limit=5000", headers=AUTH)
        assert big.headers["X-Limit"] == "100" and len(big.json()["data"]) == 5 and "Link" not in big.headers
        # date_from inclusive, date_to exclusive, on last_updated (the row's last change: here the receipt).
        first = big.json()["data"]
        window = await client.get(
            "/ocpi/2.2.1/cdrs",
            params={"date_from": first[1]["last_updated"], "date_to": first[3]["last_updated"]},
            headers=AUTH,
        )
        assert [c["id"] for c in window.json()["data"]] == ids[1:3] and window.headers["X-Total-Count"] == "2"
        beyond = await client.get("/ocpi/2.2.1/cdrs?offset=10", headers=AUTH)
        assert beyond.json()["data"] == [] and beyond.headers["X-Total-Count"] == "5"


@pytest.mark.parametrize(
    "query", ["date_from=yesterday", "offset=-1", "limit=x", "date_to=2026-13-01T00:00:00Z", "offset=1e3"]
)
async def test_bad_parameters_get_2001(tmp_path: Path, query: str):
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (_, client):
        r = await client.get(f"/ocpi/2.2.1/cdrs?{query}", headers=AUTH)
        assert r.status_code == 400 and r.json()["status_code"] == 2001
        check(r.json(), {})


async def test_a_cdr_total_is_what_its_tariff_charges(tmp_path: Path):
    clock = Clock()
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR, wall_clock=clock) as (_, client):
        await fill(client, clock, 1)
        cdr = check((await client.get("/ocpi/2.2.1/cdrs", headers=AUTH)).json(), {"type": "array", "items": CDR})[0]
        assert cdr["tariffs"][0]["id"] == "std-1" and {p["tariff_id"] for p in cdr["charging_periods"]} == {"std-1"}
        prices = {c["type"]: Decimal(str(c["price"])) for c in cdr["tariffs"][0]["elements"][0]["price_components"]}
        energy = Decimal(str(cdr["total_energy"]))
        parking = Decimal(str(cdr["total_parking_time"]))
        charging = Decimal(str(cdr["total_time"])) - parking
        grace = Decimal(10) / 60  # the entry's idle_grace_minutes, stated in tariff_alt_text
        assert "first 10 min free" in cdr["tariffs"][0]["tariff_alt_text"][0]["text"]
        expected = (
            prices["ENERGY"] * energy + prices["TIME"] * charging + prices["PARKING_TIME"] * max(0, parking - grace)
        )
        assert Decimal(str(cdr["total_cost"]["excl_vat"])) == expected.quantize(Decimal("0.01")) == Decimal("8.10")
        parts = (cdr["total_energy_cost"], cdr["total_time_cost"], cdr["total_parking_cost"])
        assert sum(Decimal(str(p["excl_vat"])) for p in parts) == Decimal("8.10")
        assert (cdr["currency"], cdr["auth_method"], cdr["cdr_token"]["uid"]) == ("EUR", "WHITELIST", "tok")


async def test_sessions_and_tariffs_modules_validate(tmp_path: Path):
    clock = Clock()
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR, wall_clock=clock) as (_, client):
        await fill(client, clock, 2)
        r = await client.get("/ocpi/2.2.1/sessions", headers=AUTH)
        sessions = check(r.json(), {"type": "array", "items": SESSION})
        assert [x["status"] for x in sessions] == ["COMPLETED", "COMPLETED"] and r.headers["X-Total-Count"] == "2"
        assert sessions[0]["total_cost"] == {"excl_vat": 8.1} and sessions[0]["kwh"] == 10.0
        r = await client.get("/ocpi/2.2.1/tariffs", headers=AUTH)
        tariffs = check(r.json(), {"type": "array", "items": TARIFF})
        assert [t["id"] for t in tariffs] == ["std-1"] and r.headers["X-Total-Count"] == "1"
        assert {c["type"] for c in tariffs[0]["elements"][0]["price_components"]} == {"ENERGY", "TIME", "PARKING_TIME"}


async def test_an_unpriced_session_has_no_cdr_until_a_tariff_valid_at_its_start_prices_it(tmp_path: Path):
    """OCPI needs `total_cost`: no CDR for a session no tariff priced (it is still a Session,
    without `total_cost`). The tariff that prices it later gives it a CDR, dated then."""
    clock = Clock()
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR, wall_clock=clock) as (_, client):
        leader = Leader("node-a", {SITE_CONFIG_ID: site_config(), "s1": session("s1")})  # a site without tariffs
        await leader.sync(client)
        receipted = clock.now
        r = await client.get("/ocpi/2.2.1/cdrs", headers=AUTH)
        assert check(r.json(), {"type": "array", "items": CDR}) == [] and r.headers["X-Total-Count"] == "0"
        [unpriced] = check(
            (await client.get("/ocpi/2.2.1/sessions", headers=AUTH)).json(), {"type": "array", "items": SESSION}
        )
        assert unpriced["status"] == "COMPLETED" and unpriced["kwh"] == 10.0 and "total_cost" not in unpriced
        assert check((await client.get("/ocpi/2.2.1/tariffs", headers=AUTH)).json(), {"type": "array"}) == []
        clock.now += 3600
        config = leader.replica.docs[SITE_CONFIG_ID]
        site_config_put(config, "tariffs", "std@1", entry())  # valid from a day before the session
        await leader.sync(client)
        [cdr] = check((await client.get("/ocpi/2.2.1/cdrs", headers=AUTH)).json(), {"type": "array", "items": CDR})
        assert cdr["id"] == "s1" and cdr["total_cost"] == {"excl_vat": 8.1} and cdr["tariffs"][0]["id"] == "std-1"
        # Dated when it was priced, so a finance team that pulled up to then gets it next time.
        since = await client.get("/ocpi/2.2.1/cdrs", params={"date_from": cdr["last_updated"]}, headers=AUTH)
        assert [c["id"] for c in since.json()["data"]] == ["s1"] and cdr["last_updated"] > ocpi_time(receipted)


def ocpi_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_schemas_catch_what_the_spec_forbids():
    """The schemas must be able to fail: a too-long id, a missing total_cost, a wrong enum, a bad DateTime."""
    good = {
        "country_code": "NL", "party_id": "MSH", "id": "x", "start_date_time": "2026-01-01T00:00:00Z",
        "end_date_time": "2026-01-01T01:00:00Z", "cdr_token": {"uid": "t", "type": "RFID", "contract_id": "t"},
        "auth_method": "WHITELIST",
        "cdr_location": {
            "id": "l", "address": "a", "city": "c", "country": "NLD",
            "coordinates": {"latitude": "52.00000", "longitude": "4.00000"}, "evse_uid": "e", "evse_id": "e",
            "connector_id": "1", "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
            "connector_power_type": "AC_3_PHASE",
        },
        "currency": "EUR", "charging_periods": [{"start_date_time": "2026-01-01T00:00:00Z",
                                                 "dimensions": [{"type": "ENERGY", "volume": 1}]}],
        "total_cost": {"excl_vat": 1.0}, "total_energy": 1, "total_time": 1, "last_updated": "2026-01-01T01:00:00Z",
    }  # fmt: skip
    jsonschema.validate(good, CDR)
    for bad in (
        {**good, "id": "x" * 40},
        {k: v for k, v in good.items() if k != "total_cost"},
        {**good, "auth_method": "OFFLINE"},
        {**good, "last_updated": "2026-01-01 01:00"},
        {**good, "price": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, CDR)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_meshnode_cloud_serves_ocpi_only_with_a_token(tmp_path: Path):
    """The real `meshnode cloud`: --ocpi-token, or MESHNODE_OCPI_TOKEN, turns the routes on."""
    import json
    import os
    import subprocess
    import sys

    from .procs import free_port

    host = "127.0.12.30"
    repo = Path(__file__).resolve().parent.parent
    for how in ("flag", "env", "none"):
        port = free_port(host)
        args = [sys.executable, "-m", "meshnode.cli", "cloud", "--db", f"sqlite:///{tmp_path}/{how}.db",
                "--bind", host, "--port", str(port)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "MESHNODE_OCPI_TOKEN"}
        if how == "flag":
            args += ["--ocpi-token", TOKEN]
        elif how == "env":
            env["MESHNODE_OCPI_TOKEN"] = TOKEN
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo, env=env)
        try:
            assert proc.stdout is not None and json.loads(proc.stdout.readline())["ready"] is True
            r = httpx.get(f"http://{host}:{port}/ocpi/versions", headers=AUTH, timeout=10)
            if how == "none":
                assert r.status_code == 404 and "not enabled" in r.json()["status_message"]
            else:
                assert r.status_code == 200 and r.json()["data"][0]["url"] == f"http://{host}:{port}/ocpi/2.2.1"
                assert httpx.get(f"http://{host}:{port}/ocpi/versions", timeout=10).status_code == 401
        finally:
            proc.terminate()
            proc.wait(30)
