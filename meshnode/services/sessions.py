"""The session service: start a charging session, record its events, read its folded state.

A session is one Automerge document created by the node that starts it; its state is
the fold of its signed events (`crdt._fold`). This service is where a local command
(HTTP API, simulator, a charger adapter) becomes a signed event:

- `create` asks the site config for the offline authorisation decision, creates the
  document with an `authorize` and a `start` event, and returns once it is durable;
- `record` checks the command against the fold (the transition table, a cumulative
  meter), signs and appends the event, and stops a session that reached the limits
  it was accepted with offline;
- `fold` reads a session's state, continuing from the previous read (`FoldCache`):
  after one new event, only that event is parsed and verified.

Every refusal is a domain error (`NotFound`, `NotAuthorised`, `InvalidCommand`,
`Conflict`) raised before anything changes; the front end maps it to its own codes.
Writes go through the node's `commit` callback (durable, then announced to the mesh).
"""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import cbor2
from automerge.core import Document

from crdt import (
    DEFAULT_MAX_POWER_W,
    SITE_CONFIG_ID,
    TRANSITIONS,
    Documents,
    EventSigner,
    Keyring,
    Replica,
    SessionData,
    SessionFold,
    SessionView,
    add_event,
    heads_hash,
    meter_plausibility,
    new_session_doc,
    read_session,
    session_keyring,
    summarize_event,
)

from .._security import Certificate, Identity
from .errors import Conflict, InvalidCommand, NotAuthorised, NotFound
from .site_config import SiteConfigService

log = logging.getLogger("meshnode.sessions")

API_EVENT_TYPES = ("meter", "pause", "resume", "stop")
"""The event types a local user may record on a running session."""

Commit = Callable[[str, list[tuple[bytes, bytes]]], Awaitable[None]]

MAX_CERTIFICATES = 1024
"""Checked certificates remembered (a site has a few per node; junk from peers must not grow it)."""


class FoldCache:
    """Per session: the fold of the version last read, and the `SessionFold` to continue from.

    `get`/`pop` hand out `(heads hash, data, view)` of the last read, as a dict would
    (the node pops an entry on every change to compare the state before and after).
    Popping keeps the session's `SessionFold` while the document is in the replica, so
    the next read continues from it; once the document has left (archived), popping
    drops that too.
    """

    def __init__(self, replica: Replica) -> None:
        self._replica = replica
        self._views: dict[str, tuple[bytes, SessionData, SessionView]] = {}
        self._folds: dict[str, SessionFold] = {}

    def get(self, doc_id: str) -> tuple[bytes, SessionData, SessionView] | None:
        return self._views.get(doc_id)

    def pop(self, doc_id: str, default: Any = None) -> Any:
        entry = self._views.pop(doc_id, default)
        if doc_id not in self._replica.docs:
            self._folds.pop(doc_id, None)
        return entry

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._views

    def __len__(self) -> int:
        return len(self._views)

    def fold_of(self, doc_id: str, session_id: str) -> SessionFold:
        base = self._folds.get(doc_id)
        if base is None or base.session_id != session_id:
            base = self._folds[doc_id] = SessionFold(session_id)
        return base

    def put(self, doc_id: str, hh: bytes, data: SessionData, view: SessionView) -> None:
        self._views[doc_id] = (hh, data, view)


