"""Tariffs: site-signed price entries in the replicated site config, and pricing.

A tariff is an entry of the site-config document's `tariffs` map, signed with the
site key (`meshnode site tariff ...` makes one), stored under `tariff_key`
(`<id>@<version>`), so every version stays in the document and the choice among
them is made here, by rule, not by whichever write Automerge kept:

    entry = CBOR [signed: bstr, sig: bstr(64)],  sig = Ed25519(site key, CONTEXT + signed)
    signed = CBOR {v: 1, t: "tariff", site, id, version, currency,
                   energy_per_kwh, time_per_hour, idle_per_hour: decimal strings (major units),
                   idle_grace_minutes: int, valid_from, valid_to: seconds since the epoch or null,
                   ts: when it was signed}

Pricing (`price_session`), decimal arithmetic, rounded once, half-up, to cents:

    energy  = energy_per_kwh * kWh delivered
    time    = time_per_hour  * hours charging (start to the end of energy transfer)
    idle    = idle_per_hour  * hours after the end of energy transfer until stop,
              less `idle_grace_minutes` (never negative)
    total   = energy + time + idle

The end of energy transfer is the last applied event whose meter reading rose
(the start if none did): a car that stays plugged in after it is full pays the
idle fee, like OCPI's PARKING_TIME.

Which tariff prices a session (`select_tariff`): among the site's verified
tariffs valid at the session's start (`valid_from <= start < valid_to`), the one
the session's snapshot names (`tariff_id`, what the node showed the driver) if it
is among them, else the one that became valid last, then the highest version.
No valid tariff: the session is *unpriced* (`NO_TARIFF`; the cloud says so; it never
invents a price, and there is no built-in one). Minor units are hundredths of the
currency (cents).

Unpriced sessions (`decide_price`): the cloud still bills their energy, once, and
issues their receipt, which carries no money (`priced: false`, no `cost_cents`, no
`currency`); the ledger row has `cost_cents = null` and is flagged for review
(`no_tariff`). When the site's tariffs change at the cloud, every unpriced session of
the site is priced again by the same rule, from the tariff valid at *its start*: a
tariff signed later prices earlier sessions only if its `valid_from` says so (the
default of `meshnode site tariff` is the moment it is signed). The receipt stays as
issued (one per session, ever); the ledger row and the OCPI CDR carry the price.

Pure functions and a sans-IO holder of the cloud's site configs: no clock, no I/O. `uplink` cannot import `meshnode`, so the
signing format lives here and the node's site-config service imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing
from automerge.core import Document

from crdt import SITE_CONFIG_ID, DocumentError, Replica, SyncSession, heads_hash, read_site_config

from ._wire import CloudSyncRequest

CONTEXT = b"meshnode/tariff/v1\x00"
MAX_ENTRY_BYTES = 4096
MAX_ID_LEN = 25  # an OCPI Tariff.id is CiString(36): "<id>-<version>" must fit
MAX_PRICE = Decimal(10000)
PRICE_FIELDS = ("energy_per_kwh", "time_per_hour", "idle_per_hour")


class TariffEntryError(ValueError):
    """A tariff entry does not parse, does not verify, or has the wrong shape."""


@dataclass(frozen=True)
class Tariff:
    """A verified tariff (prices in major units of `currency`)."""

    tariff_id: str
    version: int
    site: str
    currency: str
    energy_per_kwh: Decimal
    time_per_hour: Decimal
    idle_per_hour: Decimal
    idle_grace_minutes: int
    valid_from: float | None
    valid_to: float | None
    issued: float

    @property
    def key(self) -> str:
        return f"{self.tariff_id}@{self.version}"

    def valid_at(self, ts: float) -> bool:
        return (self.valid_from is None or self.valid_from <= ts) and (self.valid_to is None or ts < self.valid_to)

    def to_json(self) -> dict[str, Any]:
        return {
            "tariff_id": self.tariff_id,
            "version": self.version,
            "site": self.site,
            "currency": self.currency,
            "energy_per_kwh": str(self.energy_per_kwh),
            "time_per_hour": str(self.time_per_hour),
            "idle_per_hour": str(self.idle_per_hour),
            "idle_grace_minutes": self.idle_grace_minutes,
            "valid_from": self.valid_from,
            "valid_to": self.valid_to,
            "issued": self.issued,
        }


def _decimal(value: Any, what: str) -> Decimal:
    if not isinstance(value, str) or len(value) > 20:
        raise TariffEntryError(f"{what} must be a decimal string, got {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise TariffEntryError(f"{what} is not a decimal number: {value!r}") from exc
    if not number.is_finite() or number < 0 or number > MAX_PRICE:
        raise TariffEntryError(f"{what} must be from 0 to {MAX_PRICE}, got {value!r}")
    if number.as_tuple().exponent < -4:  # type: ignore[operator]
        raise TariffEntryError(f"{what} has more than 4 decimals: {value!r}")
    return number


def _time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TariffEntryError(f"{what} must be seconds since the epoch or null")
    return float(value)


def _text(value: Any, what: str, limit: int = MAX_ID_LEN) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable() or "@" in value:
        raise TariffEntryError(f"{what} must be a printable string of 1 to {limit} characters without '@'")
    return value


def _check(body: Mapping[str, Any]) -> Tariff:
    if body.get("v") != 1 or body.get("t") != "tariff":
        raise TariffEntryError("not a tariff entry (v 1, t 'tariff')")
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:
        raise TariffEntryError("version must be an integer from 1")
    currency = body.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isascii() or not currency.isupper():
        raise TariffEntryError("currency must be an ISO 4217 code (three capital letters)")
    grace = body.get("idle_grace_minutes", 0)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= 24 * 60:
        raise TariffEntryError("idle_grace_minutes must be an integer from 0 to 1440")
    valid_from = _time(body.get("valid_from"), "valid_from")
    valid_to = _time(body.get("valid_to"), "valid_to")
    if valid_from is not None and valid_to is not None and valid_to <= valid_from:
        raise TariffEntryError("valid_to must come after valid_from")
    issued = _time(body.get("ts"), "ts")
    prices = {name: _decimal(body.get(name), name) for name in PRICE_FIELDS}
    return Tariff(
        tariff_id=_text(body.get("id"), "id"),
        version=version,
        site=_text(body.get("site"), "site", 128),
        currency=currency,
        idle_grace_minutes=grace,
        valid_from=valid_from,
        valid_to=valid_to,
        issued=issued or 0.0,
        **prices,
    )


def make_tariff_entry(
    signing_key: nacl.signing.SigningKey,
    *,
    site: str,
    tariff_id: str,
    version: int,
    currency: str,
    energy_per_kwh: str,
    time_per_hour: str = "0",
    idle_per_hour: str = "0",
    idle_grace_minutes: int = 0,
    valid_from: float | None = None,
    valid_to: float | None = None,
    now: float,
) -> bytes:
    """Sign a tariff with the site key. Raises TariffEntryError for a value it would refuse."""
    body: dict[str, Any] = {
        "v": 1, "t": "tariff", "site": site, "id": tariff_id, "version": version, "currency": currency,
        "energy_per_kwh": energy_per_kwh, "time_per_hour": time_per_hour, "idle_per_hour": idle_per_hour,
        "idle_grace_minutes": idle_grace_minutes, "valid_from": valid_from, "valid_to": valid_to, "ts": float(now),
    }  # fmt: skip
    _check(body)
    signed = cbor2.dumps(body, canonical=True)
    return cbor2.dumps([signed, signing_key.sign(CONTEXT + signed).signature], canonical=True)


def _split(entry: Any) -> tuple[bytes, bytes]:
    if not isinstance(entry, bytes | bytearray) or len(entry) > MAX_ENTRY_BYTES:
        raise TariffEntryError(f"a tariff entry is at most {MAX_ENTRY_BYTES} bytes")
    try:
        outer = cbor2.loads(bytes(entry))
    except Exception as exc:  # cbor2 raises several types on bad input
        raise TariffEntryError("tariff entry is not CBOR") from exc
    if (
        not isinstance(outer, list)
        or len(outer) != 2
        or not all(isinstance(x, bytes) for x in outer)
        or len(outer[1]) != 64
    ):
        raise TariffEntryError("tariff entry is not a signed CBOR pair")
    return outer[0], outer[1]


def is_tariff_entry(entry: bytes) -> bool:
    """Whether `entry` says it is a tariff (without verifying: for routing to the right check)."""
    try:
        signed, _ = _split(entry)
        body = cbor2.loads(signed)
    except Exception:
        return False
    return isinstance(body, dict) and body.get("t") == "tariff"


def verify_tariff_entry(
    entry: bytes, site_public_keys: bytes | Sequence[bytes], *, expected_key: str | None = None
) -> Tariff:
    """Check a tariff entry's signature (any of the site's keys) and shape.

    Args:
        expected_key: the key it is stored under in the `tariffs` map, which must be its own.

    Raises:
        TariffEntryError: not one, a bad signature, a bad value, or stored under another key.
    """
    signed, sig = _split(entry)
    keys = [site_public_keys] if isinstance(site_public_keys, bytes | bytearray) else list(site_public_keys)
    for key in keys:
        try:
            nacl.signing.VerifyKey(bytes(key)).verify(CONTEXT + signed, sig)
            break
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            continue
    else:
        raise TariffEntryError("tariff entry: signature does not verify with the site's key")
    try:
        body = cbor2.loads(signed)
    except Exception as exc:
        raise TariffEntryError("tariff entry: signed content is not CBOR") from exc
    if not isinstance(body, dict):
        raise TariffEntryError("tariff entry: signed content is not a map")
    tariff = _check(body)
    if expected_key is not None and expected_key != tariff.key:
        raise TariffEntryError(f"tariff {tariff.key} stored under {expected_key!r}")
    return tariff


def site_tariffs(
    entries: Mapping[str, Any], site_public_keys: bytes | Sequence[bytes], site: str | None = None
) -> tuple[list[Tariff], list[str]]:
    """The verified tariffs of a site-config `tariffs` map, and why the others were refused.

    A tariff signed for another site than `site` (when given) is refused too.
    """
    good: list[Tariff] = []
    rejected: list[str] = []
    for key, value in sorted(entries.items()):
        try:
            blob = bytes(value) if isinstance(value, bytes | bytearray | list) else value
            tariff = verify_tariff_entry(blob, site_public_keys, expected_key=key)
            if site is not None and tariff.site != site:
                raise TariffEntryError(f"tariff {tariff.key} is for site {tariff.site!r}, not {site!r}")
        except (TariffEntryError, TypeError, ValueError) as exc:
            rejected.append(f"{key}: {exc}")
            continue
        good.append(tariff)
    return good, rejected


def select_tariff(tariffs: Iterable[Tariff], start_s: float, wanted_id: str | None = None) -> Tariff | None:
    """The tariff that prices a session starting at `start_s` (see the module's rule), or None."""
    valid = [t for t in tariffs if t.valid_at(start_s)]
    if wanted_id is not None and any(t.tariff_id == wanted_id for t in valid):
        valid = [t for t in valid if t.tariff_id == wanted_id]
    if not valid:
        return None
    return max(valid, key=lambda t: (-math.inf if t.valid_from is None else t.valid_from, t.version, t.tariff_id))


@dataclass(frozen=True)
class Priced:
    """A session's price under one tariff; amounts in minor units (cents)."""

    tariff_id: str
    tariff_version: int
    currency: str
    energy_wh: int
    charging_seconds: float
    idle_seconds: float
    energy_cents: int
    time_cents: int
    idle_cents: int
    total_cents: int


def _cents(amount: Decimal) -> int:
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def price_session(tariff: Tariff, *, energy_wh: int, start_ms: int, charge_end_ms: int, stop_ms: int) -> Priced:
    """Price a completed session (module docstring). Times are the events' `ts` (ms)."""
    charge_end_ms = min(max(charge_end_ms, start_ms), max(stop_ms, start_ms))
    charging = Decimal(charge_end_ms - start_ms) / 1000
    idle = Decimal(max(0, stop_ms - charge_end_ms)) / 1000
    billable_idle = max(Decimal(0), idle - Decimal(tariff.idle_grace_minutes * 60))
    energy = tariff.energy_per_kwh * Decimal(energy_wh) / 1000
    time_cost = tariff.time_per_hour * charging / 3600
    idle_cost = tariff.idle_per_hour * billable_idle / 3600
    return Priced(
        tariff_id=tariff.tariff_id,
        tariff_version=tariff.version,
        currency=tariff.currency,
        energy_wh=energy_wh,
        charging_seconds=float(charging),
        idle_seconds=float(idle),
        energy_cents=_cents(energy),
        time_cents=_cents(time_cost),
        idle_cents=_cents(idle_cost),
        total_cents=_cents(energy + time_cost + idle_cost),
    )


def charge_end_ts(events: Iterable[tuple[str, int, int | None]]) -> int | None:
    """When energy transfer ended: the `ts` of the last event whose meter reading rose.

    Args:
        events: (type, ts, meter_wh) of the applied events, in fold order.

    Returns:
        That ts; the `start` event's ts if the meter never rose; None without a start.
    """
    end: int | None = None
    last: int | None = None
    for kind, ts, meter in events:
        if kind == "start":
            end = ts if end is None else end
        if meter is not None:
            if last is not None and meter > last:
                end = ts
            last = meter if last is None else max(last, meter)
    return end


# --- the cloud's copy of each site's config ---------------------------------------------


@dataclass(frozen=True)
class SiteConfigApplied:
    """What one sync message for a site's config did on the cloud."""

    reply: bytes | None
    error: str | None
    changed: bool


class SiteConfigs:
    """The cloud's replica of every site's site-config document, and its verified tariffs.

    The leader sends its site config (`crdt.SITE_CONFIG_ID`) in the same sync batches
    as sessions; every site uses that one id, so the cloud keeps one `Replica` per site
    (the request's `site`). Nothing here does I/O: the service persists `saved(site)`
    in the same transaction as the sessions of the request.

    Args:
        site_keys: site name -> the site's Ed25519 public keys. Tariffs of a site whose
            key the cloud does not know are not verified, hence not used.
    """

    def __init__(self, site_keys: Mapping[str, Sequence[bytes]] | None = None) -> None:
        self.site_keys = {site: [bytes(k) for k in keys] for site, keys in (site_keys or {}).items()}
        self.replicas: dict[str, Replica] = {}
        self._verified: dict[str, tuple[bytes, list[Tariff], list[str]]] = {}

    def load(self, saved: Iterable[tuple[str, bytes]]) -> None:
        for site, data in saved:
            self.replicas[site] = Replica({SITE_CONFIG_ID: Document.load(data)})

    def on_request(self, site: str, node: str, msg: bytes | None, reset: bool) -> SiteConfigApplied:
        """Apply a leader's sync message for its site's config; refuse one that is not that site's config."""
        replica = self.replicas.setdefault(site, Replica())
        before = replica.docs.get(SITE_CONFIG_ID)
        saved = before.save() if before is not None else None

        def check(doc_id: str, doc: Document) -> None:
            content = read_site_config(doc)
            if content.get("site") != site:
                raise DocumentError(f"site config of site {content.get('site')!r} sent for site {site!r}")

        session = SyncSession(replica, node, validate=check, check_changed=check)
        applied = session.on_request({SITE_CONFIG_ID: msg}, [SITE_CONFIG_ID] if reset else [])
        error = applied.errors.get(SITE_CONFIG_ID)
        if applied.damaged:
            replica.book.forget_doc(SITE_CONFIG_ID)
            if saved is None:
                replica.docs.pop(SITE_CONFIG_ID, None)
            else:
                replica.docs[SITE_CONFIG_ID] = Document.load(saved)
        # Answered even while the cloud lacks the document: its empty reply is what
        # makes the leader send the changes. A site whose config the cloud still lacks
        # keeps no state (a stranger naming sites leaves nothing behind); the leader's
        # next message carries the changes, which apply on a fresh state.
        replies = session.replies([SITE_CONFIG_ID], applied.errors)
        if SITE_CONFIG_ID not in replica.docs:
            self.replicas.pop(site, None)
        return SiteConfigApplied(replies.get(SITE_CONFIG_ID), error, bool(applied.changes) and error is None)

    def restore(self, site: str, saved: bytes | None) -> None:
        """Put a site's config back to what the database holds (after a failed commit)."""
        replica = self.replicas.get(site)
        if replica is None:
            return
        replica.book.forget_doc(SITE_CONFIG_ID)
        if saved is None:
            replica.docs.pop(SITE_CONFIG_ID, None)
        else:
            replica.docs[SITE_CONFIG_ID] = Document.load(saved)

    def saved(self, site: str) -> bytes | None:
        doc = self.replicas.get(site, Replica()).docs.get(SITE_CONFIG_ID)
        return doc.save() if doc is not None else None

    def _check(self, site: str) -> tuple[list[Tariff], list[str]]:
        doc = self.replicas.get(site, Replica()).docs.get(SITE_CONFIG_ID)
        if doc is None:
            return [], []
        hh = heads_hash(doc.get_heads())
        cached = self._verified.get(site)
        if cached is not None and cached[0] == hh:
            return cached[1], cached[2]
        try:
            entries = read_site_config(doc).get("tariffs", {})
        except DocumentError:
            entries = {}
        keys = self.site_keys.get(site)
        if keys:
            good, rejected = site_tariffs(entries, keys, site)
        else:
            good, rejected = [], [f"{k}: the cloud has no key for site {site!r}" for k in sorted(entries)]
        self._verified[site] = (hh, good, rejected)
        return good, rejected

    def tariffs(self, site: str) -> list[Tariff]:
        """The site's tariffs that verify with its key (every version)."""
        return self._check(site)[0]

    def rejected(self, site: str) -> list[str]:
        """Entries of the site's `tariffs` map that were refused, and why."""
        return self._check(site)[1]

    def sites(self) -> list[str]:
        return sorted(site for site, replica in self.replicas.items() if SITE_CONFIG_ID in replica.docs)


# --- the cloud's pricing decision ---------------------------------------------------------

UNPRICED = "unpriced"
NO_TARIFF = "no_tariff"
"""The review kind of a completed session that no tariff priced."""


@dataclass(frozen=True)
class PriceDecision:
    """How the cloud prices one session (see `decide_price`).

    Attributes:
        cost_cents, currency: the price, or None when the session is unpriced.
        tariff_id, tariff_version: the site tariff used, or None.
        detail: JSON-able account (status, source, components, or why unpriced).
    """

    cost_cents: int | None
    currency: str | None
    tariff_id: str | None
    tariff_version: int | None
    detail: dict[str, Any]


def _unpriced(reason: str) -> PriceDecision:
    return PriceDecision(None, None, None, None, {"status": UNPRICED, "kind": NO_TARIFF, "reason": reason})


def decide_price(
    tariffs: Sequence[Tariff],
    snapshot: Mapping[str, Any],
    events: Sequence[tuple[str, int, int | None]],
    energy_wh: int,
) -> PriceDecision:
    """The cloud's pricing rule: the site's verified tariff that `select_tariff` picks
    for the session's start prices it (preferring the one the session's snapshot names,
    what the node showed the driver). No verified tariff valid at the start: *unpriced*,
    with the reason. Nothing else prices a session: the snapshot is unsigned (a node
    wrote it), so its own numbers are never used, and there is no default price.

    Args:
        tariffs: the site's verified tariffs (`SiteConfigs.tariffs`).
        snapshot: the session document's `tariff` map.
        events: (type, ts ms, meter_wh) of the applied events in fold order.
    """
    start = next((ts for kind, ts, _ in events if kind == "start"), events[0][1] if events else None)
    stop = next((ts for kind, ts, _ in events if kind == "stop"), events[-1][1] if events else None)
    if not tariffs:
        return _unpriced("the site has no tariff the cloud can verify")
    if start is None:
        return _unpriced("no events yet")
    wanted = snapshot.get("tariff_id") if isinstance(snapshot.get("tariff_id"), str) else None
    tariff = select_tariff(tariffs, start / 1000, wanted)
    if tariff is None:
        return _unpriced("no tariff of the site is valid at the session's start")
    end = charge_end_ts(events)
    priced = price_session(
        tariff,
        energy_wh=energy_wh,
        start_ms=start,
        charge_end_ms=end if end is not None else start,
        stop_ms=stop if stop is not None else start,
    )
    detail = {"status": "priced", "source": "site", **dataclasses.asdict(priced)}
    return PriceDecision(priced.total_cents, priced.currency, tariff.tariff_id, tariff.version, detail)


def split_site_config(request: CloudSyncRequest) -> tuple[CloudSyncRequest, tuple[bytes | None, bool] | None]:
    """Take the site config's message out of a leader's request: (sessions only, (msg, reset) or None)."""
    if SITE_CONFIG_ID not in request.msgs and SITE_CONFIG_ID not in request.reset:
        return request, None
    rest = dataclasses.replace(
        request,
        msgs={d: m for d, m in request.msgs.items() if d != SITE_CONFIG_ID},
        reset=tuple(d for d in request.reset if d != SITE_CONFIG_ID),
    )
    return rest, (request.msgs.get(SITE_CONFIG_ID), SITE_CONFIG_ID in request.reset)


def with_site_config(
    site: SiteConfigApplied, errors: Mapping[str, str], replies: Mapping[str, bytes]
) -> tuple[dict[str, str], dict[str, bytes]]:
    """A reply's errors and messages with the site config's answer added."""
    errors, replies = dict(errors), dict(replies)
    if site.error is not None:
        errors[SITE_CONFIG_ID] = site.error
    elif site.reply is not None:
        replies[SITE_CONFIG_ID] = site.reply
    return errors, replies


@dataclass(frozen=True)
class OperatorConfig:
    """What the cloud needs from its operator to bill and export.

    Attributes:
        site_keys: site name -> the site's Ed25519 public keys (verify tariff entries).
        ocpi_token: the token OCPI clients present (None: OCPI routes are off).
        ocpi_country_code, ocpi_party_id: this CPO's OCPI identity.
        ocpi_locations: see `uplink._ocpi.DEFAULT_LOCATION`.
    """

    site_keys: Mapping[str, Sequence[bytes]] = dataclasses.field(default_factory=dict)
    ocpi_token: str | None = None
    ocpi_country_code: str = "NL"
    ocpi_party_id: str = "MSH"
    ocpi_locations: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    """site -> OCPI location fields the ledger lacks (address, city, country, latitude, ...)."""
