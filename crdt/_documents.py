"""Session and site-config documents: their Automerge layout and how they are written.

Session document (one per charging session, id = session id), root map::

    session_id, site, charger: str   connector: int   id_token: str
    tariff: map (a snapshot of the tariff at start; prices never change under a session)
    created_by: str (node id)
    events: map event_id -> bytes (a signed event, see _events.py)
    receipt: bytes | null (CBOR receipt signed by the cloud; null until reconciled)
    notes: map note_id -> str (operator annotations)
    devices: map device_id -> bytes (Ed25519 public key the device declares; trusted only
             by nodes that run without enrolment, see `fold_session`)

Exactly one node creates a session document: two independent creations of the same
top-level keys would conflict in Automerge and one side would be hidden. Every other
replica only receives it through sync.

The site-config document is different: every node must be able to create it, so it
starts from a deterministic genesis change (a fixed actor, Automerge's timestamp 0 in
this binding, fixed content). All copies therefore share their first change and merge
without hiding anything; later changes use the node's own random actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from automerge.core import ROOT, Document, ObjType, ScalarType, extract, random_actor_id

from ._errors import DocumentError, LocalError
from ._events import Keyring, SignedEvent
from ._fold import SessionFold, SessionView

SITE_CONFIG_ID = "site-config"
_GENESIS_ACTOR = b"meshnode.genesis"  # 16 bytes, shared by every node's genesis change


def _put(tx: Any, obj: bytes, key: str | int, value: Any) -> None:
    """Write a plain Python value (dict, list, scalar) into an Automerge object."""
    if isinstance(value, Mapping):
        child = tx.put_object(obj, key, ObjType.Map)
        for k, v in value.items():
            _put(tx, child, str(k), v)
    elif isinstance(value, list | tuple):
        child = tx.put_object(obj, key, ObjType.List)
        for i, v in enumerate(value):
            _insert(tx, child, i, v)
    else:
        tx.put(obj, key, *_scalar(value))


def _insert(tx: Any, obj: bytes, index: int, value: Any) -> None:
    if isinstance(value, Mapping | list | tuple):
        kind = ObjType.Map if isinstance(value, Mapping) else ObjType.List
        child = tx.insert_object(obj, index, kind)
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for k, v in items:
            (_put if kind == ObjType.Map else _insert)(tx, child, k, v)
    else:
        tx.insert(obj, index, *_scalar(value))


def _scalar(value: Any) -> tuple[ScalarType, Any]:
    if value is None:
        return ScalarType.Null, None
    if isinstance(value, bool):
        return ScalarType.Boolean, value
    if isinstance(value, int):
        return ScalarType.Int, value
    if isinstance(value, float):
        return ScalarType.F64, value
    if isinstance(value, str):
        return ScalarType.Str, value
    if isinstance(value, bytes | bytearray):
        return ScalarType.Bytes, bytes(value)
    raise LocalError(f"cannot store a {type(value).__name__} in a document")


def _map_id(doc: Document, key: str) -> bytes:
    got = doc.get(ROOT, key)
    if got is None or got[0] != ObjType.Map:
        raise DocumentError(f"document has no {key!r} map")
    return got[1]


def _scalar_at(doc: Document, obj: bytes, key: str) -> Any:
    got = doc.get(obj, key)
    if got is None or isinstance(got[0], ObjType):
        return None
    kind, value = got[0]
    if kind == ScalarType.Bytes:
        # This binding hands bytes back as a list of ints.
        return bytes(value)  # type: ignore[arg-type]
    return value


# --- session documents ------------------------------------------------------------


def new_session_doc(
    session_id: str,
    *,
    site: str,
    charger: str,
    connector: int,
    id_token: str,
    tariff: Mapping[str, Any],
    created_by: str,
    actor: bytes | None = None,
) -> Document:
    """Create a session document. Call this on the one node that starts the session."""
    doc = Document(actor or random_actor_id())
    with doc.transaction() as tx:
        tx.put(ROOT, "session_id", ScalarType.Str, session_id)
        tx.put(ROOT, "site", ScalarType.Str, site)
        tx.put(ROOT, "charger", ScalarType.Str, charger)
        tx.put(ROOT, "connector", ScalarType.Int, connector)
        tx.put(ROOT, "id_token", ScalarType.Str, id_token)
        tx.put(ROOT, "created_by", ScalarType.Str, created_by)
        _put(tx, ROOT, "tariff", dict(tariff))
        tx.put_object(ROOT, "events", ObjType.Map)
        tx.put_object(ROOT, "notes", ObjType.Map)
        tx.put_object(ROOT, "devices", ObjType.Map)
        tx.put(ROOT, "receipt", ScalarType.Null, None)
    return doc


def add_event(doc: Document, event: SignedEvent, *, public_key: bytes | None = None) -> bool:
    """Put a signed event into the session's `events` map.

    Args:
        public_key: the signing device's key, declared in the document's `devices`
            map (once per device) for nodes that run without enrolment.

    Returns:
        False when the event is already there (nothing changes), True otherwise.
    """
    events = _map_id(doc, "events")
    if doc.get(events, event.event_id) is not None:
        return False
    devices = _map_id(doc, "devices") if public_key is not None else None
    with doc.transaction() as tx:
        tx.put(events, event.event_id, ScalarType.Bytes, event.encoded)
        if devices is not None and doc.get(devices, event.record.device_id) is None:
            tx.put(devices, event.record.device_id, ScalarType.Bytes, public_key)
    return True


def set_receipt(doc: Document, receipt: bytes) -> None:
    """Write the cloud's signed receipt (CBOR bytes) into the session."""
    with doc.transaction() as tx:
        tx.put(ROOT, "receipt", ScalarType.Bytes, receipt)