class SessionService:
    """Session commands and reads for one node.

    Args:
        node_id, site: this node and its site (written into new documents).
        replica: the node's documents.
        site_config: the offline authorisation decision.
        signer: the node's current event signer (it is replaced when the node resumes
            its chain at start-up, hence a callable).
        keyring: the node's own keys (trusted without a certificate).
        identity: the node's enrolment; None for an unenrolled node, which trusts the
            device keys a document declares (see `crdt.fold_session`).
        actor: the Automerge actor this node writes a document with.
        rng: where new session ids come from (seeded in the simulator).
        wall_clock: seconds since the epoch, for event timestamps.
        commit: make changes durable, then announce them.
        archived: the ids of sessions this node has archived (a container).
    """

    def __init__(
        self,
        *,
        node_id: str,
        site: str,
        replica: Replica,
        site_config: SiteConfigService,
        signer: Callable[[], EventSigner],
        keyring: Keyring,
        identity: Identity | None,
        actor: Callable[[str], bytes],
        rng: random.Random,
        wall_clock: Callable[[], float],
        commit: Commit,
        archived: Callable[[], Any] = frozenset,
    ) -> None:
        self.node_id = node_id
        self._archived = archived
        self.site = site
        self.replica = replica
        self.site_config = site_config
        self._signer = signer
        self.keyring = keyring
        self.identity = identity
        self._actor = actor
        self._rng = rng
        self._wall_clock = wall_clock
        self._commit = commit
        self.fold_cache = FoldCache(replica)
        # Certificates found in documents, checked once (a pure function of the bytes
        # and our site key): every session of a device declares the same one.
        self._certificates: dict[bytes, Certificate | None] = {}
        # The most a connector can deliver (W): written into each session's authorize event,
        # so every replica and the cloud judge its readings by the same bound (crdt fold rule 5).
        self.max_power_w = DEFAULT_MAX_POWER_W
        self.connector_max_power_w: dict[int, int] = {}

    def _wall_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    @property
    def declared_key(self) -> bytes:
        """What this node writes into a session's `devices` map: its certificate when
        enrolled (peers and the cloud check it against the site key), else its raw key."""
        return self.identity.certificate_bytes if self.identity is not None else self._signer().public_key

    # --- commands ---------------------------------------------------------------------

    async def create(
        self,
        charger: str,
        connector: int,
        id_token: str,
        *,
        meter_wh: int | None = None,
        driver_token: str | None = None,
        request_id: str | None = None,
        ts_ms: int | None = None,
        start_data: Mapping[str, Any] | None = None,
        record_refused: bool = False,
    ) -> dict[str, Any]:
        """Start a session on this node: authorise it offline and start charging.

        A charger that lost the answer to a start retries it; with the same
        `request_id` (chosen by the charger, unique per charger) the retry finds the
        session the first attempt made instead of starting a second one, which the
        cloud would bill as a session nobody charged. The session id is then derived
        from (node, charger, connector, request id), so the answer survives a restart.

        Returns:
            The session (as `session_json`), once it is durable on this node; with
            `"existing": true` when `request_id` named a session already started.

        Raises:
            NotAuthorised: the offline authorisation refuses the driver.
            Conflict: `request_id` names a session that has since been archived.
        """
        if request_id is not None:
            session_id = self.session_id_for(charger, connector, request_id)
            if session_id in self.replica.docs:
                return {**self.session_json(session_id), "existing": True}
            if session_id in self._archived():
                raise Conflict(f"request {request_id!r} started session {session_id} that is archived already")
        auth = self.site_config.authorize(id_token, driver_token)
        if not auth.accepted and not record_refused:
            raise NotAuthorised(f"not authorised offline: {auth.reason}")
        auth_data: dict[str, Any] = {"id_token": id_token, "auth": auth.reason, "review": auth.review}
        if not auth.accepted:
            auth_data.update(review=True, refused=True)
        auth_data["max_power_w"] = self.connector_max_power_w.get(connector, self.max_power_w)
        if auth.limits is not None:
            auth_data["limits"] = {"max_wh": auth.limits.max_wh, "max_minutes": auth.limits.max_minutes}
        if request_id is None:
            session_id = uuid.UUID(int=self._rng.getrandbits(128), version=4).hex
        doc = new_session_doc(
            session_id, site=self.site, charger=charger, connector=connector, id_token=id_token,
            tariff=self.site_config.tariff_snapshot(), created_by=self.node_id,
            actor=self._actor(session_id),
        )  # fmt: skip
        ts = self._wall_ms() if ts_ms is None else ts_ms
        signer = self._signer()
        add_event(doc, signer.sign("authorize", session_id, ts, data=auth_data), public_key=self.declared_key)
        start = signer.sign("start", session_id, ts, meter_wh=meter_wh, data=start_data)
        add_event(doc, start, public_key=self.declared_key)
        changes = self.replica.add(session_id, doc)
        await self._commit(session_id, changes)
        return self.session_json(session_id)

    def session_id_for(self, charger: str, connector: int, request_id: str) -> str:
        """The id of the session `create(charger, connector, ..., request_id=request_id)` makes on this node."""
        return hashlib.sha256(f"{self.node_id}\0{charger}\0{connector}\0{request_id}".encode()).hexdigest()[:32]

    async def record(
        self,
        session_id: str,
        type: str,
        meter_wh: int | None,
        *,
        ts_ms: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sign and append a meter/pause/resume/stop event. Durable on return.

        `ts_ms` (default: now) is the time the reading was taken, as a charger
        adapter reports it; `data` is kept in the event (signed meter values, the
        charger's stop reason, the key that makes a replayed message a duplicate).

        Returns:
            The event (`crdt.summarize_event`).

        Raises:
            NotFound: no such session on this node.
            InvalidCommand: not one of `API_EVENT_TYPES`, or a meter/stop without a reading.
            Conflict: the session's state does not allow it, or the reading is below the last.
        """
        doc = self.replica.docs.get(session_id)
        if doc is None or session_id == SITE_CONFIG_ID:
            raise NotFound(f"no session {session_id!r} on this node")
        if type not in API_EVENT_TYPES:
            raise InvalidCommand(f"type must be one of {', '.join(API_EVENT_TYPES)}")
        if type in ("meter", "stop") and meter_wh is None:
            raise InvalidCommand(f"a {type} event needs meter_wh (the cumulative register, Wh)")
        _, view = self.fold(session_id)
        if (view.state, type) not in TRANSITIONS:
            raise Conflict(f"cannot {type} a session that is {view.state}")
        if meter_wh is not None and view.last_meter_wh is not None and meter_wh < view.last_meter_wh:
            raise Conflict(
                f"meter_wh {meter_wh} is below the last reading {view.last_meter_wh}: the register is cumulative"
            )
        now_ms = self._wall_ms() if ts_ms is None else ts_ms  # a charger's replay carries its own time
        if meter_wh is not None and view.last_meter_wh is not None and view.last_meter_ts is not None:
            why = meter_plausibility(view.last_meter_wh, view.last_meter_ts, meter_wh, now_ms, view.max_power_w)
            if why is not None:
                raise Conflict(f"implausible meter_wh {meter_wh}: {why}")
        heads = doc.get_heads()
        doc.set_actor(self._actor(session_id))
        signer = self._signer()
        event = signer.sign(type, session_id, now_ms, meter_wh=meter_wh, data=data)
        add_event(doc, event, public_key=self.declared_key)
        limit = limit_reached(view, type, meter_wh, now_ms)
        if limit is not None:
            # An offline session accepted with limits ends when it reaches them.
            stop = signer.sign("stop", session_id, now_ms, meter_wh=meter_wh, data={"reason": limit})
            add_event(doc, stop, public_key=self.declared_key)
        await self._commit(session_id, self.replica.changes_since(session_id, heads))
        return summarize_event(event)

    # --- reading ----------------------------------------------------------------------

    def fold(self, session_id: str) -> tuple[SessionData, SessionView]:
        """A session's content and folded state (cached per version of the document).

        The document is loaded only when it changed since the last read (`crdt.Documents`
        knows its heads without loading it).

        Raises:
            KeyError: no such document. DocumentError: it is not a session.
        """
        hh = heads_hash(_heads(self.replica.docs, session_id))
        cached = self.fold_cache.get(session_id)
        if cached is not None and cached[0] == hh:
            return cached[1], cached[2]
        data = read_session(self.replica.docs[session_id])
        if self.identity is None:
            keyring = session_keyring(data, self.keyring, trust_document_keys=True)
        else:
            keyring = self._certified_keyring(data)
        base = self.fold_cache.fold_of(session_id, data.session_id)
        view = base.update(data.events, keyring, receipt_present=data.receipt is not None)
        self.fold_cache.put(session_id, hh, data, view)
        return data, view

    def _certified_keyring(self, data: SessionData) -> Keyring:
        """Device keys vouched for by certificates (signed by our site) in the document."""
        assert self.identity is not None
        ring = Keyring({self.node_id: self._signer().public_key})
        for device_id, blob in sorted(data.devices.items()):
            cert = self._certificate(blob)
            if cert is not None and cert.node_id == device_id:
                ring.add(device_id, cert.public_key)
        return ring

    def _certificate(self, blob: bytes) -> Certificate | None:
        """The certificate in a `devices` entry if our site signed it, else None (a raw or foreign key)."""
        assert self.identity is not None
        if blob in self._certificates:
            return self._certificates[blob]
        try:
            cert: Certificate | None = Certificate.decode(blob, self.identity.site_public_key)
        except Exception:  # noqa: BLE001 - any refusal means: not vouched for by our site
            cert = None
        if len(self._certificates) >= MAX_CERTIFICATES:
            self._certificates.clear()  # entries come from peers' documents: bounded
        self._certificates[blob] = cert
        return cert

    def session_json(self, session_id: str) -> dict[str, Any]:
        """The session as the API shows it. Raises NotFound."""
        if session_id == SITE_CONFIG_ID or session_id not in self.replica.docs:
            raise NotFound(f"no session {session_id!r} on this node")
        data, view = self.fold(session_id)
        receipt = None
        if data.receipt is not None:
            try:
                receipt = _jsonable(cbor2.loads(data.receipt))
            except Exception:
                receipt = {"undecodable": data.receipt.hex()}
        return {
            "session_id": data.session_id,
            "site": data.site,
            "charger": data.charger,
            "connector": data.connector,
            "id_token": data.id_token,
            "created_by": data.created_by,
            "state": view.state,
            "energy_wh": view.energy_wh,
            "started_ts": view.started_ts,
            "stopped_ts": view.stopped_ts,
            "tariff": _jsonable(data.tariff),
            "events": [summarize_event(e) for e in view.applied],
            "conflicts": [c.to_json() for c in view.conflicts],
            "receipt": receipt,
            "heads": sorted(h.hex() for h in _heads(self.replica.docs, session_id)),
        }

    def sessions_json(self) -> list[dict[str, Any]]:
        """Every session this node holds (a document that does not read as one is logged and left out)."""
        out = []
        for doc_id in sorted(self.replica.docs):
            if doc_id == SITE_CONFIG_ID:
                continue
            try:
                out.append(self.session_json(doc_id))
            except Exception:
                log.warning("document %s does not read as a session", doc_id, exc_info=True)
        return out

    def automerge_bytes(self, session_id: str) -> bytes:
        """The saved Automerge document. Raises NotFound."""
        doc: Document | None = self.replica.docs.get(session_id)
        if doc is None or session_id == SITE_CONFIG_ID:
            raise NotFound(f"no session {session_id!r} on this node")
        return doc.save()


def _heads(docs: Mapping[str, Document], doc_id: str) -> list[bytes]:
    """A document's heads; from `crdt.Documents` without loading it. Raises KeyError."""
    return docs.heads(doc_id) if isinstance(docs, Documents) else docs[doc_id].get_heads()


def limit_reached(view: SessionView, type: str, meter_wh: int | None, now_ms: int) -> str | None:
    """Whether a new reading ends a session accepted offline with limits: "energy_limit",
    "time_limit", or None."""
    if type != "meter" or not view.applied:
        return None
    limits = view.applied[0].record.data.get("limits") if view.applied[0].record.type == "authorize" else None
    if not isinstance(limits, dict):
        return None
    max_wh, max_minutes = limits.get("max_wh"), limits.get("max_minutes")
    first = view.first_meter_wh if view.first_meter_wh is not None else meter_wh
    if isinstance(max_wh, int) and meter_wh is not None and first is not None and meter_wh - first >= max_wh:
        return "energy_limit"
    started = view.started_ts
    if isinstance(max_minutes, int) and started is not None and now_ms - started >= max_minutes * 60_000:
        return "time_limit"
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