def add_note(doc: Document, note_id: str, text: str) -> None:
    notes = _map_id(doc, "notes")
    with doc.transaction() as tx:
        tx.put(notes, note_id, ScalarType.Str, text)


@dataclass(frozen=True)
class SessionData:
    """The raw content of a session document, read defensively."""

    session_id: str
    site: str
    charger: str
    connector: int
    id_token: str
    created_by: str
    tariff: Mapping[str, Any]
    events: Mapping[str, bytes]
    receipt: bytes | None
    notes: Mapping[str, str]
    devices: Mapping[str, bytes]


def read_session(doc: Document) -> SessionData:
    """Read a session document. Raises DocumentError if it is not one."""
    fields: dict[str, Any] = {}
    for key, kind in (
        ("session_id", str),
        ("site", str),
        ("charger", str),
        ("id_token", str),
        ("created_by", str),
        ("connector", int),
    ):
        value = _scalar_at(doc, ROOT, key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DocumentError(f"session document field {key!r} is missing or not {kind.__name__}")
        fields[key] = value
    events_id = _map_id(doc, "events")
    events: dict[str, bytes] = {}
    for key in doc.keys(events_id):
        value = _scalar_at(doc, events_id, key)
        # A non-bytes value is kept as empty bytes so the fold reports it as invalid.
        events[key] = value if isinstance(value, bytes) else b""
    tariff_got = doc.get(ROOT, "tariff")
    tariff = extract(doc, tariff_got[1]) if tariff_got and tariff_got[0] == ObjType.Map else {}
    notes_got = doc.get(ROOT, "notes")
    notes = extract(doc, notes_got[1]) if notes_got and notes_got[0] == ObjType.Map else {}
    receipt = _scalar_at(doc, ROOT, "receipt")
    devices: dict[str, bytes] = {}
    devices_got = doc.get(ROOT, "devices")
    if devices_got is not None and devices_got[0] == ObjType.Map:
        for key in doc.keys(devices_got[1]):
            value = _scalar_at(doc, devices_got[1], key)
            if isinstance(value, bytes) and len(value) <= 4096:
                devices[key] = value  # a raw 32-byte key, or a certificate
    return SessionData(
        devices=devices,
        tariff=tariff,  # type: ignore[arg-type]
        events=events,
        receipt=receipt if isinstance(receipt, bytes) else None,
        notes={str(k): str(v) for k, v in notes.items()},  # type: ignore[union-attr]
        **fields,
    )


def fold_session(
    doc: Document, keyring: Keyring, *, trust_document_keys: bool = False, base: SessionFold | None = None
) -> tuple[SessionData, SessionView]:
    """Read a session document and fold its events.

    Args:
        keyring: trusted device keys.
        trust_document_keys: also accept the keys devices declared in the document
            itself (for nodes without enrolment: it proves the events were not
            altered after signing, not who the device is). A key in `keyring`
            always wins over a declared one.
        base: the fold of an earlier version of this document, to continue from
            (it is updated); without one the document is folded from the start.
    """
    data = read_session(doc)
    keyring = session_keyring(data, keyring, trust_document_keys=trust_document_keys)
    fold_ = base if base is not None else SessionFold(data.session_id)
    if fold_.session_id != data.session_id:
        raise LocalError(f"a fold of session {fold_.session_id!r} cannot continue with {data.session_id!r}")
    return data, fold_.update(data.events, keyring, receipt_present=data.receipt is not None)


def session_keyring(data: SessionData, keyring: Keyring, *, trust_document_keys: bool = False) -> Keyring:
    """`keyring`, plus (when asked) the raw keys devices declared in the document; `keyring` wins."""
    declared = {d: k for d, k in data.devices.items() if len(k) == 32}
    if not (trust_document_keys and declared):
        return keyring
    merged = Keyring(declared)
    for device_id, key in keyring.public_keys().items():
        merged.add(device_id, key)
    return merged


# --- site config -------------------------------------------------------------------

SITE_MAPS = ("tariffs", "id_tokens_allowed", "id_tokens_revoked", "revocations")


def new_site_config(site: str, *, actor: bytes | None = None) -> Document:
    """Create the site-config document from its deterministic genesis change.

    Every node of a site calls this with the same `site` and gets a document whose
    first change is byte-identical, so copies created independently merge cleanly.
    """
    doc = Document(_GENESIS_ACTOR)
    with doc.transaction() as tx:
        tx.put(ROOT, "site", ScalarType.Str, site)
        for name in SITE_MAPS:
            tx.put_object(ROOT, name, ObjType.Map)
    doc.set_actor(actor or random_actor_id())
    return doc


def site_config_put(doc: Document, section: str, key: str, value: Any) -> None:
    """Set `key` in one of the site-config maps (tariffs, allowed/revoked id tokens, revocations)."""
    if section not in SITE_MAPS:
        raise LocalError(f"site config has no section {section!r}; sections are {SITE_MAPS}")
    target = _map_id(doc, section)
    with doc.transaction() as tx:
        _put(tx, target, key, value)


def read_site_config(doc: Document) -> dict[str, Any]:
    content = extract(doc)
    if not isinstance(content, dict) or not all(isinstance(content.get(m), dict) for m in SITE_MAPS):
        raise DocumentError("not a site-config document")
    return content
