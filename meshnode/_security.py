"""Site enrolment, sealed mesh messages, revocations and offline authorisation.

Four keys carry all trust (docs/security.md has the threat model):

- the **site key** (Ed25519, ``site.key``) stays with the operator, never on a
  node. It signs node certificates, revocations and network-key grants;
- the **network key** (32 random bytes, ``network.key``) is shared by every
  enrolled node. It encrypts every mesh payload, so a passer-by on the site
  network reads nothing and cannot make a message a node will even parse;
- each **node key** (Ed25519, ``node.key``, the device key that also signs
  events) signs every message the node sends, so a receiver knows which enrolled
  node spoke, not only that some holder of the network key did;
- the **cloud key** (Ed25519) signs driver tokens and the allowed/revoked id-token
  lists that nodes check offline.

Sealed messages
===============

Every CoAP payload between enrolled nodes (except the open discovery resources)
is a sealed envelope::

    sealed = "MS" 0x01 | key_id (4) | nonce (24) | XSalsa20-Poly1305(network key, inner)
    inner  = CBOR [signed: bstr, sig: bstr .size 64]
    signed = canonical CBOR {v: 1, k: 0 (request) / 1 (response), m: method, res: path,
                             cert: node certificate, ctr: uint, ts: ms since the epoch,
                             to: recipient node id (optional), re: request ctr (responses),
                             body: bstr}
    sig    = Ed25519(sender's node key, "meshnode/sealed/v1" 0x00 | signed)

Why it looks like this:

- The box (SecretBox, random 24-byte nonce) keeps the content from anyone without
  the network key and rejects tampering cheaply (one Poly1305) before any parser
  sees the bytes. ``key_id`` (a BLAKE2b fingerprint, not secret) lets a node hold
  several network keys while one is being rotated in (:class:`NetworkKeyGrant`).
- The signature proves which enrolled node sent the message; the network key is
  shared and, once a charger is stolen, known to the thief. It signs the exact
  bytes that travel (``signed`` is a byte string inside ``inner``), so the receiver
  never re-encodes before verifying, and the context prefix keeps a message
  signature from ever passing for an event signature made with the same key.
- ``cert`` travels in every message: receivers need no directory of nodes and no
  handshake, and a node enrolled a minute ago is accepted at once. Verified
  certificates are cached by their bytes, so steady traffic costs one Ed25519
  verification per message, not two.
- ``res``, ``m`` and ``k`` bind the message to one resource, method and direction:
  a captured digest request cannot be replayed against ``/m/sync``, nor a response
  passed off as a request. ``to`` binds a request to the node it was meant for
  once the requester knows who answers at that address (learned from the first
  authenticated response); responses always name the requester. ``re`` binds a
  response to the request it answers.
- ``ctr`` is the sender's message counter. It starts at ``int(now * 1e6) << 8``
  the first time the node seals (so a restarted node never reuses a value: it
  would have to send 256 messages per microsecond to catch up with its own
  clock) and counts up by one. A receiver keeps, per sender certificate, the
  highest counter it accepted and a 64-bit bitmap of the 64 below it: the
  anti-replay sliding window of IPsec (RFC 4303 section 3.4.3) and DTLS
  (RFC 6347 section 4.1.2.6, RFC 9147 section 4.5.1). Reordering of up to 64
  messages is tolerated; a repeat or anything older is refused. As there, the
  window moves only after the message has been fully verified.
- ``ts`` bounds a message's life to ``max_skew`` (120 s by default) either side
  of the receiver's clock, which also bounds how long a window must be kept: a
  sender silent for twice that long is forgotten safely (anything it sent before
  fails the time check). A receiver also refuses requests stamped more than
  ``restart_tolerance`` (5 s) before it started, because its windows are in memory
  and start empty after a restart.

The receiver checks in this order and changes nothing (no window moves) unless
every check passes; each refusal is a :class:`RemoteSecurityError` that is also
the transport's :class:`Unauthorized` (4.01) or :class:`Forbidden` (4.03), so a
handler that lets it escape answers with the right code:

======================================================  =======  ===================
check                                                   code     ``reason`` counter
======================================================  =======  ===================
not a sealed envelope (unenrolled sender, plain CBOR)   4.01     not_sealed
too short to hold a box                                 4.01     truncated
network key id unknown (other site, rotated out)        4.01     unknown_network_key
box does not open (tampered, truncated, wrong key)      4.01     bad_mac
inner CBOR malformed (a network-key holder's junk)      4.01     malformed
certificate not signed by our site key, or malformed    4.01     unknown_certificate
signature by the certificate's key does not verify      4.01     bad_signature
request counter repeated, or older than the window      4.01     replayed / too_old
request stamped before this receiver started            4.01     before_start
response does not answer our request (``re``)           4.01     unmatched_response
response where a request was expected (and vice versa)  4.03     wrong_kind
other resource or method than the one it arrived on     4.03     wrong_resource
sent by our own node id (reflected)                     4.03     reflected
addressed (``to``) to another node                      4.03     misaddressed
certificate expired                                     4.03     expired
certificate revoked                                     4.03     revoked
certificate has no role allowed in the mesh             4.03     role
timestamp further than ``max_skew`` from our clock      4.03     skew
======================================================  =======  ===================

4.01 means "I cannot tell who you are, or this message proves nothing about
who is speaking now" (a replay is evidence of nothing); 4.03 means "I know who
you are, and you may not do this" (a valid, expired or revoked certificate; a
valid message used in the wrong place or time).

Everything here is sans-IO apart from the file functions of enrolment: the
time is passed in as ``now`` (wall-clock seconds), nothing reads a clock, and
:class:`SealedTransport` reads its injected ``clock`` once per message at the edge.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import json
import logging
import math
import os
import secrets
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cbor2
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
import trio

from ._transport import (
    DEFAULT_TIMEOUT,
    BadRequest,
    Forbidden,
    Handler,
    LogBudget,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RemoteRefused,
    RequestRefused,
    Transport,
    TransportError,
    TransportStats,
    Unauthorized,
    held_back,
    refusal_in,
)

__all__ = [
    "DEFAULT_MAX_SKEW",
    "MESH_ROLES",
    "REPLAY_WINDOW",
    "ROLES",
    "Authorization",
    "BadCertificate",
    "BadEnvelope",
    "BadSignature",
    "BadSiteEntry",
    "Certificate",
    "CertificateExpired",
    "CertificateRevoked",
    "ClockSkew",
    "DriverToken",
    "Identity",
    "Limits",
    "LocalSecurityError",
    "Misaddressed",
    "NetworkKey",
    "NetworkKeyGrant",
    "NotAuthenticated",
    "NotPermitted",
    "Opened",
    "Reflected",
    "RemoteSecurityError",
    "Replayed",
    "ReplayWindow",
    "ResponseRejected",
    "Revocations",
    "RoleNotAllowed",
    "SealedTransport",
    "Sealer",
    "SecurityError",
    "Site",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenListEntry",
    "WrongKind",
    "WrongResource",
    "authenticated_peer",
    "authorize",
    "create_site",
    "enroll",
    "enrolled_certificates",
    "entry_key",
    "grant_network_key",
    "issue_certificate",
    "issue_driver_token",
    "load_or_create_node_key",
    "load_or_create_store_key",
    "load_site",
    "read_site_name",
    "network_key_id",
    "open_network_key_grant",
    "revoke",
    "signed_token_list_entry",
    "site_entries",
    "site_revoke",
    "site_rotate_network_key",
    "trusted_device_keys",
    "verify_driver_token",
    "verify_token_list_entry",
]

log = logging.getLogger("meshnode.security")

# --------------------------------------------------------------------------
# Constants

DEFAULT_MAX_SKEW = 120.0
"""Seconds a message's timestamp may differ from the receiver's clock. Chargers
keep NTP time for OCPP anyway; two minutes absorbs a drifting RTC after a boot
without NTP while keeping replays short-lived."""

DEFAULT_RESTART_TOLERANCE = 5.0
"""Seconds before its own start that a receiver still accepts request stamps from
(clock differences between nodes); see the module docstring."""

REPLAY_WINDOW = 64
"""Counters below the highest accepted that are still tracked (RFC 4303 s3.4.3
suggests 32 at least and 64 by default; RFC 9147 s4.5.1 too)."""

ROLES = frozenset({"charger", "gateway", "operator"})
"""Roles a certificate may carry. ``operator`` is for tools that talk to nodes
on the operator's behalf; they are not mesh members."""

MESH_ROLES = ("charger", "gateway")
"""Roles whose holders may exchange mesh traffic (the default of :class:`Sealer`)."""

DEFAULT_CERT_VALIDITY = 365 * 86400.0
MAX_ID_LEN = 128
"""Node and token ids: as long as the mesh protocol allows (``_protocol.MAX_ID_LEN``)."""
MAX_CERT_BYTES = 1024
MAX_ENTRY_BYTES = 64 * 1024
MAX_TOKEN_TEXT = 1024
MAX_COUNTER = 2**64 - 1

SEALED_MAGIC = b"MS\x01"
KEY_ID_LEN = 4
_NONCE = nacl.secret.SecretBox.NONCE_SIZE
_MAC = nacl.secret.SecretBox.MACBYTES
MIN_SEALED = len(SEALED_MAGIC) + KEY_ID_LEN + _NONCE + _MAC

REQUEST, RESPONSE = 0, 1

_CTX_SEALED = b"meshnode/sealed/v1\x00"
_CTX_CERT = b"meshnode/certificate/v1\x00"
_CTX_REVOKE = b"meshnode/revocation/v1\x00"
_CTX_GRANT = b"meshnode/network-key-grant/v1\x00"
_CTX_DRIVER = b"meshnode/driver-token/v1\x00"
_CTX_TOKEN_LIST = b"meshnode/token-list/v1\x00"
"""Signature contexts (domain separation): one key signs several kinds of object
(the site key: certificates, revocations, grants; the cloud key: tokens and
lists), so each kind gets a prefix and a signature made for one can never be
presented as another."""

DRIVER_TOKEN_PREFIX = "mdt1."

SITE_KEY, SITE_PUB, NETWORK_KEY, SITE_TOML = "site.key", "site.pub", "network.key", "site.toml"
NODE_KEY, NODE_CERT, STORE_KEY, CLOUD_PUB = "node.key", "node.cert", "store.key", "cloud.pub"
SITE_NODES, SITE_ENTRIES = "nodes", "entries"


# --------------------------------------------------------------------------
# Errors


class SecurityError(Exception):
    """Base of every error this module raises on purpose."""

    message: str = "security error"

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)


class LocalSecurityError(SecurityError):
    """Our own misuse or setup: a missing or damaged file, a wrong argument. The
    message says what to run or change."""


class RemoteSecurityError(SecurityError):
    """Untrusted input (a peer's message, a certificate, a token, a signed entry)
    is not acceptable. ``reason`` is a short stable tag for counters."""

    reason: str = "refused"

    def __init__(self, message: str | None = None, *, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(message)


class NotAuthenticated(RemoteSecurityError, Unauthorized):
    """4.01: we cannot tell that an enrolled node sent this, now."""

    message = "unauthorized"


class NotPermitted(RemoteSecurityError, Forbidden):
    """4.03: the sender is known, but the message may not be acted on."""

    message = "forbidden"


class BadEnvelope(NotAuthenticated):
    """Not sealed, truncated, sealed with a key we do not hold, tampered, or
    malformed inside the box."""

    reason = "bad_mac"


class BadCertificate(NotAuthenticated):
    """A certificate is malformed or not signed by our site key (forged, or
    from another site)."""

    reason = "unknown_certificate"
    message = "certificate not issued by this site"


class BadSignature(NotAuthenticated):
    """The message's signature does not verify with its certificate's key."""

    reason = "bad_signature"
    message = "bad signature"


class Replayed(NotAuthenticated):
    """The message was seen before, is older than the replay window, predates
    the receiver's start, or answers a request we did not make."""

    reason = "replayed"
    message = "replayed message"


class WrongKind(NotPermitted):
    reason = "wrong_kind"
    message = "a response where a request was expected, or the reverse"


class WrongResource(NotPermitted):
    reason = "wrong_resource"
    message = "message sealed for another resource or method"


class Reflected(NotPermitted):
    reason = "reflected"
    message = "message from this node's own id"


class Misaddressed(NotPermitted):
    reason = "misaddressed"
    message = "message addressed to another node"


class CertificateExpired(NotPermitted):
    reason = "expired"
    message = "certificate expired"


class CertificateRevoked(NotPermitted):
    reason = "revoked"
    message = "certificate revoked"


class RoleNotAllowed(NotPermitted):
    reason = "role"
    message = "certificate role not allowed in the mesh"


class ClockSkew(NotPermitted):
    reason = "skew"
    message = "timestamp too far from the receiver's clock"


class BadSiteEntry(RemoteSecurityError):
    """A revocation or network-key grant is malformed or not signed by the site."""

    reason = "bad_entry"


class TokenError(RemoteSecurityError):
    """A driver token or a token-list entry is not acceptable."""


class TokenInvalid(TokenError):
    reason = "token_invalid"


class TokenExpired(TokenError):
    reason = "token_expired"


class ResponseRejected(TransportError):
    """Our request was answered, but the answer is not an authentic sealed
    response to it (see ``reason``; the RemoteSecurityError is the cause). A
    TransportError, so the node treats it like any failed exchange."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------
# Small helpers


def _canonical(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sign(key: nacl.signing.SigningKey, context: bytes, signed: bytes) -> bytes:
    return _canonical([signed, key.sign(context + signed).signature])


def _verify_key(key: bytes | nacl.signing.VerifyKey) -> nacl.signing.VerifyKey:
    if isinstance(key, nacl.signing.VerifyKey):
        return key
    if not isinstance(key, bytes | bytearray) or len(key) != 32:
        raise LocalSecurityError("an Ed25519 public key is 32 bytes")
    return nacl.signing.VerifyKey(bytes(key))


def _split_signed(data: Any, what: str, error: type[RemoteSecurityError], limit: int) -> tuple[bytes, bytes]:
    """Parse ``CBOR [signed: bstr, sig: bstr(64)]`` without verifying."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes")
    if len(data) > limit:
        raise error(f"{what} is {len(data)} bytes, more than the {limit} allowed")
    try:
        outer = cbor2.loads(bytes(data))
    except Exception as exc:  # cbor2 raises several types for bad input
        raise error(f"{what} is not valid CBOR") from exc
    if (
        not isinstance(outer, list)
        or len(outer) != 2
        or not isinstance(outer[0], bytes)
        or not isinstance(outer[1], bytes)
        or len(outer[1]) != 64
    ):
        raise error(f"{what} is not a signed CBOR pair")
    return outer[0], outer[1]


def _open_signed(
    data: Any,
    key: nacl.signing.VerifyKey,
    context: bytes,
    what: str,
    error: type[RemoteSecurityError],
    limit: int,
) -> tuple[dict[Any, Any], bytes]:
    """Verify a signed pair; return its map (shape still to be checked) and the signature."""
    signed, sig = _split_signed(data, what, error, limit)
    try:
        key.verify(context + signed, sig)
    except nacl.exceptions.BadSignatureError as exc:
        raise error(f"{what}: signature does not verify") from exc
    try:
        body = cbor2.loads(signed)
    except Exception as exc:
        raise error(f"{what}: signed content is not valid CBOR") from exc
    if not isinstance(body, dict):
        raise error(f"{what}: signed content is not a map")
    return body, sig


def _is_text(value: Any, limit: int = MAX_ID_LEN) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_id(value: str, what: str) -> str:
    if not _is_text(value):
        raise LocalSecurityError(f"{what} must be a printable string of 1 to {MAX_ID_LEN} characters, got {value!r}")
    return value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def network_key_id(key: bytes) -> bytes:
    """The 4-byte id of a network key carried in front of every sealed message.

    A keyed-hash fingerprint: it tells a receiver which of its keys to try and
    reveals nothing usable about the key.
    """
    return nacl.hash.blake2b(key, digest_size=KEY_ID_LEN, person=b"meshnode-netkey", encoder=nacl.encoding.RawEncoder)


# --------------------------------------------------------------------------
# Files


def _write_file(path: Path, data: bytes, *, secret: bool, exclusive: bool = False) -> None:
    """Write a whole file atomically (temporary file, fsync, rename).

    Secret files are created 0600 (not subject to a lax umask: fchmod after
    open). ``exclusive`` refuses to replace an existing file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError instead of replacing
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_key_file(path: Path, what: str, hint: str, *, secret: bool) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise LocalSecurityError(f"{what} not found at {path}: {hint}") from exc
    except OSError as exc:
        raise LocalSecurityError(f"cannot read {what} at {path}: {exc.strerror}") from exc
    if len(data) != 32:
        raise LocalSecurityError(f"{path} is damaged: expected a 32-byte key, found {len(data)} bytes")
    if secret:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s is readable by other users (mode %o): run chmod 600 %s", path, mode, path)
    return data


def _write_toml(path: Path, values: Mapping[str, str | float]) -> None:
    lines = ["# written by meshnode; the keys beside this file are what matters"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")  # a JSON string is a TOML basic string
    _write_file(path, ("\n".join(lines) + "\n").encode(), secret=False)


def _read_toml(path: Path, hint: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise LocalSecurityError(f"{path} not found: {hint}") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LocalSecurityError(f"{path} cannot be read: {exc}") from exc


def load_or_create_node_key(data_dir: Path) -> nacl.signing.SigningKey:
    """The node's Ed25519 device key in ``<data_dir>/node.key`` (a raw 32-byte
    seed, mode 0600), created if absent: the same file and format as
    ``meshnode._node.load_or_create_key``, so enrolling a node that has already
    run keeps its device key and the events it signed stay verifiable."""
    path = data_dir / NODE_KEY
    if path.exists():
        return nacl.signing.SigningKey(_read_key_file(path, "node key", "", secret=True))
    key = nacl.signing.SigningKey.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_file(path, bytes(key), secret=True, exclusive=True)
    except FileExistsError:
        return load_or_create_node_key(data_dir)  # created concurrently: use that one
    return key


def load_or_create_store_key(data_dir: Path) -> bytes:
    """The at-rest SecretBox key in ``<data_dir>/store.key`` (32 random bytes,
    0600), created if absent. Separate from every other key so that the store
    can be re-keyed, and handing someone a store file plus the network key
    reveals nothing."""
    path = data_dir / STORE_KEY
    if path.exists():
        return _read_key_file(path, "store key", "", secret=True)
    key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_file(path, key, secret=True, exclusive=True)
    except FileExistsError:
        return load_or_create_store_key(data_dir)
    return key


# --------------------------------------------------------------------------
# Site


@dataclass(frozen=True)
class Site:
    """A site as the operator holds it.

    Attributes:
        name: the site's name (written into certificates).
        signing_key: the site key, or None when only ``site.pub`` is present
            (a copy that can verify but not enrol or revoke).
        public_key: the site's Ed25519 public key (32 bytes).
        network_key: the current network key (32 bytes).
        created: when ``meshnode site init`` ran (seconds since the epoch).
        path: the site directory.
    """

    name: str
    signing_key: nacl.signing.SigningKey | None = field(repr=False)
    public_key: bytes
    network_key: bytes = field(repr=False)
    created: float = 0.0
    path: Path | None = None

    def require_signing_key(self) -> nacl.signing.SigningKey:
        if self.signing_key is None:
            where = self.path if self.path is not None else "the site directory"
            raise LocalSecurityError(
                f"{where} has no site.key: enrolling and revoking need the site's signing key; "
                "run this on the machine that ran `meshnode site init`"
            )
        return self.signing_key


def _site_hint(site_dir: Path) -> str:
    return f"run `meshnode site init --site {site_dir}` first (or pass --site with the right directory)"


def create_site(site_dir: Path, name: str, *, now: float | None = None) -> Site:
    """Create a site: write ``site.key`` (0600), ``site.pub``, ``network.key``
    (0600) and ``site.toml`` into ``site_dir``.

    Refuses to touch a directory that already holds any of them: overwriting a
    site key orphans every node enrolled with it.

    Raises:
        LocalSecurityError: a site exists there already, or a bad name.
    """
    _check_id(name, "site name")
    site_dir = Path(site_dir)
    existing = [n for n in (SITE_KEY, SITE_PUB, NETWORK_KEY, SITE_TOML) if (site_dir / n).exists()]
    if existing:
        raise LocalSecurityError(
            f"{site_dir} already holds a site ({', '.join(existing)}); refusing to overwrite it. "
            "Use another --site directory, or remove the old site on purpose"
        )
    created = time.time() if now is None else now
    site_dir.mkdir(parents=True, exist_ok=True)
    signing_key = nacl.signing.SigningKey.generate()
    network_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    try:
        _write_file(site_dir / SITE_KEY, bytes(signing_key), secret=True, exclusive=True)
    except FileExistsError as exc:
        raise LocalSecurityError(f"{site_dir} already holds a site; refusing to overwrite it") from exc
    _write_file(site_dir / SITE_PUB, bytes(signing_key.verify_key), secret=False)
    _write_file(site_dir / NETWORK_KEY, network_key, secret=True)
    _write_toml(site_dir / SITE_TOML, {"name": name, "created": float(created)})
    (site_dir / SITE_NODES).mkdir(exist_ok=True)
    (site_dir / SITE_ENTRIES).mkdir(exist_ok=True)
    return Site(name, signing_key, bytes(signing_key.verify_key), network_key, float(created), site_dir)


def _site_name(meta: Mapping[str, Any], site_dir: Path) -> str:
    name = meta.get("name")
    if not isinstance(name, str) or not _is_text(name):
        raise LocalSecurityError(f"{site_dir / SITE_TOML} has no valid name")
    return name


def read_site_name(site_dir: Path) -> str:
    """The site's name from ``site.toml`` alone (the cloud's copy of a site folder holds
    ``site.pub`` and ``site.toml``, no secret).

    Raises:
        LocalSecurityError: the file is missing, damaged or has no valid name.
    """
    site_dir = Path(site_dir)
    hint = f"copy the site's {SITE_TOML} into {site_dir} (meshnode site init writes it)"
    return _site_name(_read_toml(site_dir / SITE_TOML, hint), site_dir)


def load_site(site_dir: Path) -> Site:
    """Read a site directory written by :func:`create_site`.

    Raises:
        LocalSecurityError: files missing or damaged (the message says what to run).
    """
    site_dir = Path(site_dir)
    hint = _site_hint(site_dir)
    meta = _read_toml(site_dir / SITE_TOML, hint)
    name = _site_name(meta, site_dir)
    public_key = _read_key_file(site_dir / SITE_PUB, "site public key", hint, secret=False)
    network_key = _read_key_file(site_dir / NETWORK_KEY, "network key", hint, secret=True)
    signing_key = None
    if (site_dir / SITE_KEY).exists():
        signing_key = nacl.signing.SigningKey(_read_key_file(site_dir / SITE_KEY, "site key", hint, secret=True))
        if bytes(signing_key.verify_key) != public_key:
            raise LocalSecurityError(f"{site_dir / SITE_KEY} does not match {site_dir / SITE_PUB}: the site is damaged")
    created = meta.get("created", 0.0)
    return Site(name, signing_key, public_key, network_key, float(created) if _is_time(created) else 0.0, site_dir)


# --------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Certificate:
    """A node's enrolment: its id, public key and roles, signed by the site key.

    Attributes:
        node_id: the node it was issued to.
        public_key: the node's Ed25519 public key (its device key).
        roles: what the node may do (:data:`ROLES`).
        not_after: expiry, seconds since the epoch.
        serial: random hex id of this certificate (revocations name it).
        site: the issuing site's name.
        issued: when it was issued; a revocation by node id covers the
            certificates issued before it, so a replacement charger may reuse
            the id.
        signature: the site's signature (empty until issued or decoded).
        encoded: the exact bytes (what :meth:`encode` returns).
    """

    node_id: str
    public_key: bytes
    roles: tuple[str, ...]
    not_after: float
    serial: str
    site: str
    issued: float = 0.0
    signature: bytes = field(default=b"", repr=False, compare=False)
    encoded: bytes = field(default=b"", repr=False, compare=False)

    def _fields(self) -> dict[str, Any]:
        return {
            "v": 1,
            "node": self.node_id,
            "pk": self.public_key,
            "roles": list(self.roles),
            "na": self.not_after,
            "serial": self.serial,
            "site": self.site,
            "iss": self.issued,
        }

    def encode(self) -> bytes:
        """The certificate's CBOR bytes, ``[signed, site signature]``.

        Raises:
            LocalSecurityError: the certificate was built by hand, never signed.
        """
        if not self.encoded:
            raise LocalSecurityError("this certificate is not signed: use issue_certificate")
        return self.encoded

    @classmethod
    def decode(cls, data: bytes, site_public_key: bytes | nacl.signing.VerifyKey) -> Certificate:
        """Parse a certificate and verify that our site signed it. Validity in
        time and revocation are separate checks (:meth:`check_valid`,
        :meth:`Revocations.is_revoked`).

        Raises:
            BadCertificate: malformed, or not signed by this site's key.
        """
        body, sig = _open_signed(
            data, _verify_key(site_public_key), _CTX_CERT, "certificate", BadCertificate, MAX_CERT_BYTES
        )
        roles = body.get("roles")
        if (
            set(body) != {"v", "node", "pk", "roles", "na", "serial", "site", "iss"}
            or body["v"] != 1
            or not _is_text(body["node"])
            or not isinstance(body["pk"], bytes)
            or len(body["pk"]) != 32
            or not isinstance(roles, list)
            or not 0 < len(roles) <= 8
            or not all(_is_text(r, 32) for r in roles)
            or not _is_time(body["na"])
            or not _is_time(body["iss"])
            or not _is_text(body["serial"], 64)
            or not _is_text(body["site"])
        ):
            raise BadCertificate("certificate has the wrong shape")
        return cls(
            body["node"],
            body["pk"],
            tuple(roles),
            float(body["na"]),
            body["serial"],
            body["site"],
            float(body["iss"]),
            sig,
            bytes(data),
        )

    def check_valid(self, now: float) -> None:
        """Raise :class:`CertificateExpired` if ``now`` is past ``not_after``."""
        if now > self.not_after:
            raise CertificateExpired(f"certificate of {self.node_id} expired at {_iso(self.not_after)}")


def issue_certificate(
    site: Site,
    node_id: str,
    public_key: bytes,
    *,
    roles: Sequence[str] = ("charger",),
    valid_for: float = DEFAULT_CERT_VALIDITY,
    now: float,
    serial: str | None = None,
) -> bytes:
    """Sign a certificate for ``node_id``'s key; returns its bytes.

    ``serial``: random by default (a seeded simulation passes its own, so the
    certificate, hence every sealed message, is the same every run).

    Raises:
        LocalSecurityError: no site key, bad id, key, roles or validity.
    """
    key = site.require_signing_key()
    _check_id(node_id, "node id")
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise LocalSecurityError("a node public key is 32 bytes")
    roles = tuple(roles)
    unknown = sorted(set(roles) - ROLES)
    if not roles or unknown:
        raise LocalSecurityError(f"roles must be some of {sorted(ROLES)}, got {list(roles)}")
    if not valid_for > 0:
        raise LocalSecurityError("valid_for must be a positive number of seconds")
    serial = serial if serial is not None else secrets.token_hex(16)
    cert = Certificate(node_id, public_key, roles, float(now + valid_for), serial, site.name, float(now))
    return _sign(key, _CTX_CERT, _canonical(cert._fields()))


# --------------------------------------------------------------------------
# Enrolment


@dataclass(frozen=True)
class Identity:
    """What an enrolled node holds in its data dir.

    Attributes:
        node_id: the id in its certificate.
        signing_key: the node (device) key.
        certificate: the parsed certificate.
        certificate_bytes: its bytes, sent in every sealed message.
        site_public_key: the site key that signs certificates and revocations.
        network_key: the network key from enrolment.
        site_name: the site's name.
        cloud_public_key: the cloud's key for driver tokens and token lists,
            if the site had ``cloud.pub`` at enrolment.
    """

    node_id: str
    signing_key: nacl.signing.SigningKey = field(repr=False)
    certificate: Certificate
    certificate_bytes: bytes = field(repr=False)
    site_public_key: bytes
    network_key: bytes = field(repr=False)
    site_name: str
    cloud_public_key: bytes | None = None

    @classmethod
    def load(cls, data_dir: Path, *, node_id: str | None = None, now: float | None = None) -> Identity | None:
        """The node's identity, or None when the data dir is not enrolled (no
        ``node.cert``): the node may then run only with ``--insecure``.

        Args:
            node_id: the id the node was told to use (``--node-id``); must
                match the certificate's.
            now: when given, an expired certificate is an error here, at
                start-up, rather than a stream of refusals from every peer.

        Raises:
            LocalSecurityError: partly enrolled, damaged, mismatched or expired.
        """
        data_dir = Path(data_dir)
        cert_path = data_dir / NODE_CERT
        if not cert_path.exists():
            return None
        hint = f"enrol it again: meshnode enroll --node-id ID --data-dir {data_dir} --site SITE_DIR"
        site_public_key = _read_key_file(data_dir / SITE_PUB, "site public key", hint, secret=False)
        network_key = _read_key_file(data_dir / NETWORK_KEY, "network key", hint, secret=True)
        signing_key = nacl.signing.SigningKey(_read_key_file(data_dir / NODE_KEY, "node key", hint, secret=True))
        cert_bytes = cert_path.read_bytes()
        try:
            cert = Certificate.decode(cert_bytes, site_public_key)
        except BadCertificate as exc:
            raise LocalSecurityError(
                f"{cert_path} is not a certificate of the site in {data_dir / SITE_PUB}; {hint}"
            ) from exc
        if cert.public_key != bytes(signing_key.verify_key):
            raise LocalSecurityError(f"{cert_path} was issued for another key than {data_dir / NODE_KEY}; {hint}")
        if node_id is not None and node_id != cert.node_id:
            raise LocalSecurityError(
                f"--node-id {node_id!r} does not match the enrolment in {data_dir}, which is for {cert.node_id!r}; "
                f"drop --node-id, or enrol this data dir as {node_id!r}"
            )
        if now is not None and now > cert.not_after:
            raise LocalSecurityError(
                f"the certificate of {cert.node_id} expired at {_iso(cert.not_after)}; "
                f"renew it: meshnode enroll --node-id {cert.node_id} --data-dir {data_dir}"
            )
        cloud = data_dir / CLOUD_PUB
        cloud_key = _read_key_file(cloud, "cloud key", hint, secret=False) if cloud.exists() else None
        return cls(cert.node_id, signing_key, cert, cert_bytes, site_public_key, network_key, cert.site, cloud_key)


def enroll(
    site_dir: Path,
    node_id: str,
    data_dir: Path,
    *,
    roles: Sequence[str] = ("charger",),
    valid_for: float = DEFAULT_CERT_VALIDITY,
    now: float,
) -> Path:
    """Enrol a node: certify its device key and give it what it needs.

    Uses ``<data_dir>/node.key`` if the node has run before (its events stay
    verifiable) or creates it; writes ``node.cert``, ``site.pub``,
    ``network.key`` (0600), ``site.toml`` and, if the site has one, ``cloud.pub``
    into the data dir, and keeps a copy of the certificate in
    ``<site_dir>/nodes/`` (for revocation by node id and network-key rotation).
    Never copies ``site.key``. Enrolling the same node again renews its
    certificate.

    Returns:
        The path of the new ``node.cert``.

    Raises:
        LocalSecurityError: no site (or no site key), the data dir is enrolled
            as another node or in another site, bad arguments.
    """
    site = load_site(site_dir)
    site.require_signing_key()
    _check_id(node_id, "node id")
    data_dir = Path(data_dir)
    if (data_dir / NODE_CERT).exists():
        try:
            old_site = (data_dir / SITE_PUB).read_bytes()
            old = Certificate.decode((data_dir / NODE_CERT).read_bytes(), old_site)
        except (OSError, BadCertificate):
            old = None
            old_site = b""
        if old is not None and old_site != site.public_key:
            raise LocalSecurityError(
                f"{data_dir} is enrolled in another site ({old.site!r}); "
                "use a fresh data dir, or remove its node.cert on purpose"
            )
        if old is not None and old.node_id != node_id:
            raise LocalSecurityError(
                f"{data_dir} is enrolled as {old.node_id!r}, not {node_id!r}; "
                "a data dir holds one node (its device key signed that node's events)"
            )
    key = load_or_create_node_key(data_dir)
    cert = issue_certificate(site, node_id, bytes(key.verify_key), roles=roles, valid_for=valid_for, now=now)
    parsed = Certificate.decode(cert, site.public_key)
    _write_file(data_dir / SITE_PUB, site.public_key, secret=False)
    _write_file(data_dir / NETWORK_KEY, site.network_key, secret=True)
    _write_toml(data_dir / SITE_TOML, {"name": site.name, "node_id": node_id})
    assert site.path is not None
    cloud = site.path / CLOUD_PUB
    if cloud.exists():
        _write_file(data_dir / CLOUD_PUB, _read_key_file(cloud, "cloud key", "", secret=False), secret=False)
    (site.path / SITE_NODES).mkdir(exist_ok=True)
    _write_file(site.path / SITE_NODES / f"{parsed.serial}.cert", cert, secret=False)
    _write_file(data_dir / NODE_CERT, cert, secret=False)  # last: its presence means "enrolled"
    return data_dir / NODE_CERT


def enrolled_certificates(site_dir: Path) -> list[Certificate]:
    """Every certificate this site directory has issued (``nodes/``), oldest first."""
    site = load_site(site_dir)
    assert site.path is not None
    out = []
    for path in sorted((site.path / SITE_NODES).glob("*.cert")):
        try:
            out.append(Certificate.decode(path.read_bytes(), site.public_key))
        except BadCertificate:
            log.warning("%s is not a certificate of this site; ignored", path)
    return sorted(out, key=lambda c: (c.issued, c.serial))


# --------------------------------------------------------------------------
# Revocations and network-key grants: site-signed entries for the site-config document


def revoke(site: Site, *, node_id: str | None = None, serial: str | None = None, now: float, reason: str = "") -> bytes:
    """A site-signed revocation of one certificate (``serial``) or of every
    certificate of ``node_id`` issued up to ``now``.

    The entry goes into the site-config document's ``revocations`` map under
    :func:`entry_key`; every node that has synced it refuses the certificate.

    Raises:
        LocalSecurityError: no site key, or not exactly one of node_id/serial.
    """
    key = site.require_signing_key()
    if (node_id is None) == (serial is None):
        raise LocalSecurityError("revoke exactly one of node_id or serial")
    body: dict[str, Any] = {"v": 1, "t": "revoke", "site": site.name, "ts": float(now), "why": reason[:200]}
    if node_id is not None:
        body["node"] = _check_id(node_id, "node id")
    else:
        body["serial"] = _check_id(str(serial), "serial")
    return _sign(key, _CTX_REVOKE, _canonical(body))


def entry_key(entry: bytes) -> str:
    """The key under which a site entry is stored in the site-config document's
    ``revocations`` map: the serial for a certificate revocation, ``node:<id>``
    for a node revocation, ``netkey:<key id hex>`` for a network-key grant.
    Reads without verifying (receivers verify); for our own entries.

    Raises:
        LocalSecurityError: not an entry made by this module.
    """
    try:
        signed, _ = _split_signed(entry, "entry", BadSiteEntry, MAX_ENTRY_BYTES)
        body = cbor2.loads(signed)
        if body.get("t") == "revoke":
            return str(body["serial"]) if "serial" in body else f"node:{body['node']}"
        if body.get("t") == "netkey":
            return f"netkey:{bytes(body['kid']).hex()}"
    except Exception as exc:
        raise LocalSecurityError("not a site entry") from exc
    raise LocalSecurityError("not a site entry")


class Revocations:
    """The set of revoked certificates, built from site-signed entries.

    Entries that do not verify (forged, another site's, damaged) are ignored and
    listed in ``rejected``, so one bad entry in the replicated document cannot
    hide the good ones. Grant entries in the same map are skipped silently.
    """

    def __init__(self) -> None:
        self.serials: set[str] = set()
        self.node_ids: dict[str, float] = {}
        """node id -> the latest revocation time: certificates issued up to it are revoked."""
        self.rejected: list[str] = []

    @classmethod
    def from_entries(
        cls, entries: Mapping[str, bytes] | Iterable[bytes], site_public_key: bytes | nacl.signing.VerifyKey
    ) -> Revocations:
        key = _verify_key(site_public_key)
        out = cls()
        items = entries.items() if isinstance(entries, Mapping) else ((None, e) for e in entries)
        for name, entry in items:
            try:
                signed, _ = _split_signed(entry, "entry", BadSiteEntry, MAX_ENTRY_BYTES)
                if cbor2.loads(signed).get("t") == "netkey":
                    continue
            except Exception:
                pass  # reported by the full check below
            try:
                out.add(entry, key, expected_key=name)
            except BadSiteEntry as exc:
                out.rejected.append(f"{name or 'entry'}: {exc.message}")
                log.warning("ignoring revocation %s: %s", name or "entry", exc.message)
        return out

    def add(
        self, entry: bytes, site_public_key: bytes | nacl.signing.VerifyKey, *, expected_key: str | None = None
    ) -> None:
        """Verify one revocation entry and add it.

        Raises:
            BadSiteEntry: malformed, not signed by the site, or stored under a
                key that does not match its content.
        """
        body, _ = _open_signed(
            entry, _verify_key(site_public_key), _CTX_REVOKE, "revocation", BadSiteEntry, MAX_ENTRY_BYTES
        )
        if body.get("v") != 1 or body.get("t") != "revoke" or not _is_time(body.get("ts")):
            raise BadSiteEntry("revocation has the wrong shape")
        if "serial" in body and _is_text(body["serial"], 64) and "node" not in body:
            name = body["serial"]
        elif "node" in body and _is_text(body["node"]) and "serial" not in body:
            name = f"node:{body['node']}"
        else:
            raise BadSiteEntry("revocation names neither one serial nor one node")
        if expected_key is not None and expected_key != name:
            raise BadSiteEntry(f"revocation of {name} stored under {expected_key!r}")
        if "serial" in body:
            self.serials.add(body["serial"])
        else:
            self.node_ids[body["node"]] = max(self.node_ids.get(body["node"], -math.inf), float(body["ts"]))

    def is_revoked(self, cert: Certificate) -> bool:
        if cert.serial in self.serials:
            return True
        until = self.node_ids.get(cert.node_id)
        return until is not None and cert.issued <= until

    def __len__(self) -> int:
        return len(self.serials) + len(self.node_ids)


@dataclass(frozen=True)
class NetworkKey:
    """A network key a :class:`Sealer` holds.

    Attributes:
        key: 32 bytes.
        activate_at: from when it seals (the newest active key seals; all
            unretired keys open).
        retire_at: from when it no longer opens anything (None: never).
    """

    key: bytes = field(repr=False)
    activate_at: float = 0.0
    retire_at: float | None = None

    @property
    def key_id(self) -> bytes:
        return network_key_id(self.key)


@dataclass(frozen=True)
class NetworkKeyGrant:
    """A new network key, opened from a site-signed grant addressed to us.

    ``activate_at`` leaves time for the grant to reach every node through the
    mesh before anyone seals with the new key; ``retire_previous_at`` leaves
    time for nodes that were away to come back, sync and pick it up.
    """

    key: bytes = field(repr=False)
    key_id: bytes
    activate_at: float
    retire_previous_at: float | None


def grant_network_key(
    site: Site,
    network_key: bytes,
    certificates: Iterable[Certificate],
    *,
    activate_at: float,
    retire_previous_at: float | None,
    now: float,
) -> bytes:
    """A site-signed grant of ``network_key`` to each of ``certificates``.

    The key is encrypted separately to each node's key (libsodium sealed box to
    the Curve25519 form of its Ed25519 key), so the grant can travel in the
    replicated site-config document: every node sees it, only the listed
    nodes can read the key. Leave out revoked nodes and they are cut off from
    the network key too once ``activate_at`` has passed.
    """
    key = site.require_signing_key()
    if len(network_key) != 32:
        raise LocalSecurityError("a network key is 32 bytes")
    boxes: dict[str, bytes] = {}
    for cert in certificates:
        public = nacl.signing.VerifyKey(cert.public_key).to_curve25519_public_key()
        boxes[cert.serial] = nacl.public.SealedBox(public).encrypt(network_key)
    body = {
        "v": 1,
        "t": "netkey",
        "site": site.name,
        "kid": network_key_id(network_key),
        "act": float(activate_at),
        "ret": None if retire_previous_at is None else float(retire_previous_at),
        "ts": float(now),
        "keys": boxes,
    }
    return _sign(key, _CTX_GRANT, _canonical(body))


def open_network_key_grant(entry: bytes, identity: Identity) -> NetworkKeyGrant | None:
    """Read a grant: the key if it is addressed to this node's certificate, else None.

    Raises:
        BadSiteEntry: malformed, not signed by our site, or the box for us
            does not open (corrupted).
    """
    body, _ = _open_signed(
        entry, _verify_key(identity.site_public_key), _CTX_GRANT, "network-key grant", BadSiteEntry, MAX_ENTRY_BYTES
    )
    keys = body.get("keys")
    if (
        body.get("v") != 1
        or body.get("t") != "netkey"
        or not isinstance(body.get("kid"), bytes)
        or not _is_time(body.get("act"))
        or not (body.get("ret") is None or _is_time(body.get("ret")))
        or not isinstance(keys, dict)
    ):
        raise BadSiteEntry("network-key grant has the wrong shape")
    box = keys.get(identity.certificate.serial)
    if box is None:
        return None
    try:
        key = nacl.public.SealedBox(identity.signing_key.to_curve25519_private_key()).decrypt(bytes(box))
    except (nacl.exceptions.CryptoError, TypeError) as exc:
        raise BadSiteEntry("network-key grant: our box does not open") from exc
    if len(key) != 32 or network_key_id(key) != body["kid"]:
        raise BadSiteEntry("network-key grant: the key does not match its id")
    ret = body["ret"]
    return NetworkKeyGrant(key, body["kid"], float(body["act"]), None if ret is None else float(ret))


def _save_entry(site: Site, entry: bytes) -> str:
    assert site.path is not None
    name = entry_key(entry)
    (site.path / SITE_ENTRIES).mkdir(exist_ok=True)
    _write_file(site.path / SITE_ENTRIES / f"{name.replace(':', '_')}.cbor", entry, secret=False)
    return name


def site_entries(site_dir: Path) -> dict[str, bytes]:
    """Every revocation and grant this site directory has made, by
    :func:`entry_key`: what the site-config document's ``revocations`` map
    should hold (handing all of them to a node is always safe)."""
    site = load_site(site_dir)
    assert site.path is not None
    out = {}
    for path in sorted((site.path / SITE_ENTRIES).glob("*.cbor")):
        entry = path.read_bytes()
        out[entry_key(entry)] = entry
    return out


def site_revoke(
    site_dir: Path, *, node_id: str | None = None, serial: str | None = None, now: float, reason: str = ""
) -> tuple[str, bytes]:
    """``meshnode site revoke``: make a revocation, keep it in ``<site>/entries/``,
    and return ``(entry_key, entry)`` for the site-config document.

    Raises:
        LocalSecurityError: no site key; a node id or serial this site never enrolled.
    """
    site = load_site(site_dir)
    known = enrolled_certificates(site_dir)
    if node_id is not None and not any(c.node_id == node_id for c in known):
        raise LocalSecurityError(f"this site never enrolled a node {node_id!r} (see {site_dir}/nodes)")
    if serial is not None and not any(c.serial == serial for c in known):
        raise LocalSecurityError(f"this site never issued a certificate {serial!r} (see {site_dir}/nodes)")
    entry = revoke(site, node_id=node_id, serial=serial, now=now, reason=reason)
    return _save_entry(site, entry), entry


def site_rotate_network_key(
    site_dir: Path, *, now: float, activate_in: float = 600.0, retire_previous_after: float = 7 * 86400.0
) -> tuple[str, bytes]:
    """``meshnode site rotate-network-key``: make a new network key, grant it to
    every enrolled node whose certificate is neither revoked nor expired, save
    it as the site's ``network.key`` (new enrolments get it), keep the grant in
    ``<site>/entries/`` and return ``(entry_key, grant)``.

    Raises:
        LocalSecurityError: no site key.
    """
    site = load_site(site_dir)
    site.require_signing_key()
    assert site.path is not None
    revoked = Revocations.from_entries(site_entries(site_dir), site.public_key)
    recipients = [c for c in enrolled_certificates(site_dir) if not revoked.is_revoked(c) and c.not_after >= now]
    new_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    grant = grant_network_key(
        site,
        new_key,
        recipients,
        activate_at=now + activate_in,
        retire_previous_at=now + activate_in + retire_previous_after,
        now=now,
    )
    name = _save_entry(site, grant)
    _write_file(site.path / NETWORK_KEY, new_key, secret=True)
    return name, grant


def trusted_device_keys(
    certificates: Iterable[bytes | Certificate],
    site_public_key: bytes,
    *,
    revocations: Revocations | None = None,
    now: float | None = None,
) -> dict[str, bytes]:
    """device id -> public key of every enrolled device whose certificate verifies
    and is not revoked: the cloud's ``trusted_keys``. Expiry is not applied
    unless ``now`` is given: an event signed while the certificate was valid
    stays valid. Later certificates of the same node win."""
    keys: dict[str, tuple[float, bytes]] = {}
    for item in certificates:
        try:
            cert = item if isinstance(item, Certificate) else Certificate.decode(item, site_public_key)
        except BadCertificate:
            continue
        if revocations is not None and revocations.is_revoked(cert):
            continue
        if now is not None and now > cert.not_after:
            continue
        if cert.node_id not in keys or keys[cert.node_id][0] <= cert.issued:
            keys[cert.node_id] = (cert.issued, cert.public_key)
    return {node_id: key for node_id, (_, key) in sorted(keys.items())}


# --------------------------------------------------------------------------
# Sealed messages


class ReplayWindow:
    """Anti-replay sliding window over one sender's counters.

    The highest counter accepted and a bitmap of the ``size`` counters below it
    (bit i set: ``highest - i`` was accepted), as in RFC 4303 section 3.4.3 and
    RFC 6347 section 4.1.2.6 / RFC 9147 section 4.5.1. :meth:`check` decides
    without changing anything; :meth:`accept` moves the window and is called
    only once the message has been fully verified, so a forged message cannot
    move it.
    """

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = -1
        self.bitmap = 0

    def check(self, ctr: int) -> str | None:
        """None if ``ctr`` is new; else "replayed" or "too_old"."""
        if ctr > self.highest:
            return None
        offset = self.highest - ctr
        if offset >= self.size:
            return "too_old"
        return "replayed" if self.bitmap >> offset & 1 else None

    def accept(self, ctr: int) -> None:
        if ctr > self.highest:
            shift = ctr - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = ctr
        else:
            self.bitmap |= 1 << (self.highest - ctr)


@dataclass
class _Sender:
    window: ReplayWindow
    last_accepted: float


@dataclass(frozen=True)
class Opened:
    """A verified sealed message.

    Attributes:
        sender_node_id: the node id in the sender's certificate.
        cert: the sender's certificate.
        ctr: the message counter (a response quotes a request's).
        body: the plain payload.
        key_id: the network key it was sealed with (a response uses the same).
        ts: the sender's timestamp, seconds.
    """

    sender_node_id: str
    cert: Certificate
    ctr: int
    body: bytes
    key_id: bytes = b""
    ts: float = 0.0


_FIELDS = {"v", "k", "m", "res", "cert", "ctr", "ts", "body"}
_OPTIONAL = {"to", "re"}


class Sealer:
    """Seals and opens mesh messages for one enrolled node (sans-IO).

    Holds the node's identity, the site key, the network keys, the revocation
    set, the replay windows of its peers and counters of refusals by reason.
    Every method takes ``now`` (wall-clock seconds); nothing reads a clock.

    Args:
        identity: this node's enrolment.
        site_public_key: the key that must have signed every peer's certificate.
        network_key: the network key to seal with (and open).
        revocations: the current revocation set; replace the attribute when the
            site-config document changes.
        max_skew: seconds a timestamp may differ from ``now``.
        started: when this node started (wall clock); requests stamped more
            than ``restart_tolerance`` before it are refused, since the replay
            windows of a previous run are gone. None: no such floor (set by
            :class:`SealedTransport` from its clock).
        accept_roles: certificate roles allowed to talk to us.
        max_senders: replay windows kept; idle ones are dropped first.
        nonce: the 24-byte nonce of a box, from the signed bytes it seals;
            random by default. A simulation derives it from its seed and those
            bytes, so that a seeded run seals the same bytes every time.
        counter: ``(now, resource, kind, channel) -> counter`` of the next
            message (``channel``: the address it goes to or came from);
            sequential by default. In a simulation, messages sealed at one
            virtual instant are sealed in an order trio chooses, so it derives
            each counter from the message's place instead (unique per channel).
    """

    def __init__(
        self,
        identity: Identity,
        site_public_key: bytes,
        network_key: bytes,
        *,
        revocations: Revocations | None = None,
        max_skew: float = DEFAULT_MAX_SKEW,
        started: float | None = None,
        restart_tolerance: float = DEFAULT_RESTART_TOLERANCE,
        accept_roles: Sequence[str] = MESH_ROLES,
        max_senders: int = 4096,
        nonce: Callable[[bytes], bytes] | None = None,
        counter: Callable[[float, str, int, str], int] | None = None,
    ) -> None:
        self.identity = identity
        self._nonce = nonce
        self._counter = counter
        self.node_id = identity.node_id
        self._site_key = _verify_key(site_public_key)
        self.revocations = revocations if revocations is not None else Revocations()
        self.max_skew = max_skew
        self.started = started
        self.restart_tolerance = restart_tolerance
        self.accept_roles = frozenset(accept_roles)
        self.max_senders = max_senders
        self.refused: collections.Counter[str] = collections.Counter()
        self._keys: dict[bytes, NetworkKey] = {}
        self._boxes: dict[bytes, nacl.secret.SecretBox] = {}
        self.add_network_key(NetworkKey(network_key))
        self._ctr: int | None = None
        self._senders: dict[str, _Sender] = {}
        self._certs: collections.OrderedDict[bytes, Certificate] = collections.OrderedDict()
        self._cert_bytes = identity.certificate_bytes

    # -- network keys -------------------------------------------------------------

    def add_network_key(self, key: NetworkKey) -> None:
        """Hold another network key (or replace the schedule of one we hold)."""
        if len(key.key) != 32:
            raise LocalSecurityError("a network key is 32 bytes")
        self._keys[key.key_id] = key
        self._boxes[key.key_id] = nacl.secret.SecretBox(key.key)

    def apply_grant(self, grant: NetworkKeyGrant) -> None:
        """Take a rotated-in key: open with it now, seal with it from its
        activation, and retire every older key at ``retire_previous_at``."""
        for kid, held in list(self._keys.items()):
            if kid != grant.key_id and held.activate_at <= grant.activate_at and grant.retire_previous_at is not None:
                retire = (
                    grant.retire_previous_at
                    if held.retire_at is None
                    else min(held.retire_at, grant.retire_previous_at)
                )
                self._keys[kid] = dataclasses.replace(held, retire_at=retire)
        self.add_network_key(NetworkKey(grant.key, grant.activate_at))

    @property
    def network_keys(self) -> list[NetworkKey]:
        return sorted(self._keys.values(), key=lambda k: k.activate_at)

    def _usable(self, key: NetworkKey, now: float) -> bool:
        return key.retire_at is None or now < key.retire_at

    def _sealing_key_id(self, now: float) -> bytes:
        active = [k for k in self._keys.values() if k.activate_at <= now and self._usable(k, now)]
        if not active:
            active = [k for k in self._keys.values() if self._usable(k, now)] or list(self._keys.values())
            return min(active, key=lambda k: k.activate_at).key_id
        return max(active, key=lambda k: k.activate_at).key_id

    # -- sealing --------------------------------------------------------------------

    def _next_ctr(self, now: float) -> int:
        if self._ctr is None:
            self._ctr = int(now * 1_000_000) << 8
        self._ctr += 1
        if self._ctr > MAX_COUNTER:
            raise LocalSecurityError("message counter exhausted (is the clock sane?)")
        return self._ctr

    def _seal(
        self,
        kind: int,
        resource: str,
        method: str,
        body: bytes,
        now: float,
        *,
        to: str | None,
        re: int | None,
        key_id: bytes | None,
        channel: str = "",
    ) -> tuple[bytes, int]:
        ctr = self._next_ctr(now) if self._counter is None else self._counter(now, resource, kind, channel)
        fields: dict[str, Any] = {
            "v": 1,
            "k": kind,
            "m": method,
            "res": resource,
            "cert": self._cert_bytes,
            "ctr": ctr,
            "ts": int(round(now * 1000)),
            "body": bytes(body),
        }
        if to is not None:
            fields["to"] = to
        if re is not None:
            fields["re"] = re
        inner = _sign(self.identity.signing_key, _CTX_SEALED, _canonical(fields))
        if key_id is None or key_id not in self._keys or not self._usable(self._keys[key_id], now):
            key_id = self._sealing_key_id(now)
        box = self._boxes[key_id]
        sealed = box.encrypt(inner) if self._nonce is None else box.encrypt(inner, self._nonce(inner))
        return SEALED_MAGIC + key_id + bytes(sealed), ctr

    def seal_request(
        self,
        resource: str,
        body: bytes,
        now: float,
        *,
        method: str = "POST",
        to: str | None = None,
        channel: str = "",
    ) -> tuple[bytes, int]:
        """Seal a request; returns the bytes to send and its counter (keep it
        for :meth:`open_response`). ``to``: the recipient's node id, if known;
        ``channel``: its address (for the ``counter`` seam only)."""
        return self._seal(REQUEST, resource, method, body, now, to=to, re=None, key_id=None, channel=channel)

    def seal_response(
        self,
        resource: str,
        body: bytes,
        request_ctr: int,
        now: float,
        *,
        method: str = "POST",
        to: str | None = None,
        key_id: bytes | None = None,
        channel: str = "",
    ) -> bytes:
        """Seal the response to a request (``request_ctr`` from its
        :class:`Opened`; ``to`` its sender; ``key_id`` the key it came under,
        so a peer still on an older network key can read our answer)."""
        return self._seal(RESPONSE, resource, method, body, now, to=to, re=request_ctr, key_id=key_id, channel=channel)[
            0
        ]

    # -- opening ----------------------------------------------------------------------

    def open_request(self, resource: str, data: bytes, now: float, *, method: str = "POST") -> Opened:
        """Verify a sealed request that arrived on ``method resource``.

        Raises:
            RemoteSecurityError: one of the refusals in the module docstring
                (each is the transport's Unauthorized or Forbidden).
        """
        return self._open(REQUEST, resource, method, data, now, None)

    def open_reply(self, resource: str, data: bytes, request_ctr: int, now: float, *, method: str = "POST") -> Opened:
        """Verify the sealed response to our request ``request_ctr``."""
        return self._open(RESPONSE, resource, method, data, now, request_ctr)

    def open_response(self, resource: str, data: bytes, request_ctr: int, now: float, *, method: str = "POST") -> bytes:
        """Verify the sealed response to our request ``request_ctr``; return its body."""
        return self.open_reply(resource, data, request_ctr, now, method=method).body

    def _open(self, kind: int, resource: str, method: str, data: bytes, now: float, request_ctr: int | None) -> Opened:
        try:
            opened, sender = self._verify(kind, resource, method, data, now, request_ctr)
        except RemoteSecurityError as exc:
            self.refused[exc.reason] += 1
            raise
        if sender is not None:
            sender.window.accept(opened.ctr)
            sender.last_accepted = now
            self._senders[opened.cert.serial] = self._senders.pop(opened.cert.serial, sender)  # most recent last
        return opened

    def _verify(
        self, kind: int, resource: str, method: str, data: bytes, now: float, request_ctr: int | None
    ) -> tuple[Opened, _Sender | None]:
        # 1. The box: cheap checks first, nothing parsed before the MAC holds.
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadEnvelope("payload is not bytes", reason="not_sealed")
        data = bytes(data)
        if not data.startswith(SEALED_MAGIC):
            if len(data) < len(SEALED_MAGIC) and SEALED_MAGIC.startswith(data) and data:
                raise BadEnvelope("sealed message truncated", reason="truncated")
            raise BadEnvelope("payload is not sealed: only enrolled nodes may use this resource", reason="not_sealed")
        if len(data) < MIN_SEALED:
            raise BadEnvelope("sealed message truncated", reason="truncated")
        kid = data[len(SEALED_MAGIC) : len(SEALED_MAGIC) + KEY_ID_LEN]
        held = self._keys.get(kid)
        if held is None or not self._usable(held, now):
            raise BadEnvelope("sealed with a network key this node does not hold", reason="unknown_network_key")
        try:
            inner = self._boxes[kid].decrypt(data[len(SEALED_MAGIC) + KEY_ID_LEN :])
        except nacl.exceptions.CryptoError as exc:
            raise BadEnvelope("sealed message does not authenticate (tampered or truncated)", reason="bad_mac") from exc
        # 2. The content: from a holder of the network key, not yet from anyone in particular.
        malformed = BadEnvelope("sealed message malformed", reason="malformed")
        try:
            signed, sig = _split_signed(inner, "sealed message", BadEnvelope, len(inner))
        except BadEnvelope as exc:
            raise malformed from exc
        try:
            fields = cbor2.loads(signed)
        except Exception as exc:
            raise malformed from exc
        if not isinstance(fields, dict) or not _FIELDS <= set(fields) or not set(fields) <= _FIELDS | _OPTIONAL:
            raise malformed
        ctr, ts, re, to = fields["ctr"], fields["ts"], fields.get("re"), fields.get("to")
        if (
            fields["v"] != 1
            or fields["k"] not in (REQUEST, RESPONSE)
            or not isinstance(fields["m"], str)
            or not isinstance(fields["res"], str)
            or not isinstance(fields["cert"], bytes)
            or not isinstance(fields["body"], bytes)
            or not _is_int(ctr)
            or not 0 <= ctr <= MAX_COUNTER
            or not _is_int(ts)
            or abs(ts) > 2**53
            or not (to is None or isinstance(to, str))
            or not (re is None or (_is_int(re) and 0 <= re <= MAX_COUNTER))
        ):
            raise malformed
        # 3. Who: a certificate of our site, and that node's signature.
        cert = self._certificate(fields["cert"])
        try:
            nacl.signing.VerifyKey(cert.public_key).verify(_CTX_SEALED + signed, sig)
        except nacl.exceptions.BadSignatureError as exc:
            raise BadSignature(f"signature does not match the certificate of {cert.node_id}") from exc
        # 4. Authentic from cert.node_id: may it be acted on, here and now?
        if fields["k"] != kind:
            raise WrongKind()
        if fields["res"] != resource or fields["m"] != method:
            raise WrongResource(f"sealed for {fields['m']} {fields['res']}, received on {method} {resource}")
        if kind == RESPONSE and re != request_ctr:
            raise Replayed("response does not answer our request", reason="unmatched_response")
        if cert.node_id == self.node_id:
            raise Reflected()
        if to is not None and to != self.node_id:
            raise Misaddressed()
        cert.check_valid(now)
        if self.revocations.is_revoked(cert):
            raise CertificateRevoked(f"certificate of {cert.node_id} is revoked")
        if not self.accept_roles.intersection(cert.roles):
            raise RoleNotAllowed(f"roles {list(cert.roles)} may not use the mesh")
        if abs(ts - now * 1000) > self.max_skew * 1000:
            raise ClockSkew(
                f"timestamp is {abs(ts / 1000 - now):.0f} s from the receiver's clock "
                f"(allowed {self.max_skew:.0f} s): check the clocks"
            )
        opened = Opened(cert.node_id, cert, ctr, fields["body"], kid, ts / 1000)
        if kind == RESPONSE:
            return opened, None
        # 5. Fresh: a request counter seen once, after our start.
        if self.started is not None and ts < (self.started - self.restart_tolerance) * 1000:
            raise Replayed("request stamped before this node started", reason="before_start")
        sender = self._sender(cert.serial, now)
        verdict = sender.window.check(ctr)
        if verdict is not None:
            raise Replayed("replayed or too old message counter", reason=verdict)
        return opened, sender

    def _certificate(self, data: bytes) -> Certificate:
        cert = self._certs.get(data)
        if cert is not None:
            self._certs.move_to_end(data)
            return cert
        cert = Certificate.decode(data, self._site_key)
        self._certs[data] = cert
        if len(self._certs) > 256:
            self._certs.popitem(last=False)
        return cert

    def _sender(self, serial: str, now: float) -> _Sender:
        """The replay state of a sender, fresh if it was silent so long that
        nothing it sent before can pass the time check any more."""
        sender = self._senders.get(serial)
        if sender is not None and now - sender.last_accepted > 2 * self.max_skew:
            del self._senders[serial]
            sender = None
        if sender is None:
            if len(self._senders) >= self.max_senders:
                self._prune(now)
            sender = _Sender(ReplayWindow(), now)
            self._senders[serial] = sender
        return sender

    def _prune(self, now: float) -> None:
        for serial in [s for s, e in self._senders.items() if now - e.last_accepted > 2 * self.max_skew]:
            del self._senders[serial]
        while len(self._senders) >= self.max_senders:
            oldest = next(iter(self._senders))
            log.warning("replay state of %s dropped: more than %d senders", oldest, self.max_senders)
            del self._senders[oldest]


# --------------------------------------------------------------------------
# The transport wrapper


authenticated_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("authenticated_peer", default=None)
"""The node id of the sender of the sealed request being handled (None outside
a sealed handler, e.g. on open resources). The node checks that the ``from``
in the request body equals it."""

_REFUSAL_CLASSES: dict[str, type[RequestRefused]] = {
    c.code: c for c in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, PayloadTooLarge)
}


class SealedTransport:
    """A :class:`~meshnode._transport.Transport` that seals everything it
    carries, around any other transport (CoAP, in-memory, the simulator's).

    ``request`` seals the payload, sends it with the inner transport and opens
    the response; ``route`` registers a wrapper that opens the request (refusing
    with 4.01/4.03, counting, and not calling the handler), runs the handler on
    the plain body with :data:`authenticated_peer` set, and seals its answer.
    Resources in ``open_resources`` pass through unsealed: discovery tools must
    read them, and nothing in them is secret.

    A handler's own refusals (4.00, 4.04, ...) travel unsealed, as every CoAP
    error does; their text is replaced by a generic one (the detail is logged
    here) so that it cannot leak session content to a listener.

    Attributes:
        refused: incoming requests refused, by reason.
        bad_responses: responses to our requests that did not open, by reason.
    """

    def __init__(
        self,
        inner: Transport,
        sealer: Sealer,
        *,
        open_resources: Iterable[str] = ("/m/hello", "/.well-known/core"),
        clock: Callable[[], float] = time.time,
        max_peers: int = 4096,
    ) -> None:
        self.inner = inner
        self.sealer = sealer
        self.address = inner.address
        self.stats: TransportStats = inner.stats
        self.max_payload = inner.max_payload
        self.open_resources = frozenset(open_resources)
        self._clock = clock
        if sealer.started is None:
            sealer.started = clock()
        self.refused: collections.Counter[str] = collections.Counter()
        self.bad_responses: collections.Counter[str] = collections.Counter()
        self.log_budget = LogBudget()
        """WARNING lines about bad responses and handlers' refusals: one per
        reason per 10 s, with how many were held back (they are counted in
        ``bad_responses`` / the dispatcher either way)."""
        self._peers: dict[str, str] = {}
        """address -> node id that answered there: requests then name their recipient."""
        self._max_peers = max_peers

    def route(self, resource: str, handler: Handler, *, method: str = "POST") -> None:
        if resource in self.open_resources:
            self.inner.route(resource, handler, method=method)
        else:
            self.inner.route(resource, self._sealed_handler(resource, method, handler), method=method)

    async def request(
        self,
        peer: str,
        resource: str,
        payload: bytes = b"",
        *,
        method: str = "POST",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> bytes:
        if resource in self.open_resources:
            return await self.inner.request(peer, resource, payload, method=method, timeout=timeout)
        sealed, ctr = self.sealer.seal_request(
            resource, payload, self._clock(), method=method, to=self._peers.get(peer), channel=peer
        )
        try:
            reply = await self.inner.request(peer, resource, sealed, method=method, timeout=timeout)
        except RemoteRefused as exc:
            if exc.code in ("4.01", "4.03"):
                self._peers.pop(peer, None)  # maybe another node answers there now: ask unaddressed
            raise
        try:
            opened = self.sealer.open_reply(resource, reply, ctr, self._clock(), method=method)
        except RemoteSecurityError as exc:
            self.bad_responses[exc.reason] += 1
            self._peers.pop(peer, None)
            held = self.log_budget.allow(("response", exc.reason), self._clock())
            if held is not None:
                log.warning(
                    "response from %s to %s %s refused: %s (%s)%s",
                    peer,
                    method,
                    resource,
                    exc.message,
                    exc.reason,
                    held_back(held, self.log_budget.interval),
                )
            raise ResponseRejected(f"{method} {peer}{resource}: response refused: {exc.message}", exc.reason) from exc
        if self._peers.get(peer) != opened.sender_node_id:
            self._peers.pop(peer, None)
            self._peers[peer] = opened.sender_node_id
            if len(self._peers) > self._max_peers:
                del self._peers[next(iter(self._peers))]
        return opened.body

    async def send(self, peer: str, resource: str, payload: bytes = b"") -> None:
        """A one-way, sealed POST (see ``Transport.send``): sealed as a request, so
        the receiver opens it, checks sender, freshness and replay exactly as for
        a request, and runs the handler; its (sealed) answer goes nowhere.

        Over an inner transport without one-way sends it is a request whose
        answer is not read (nor opened)."""
        if resource in self.open_resources:
            sealed = bytes(payload)
        else:
            sealed, _ = self.sealer.seal_request(
                resource, payload, self._clock(), to=self._peers.get(peer), channel=peer
            )
        send = getattr(self.inner, "send", None)
        if send is not None:
            await send(peer, resource, sealed)
        else:
            await self.inner.request(peer, resource, sealed)

    def _sealed_handler(self, resource: str, method: str, handler: Handler) -> Handler:
        async def sealed(payload: bytes, remote: str) -> bytes:
            try:
                opened = self.sealer.open_request(resource, payload, self._clock(), method=method)
            except RemoteSecurityError as exc:
                self.refused[exc.reason] += 1
                raise  # the Dispatcher answers exc.code and logs it at WARNING
            body = await self._call(handler, opened, remote)
            return self.sealer.seal_response(
                resource,
                body,
                opened.ctr,
                self._clock(),
                method=method,
                to=opened.sender_node_id,
                key_id=opened.key_id,
                channel=remote,
            )

        return sealed

    async def _call(self, handler: Handler, opened: Opened, remote: str) -> bytes:
        """Run the handler in a task of its own with :data:`authenticated_peer`
        set. A task of its own, because the in-memory transport runs all its
        handlers in one shared contextvars context: setting the variable there
        would leak between concurrent requests."""
        result: list[bytes] = []

        async def run() -> None:
            result.append(await handler(opened.body, remote))

        try:
            async with trio.open_nursery() as nursery:
                token = authenticated_peer.set(opened.sender_node_id)
                try:
                    nursery.start_soon(run)  # the child copies the context now
                finally:
                    authenticated_peer.reset(token)
        except Exception as exc:
            refused = refusal_in(exc)
            if refused is None:
                raise
            held = self.log_budget.allow(("handler", refused.code), self._clock())
            if held is not None:
                log.warning(
                    "handler refused request from %s: %s %s%s",
                    opened.sender_node_id,
                    refused.code,
                    refused.message,
                    held_back(held, self.log_budget.interval),
                )
            generic = _REFUSAL_CLASSES.get(refused.code, BadRequest)
            raise generic(f"{generic.message} (detail in the responder's log)") from exc
        return result[0]


# --------------------------------------------------------------------------
# Driver tokens and token lists (offline authorisation)


@dataclass(frozen=True)
class DriverToken:
    """A verified driver token: the cloud vouches for ``token_id`` until
    ``not_after``, with optional limits."""

    token_id: str
    max_wh: int | None
    max_minutes: int | None
    not_after: float


@dataclass(frozen=True)
class Limits:
    """Caps on an offline session (None: no cap)."""

    max_wh: int | None = None
    max_minutes: int | None = None


@dataclass(frozen=True)
class TokenListEntry:
    """A verified entry of the site-config's allowed or revoked id-token list."""

    token_id: str
    allowed: bool
    ts: float


@dataclass(frozen=True)
class Authorization:
    """The outcome of :func:`authorize`.

    Attributes:
        accepted: start the session or not.
        reason: why (a stable tag: revoked, token_invalid, token_expired,
            token_mismatch, driver_token, allowed_list, unknown_refused,
            unknown_accepted).
        limits: caps to enforce when accepted, None for none.
        review: flag the session for review in the cloud (accepted without
            the cloud's word).
        ignored: entries that were present but did not verify.
    """

    accepted: bool
    reason: str
    limits: Limits | None = None
    review: bool = False
    ignored: tuple[str, ...] = ()


def _limit(value: int | None, what: str) -> int | None:
    if value is not None and (not _is_int(value) or value < 0):
        raise LocalSecurityError(f"{what} must be a non-negative integer or None")
    return value


def _b64encode(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenInvalid("driver token is not valid base64url") from exc


def issue_driver_token(
    cloud_signing_key: nacl.signing.SigningKey,
    token_id: str,
    *,
    max_wh: int | None,
    max_minutes: int | None,
    not_after: float,
) -> str:
    """A driver token: text a driver can carry in an app or a QR code
    (``mdt1.`` + base64url of a cloud-signed CBOR pair), which any node
    verifies with the cloud's public key and no network."""
    _check_id(token_id, "token id")
    body = [1, token_id, _limit(max_wh, "max_wh"), _limit(max_minutes, "max_minutes"), float(not_after)]
    return DRIVER_TOKEN_PREFIX + _b64encode(_sign(cloud_signing_key, _CTX_DRIVER, _canonical(body)))


def _cloud_keys(cloud_public_key: bytes | Sequence[bytes]) -> list[nacl.signing.VerifyKey]:
    keys = [cloud_public_key] if isinstance(cloud_public_key, bytes | bytearray) else list(cloud_public_key)
    return [_verify_key(bytes(k)) for k in keys]


def _open_cloud_signed(
    data: bytes,
    keys: list[nacl.signing.VerifyKey],
    context: bytes,
    what: str,
    error: type[RemoteSecurityError],
    limit: int,
) -> Any:
    signed, sig = _split_signed(data, what, error, limit)
    for key in keys:
        try:
            key.verify(context + signed, sig)
            break
        except nacl.exceptions.BadSignatureError:
            continue
    else:
        raise error(f"{what} was not signed by this site's cloud (forged, altered, or another issuer)")
    try:
        return cbor2.loads(signed)
    except Exception as exc:
        raise error(f"{what}: signed content is not valid CBOR") from exc


def verify_driver_token(text: str, cloud_public_key: bytes | Sequence[bytes], now: float) -> DriverToken:
    """Check a driver token offline.

    Args:
        cloud_public_key: the cloud's key, or several during a key rotation.

    Raises:
        TokenInvalid: not a token, altered, or not issued by our cloud.
        TokenExpired: valid, but past its expiry.
    """
    if not isinstance(text, str) or not text.startswith(DRIVER_TOKEN_PREFIX):
        raise TokenInvalid(f"not a driver token (it starts with {DRIVER_TOKEN_PREFIX!r})")
    if len(text) > MAX_TOKEN_TEXT:
        raise TokenInvalid(f"driver token longer than {MAX_TOKEN_TEXT} characters")
    body = _open_cloud_signed(
        _b64decode(text[len(DRIVER_TOKEN_PREFIX) :].strip()),
        _cloud_keys(cloud_public_key),
        _CTX_DRIVER,
        "driver token",
        TokenInvalid,
        MAX_TOKEN_TEXT,
    )
    if (
        not isinstance(body, list)
        or len(body) != 5
        or body[0] != 1
        or not _is_text(body[1])
        or not (body[2] is None or (_is_int(body[2]) and body[2] >= 0))
        or not (body[3] is None or (_is_int(body[3]) and body[3] >= 0))
        or not _is_time(body[4])
    ):
        raise TokenInvalid("driver token has the wrong shape")
    token = DriverToken(body[1], body[2], body[3], float(body[4]))
    if now > token.not_after:
        raise TokenExpired(f"driver token {token.token_id} expired at {_iso(token.not_after)}")
    return token


def signed_token_list_entry(cloud_key: nacl.signing.SigningKey, token_id: str, allowed: bool, now: float) -> bytes:
    """An entry for the site-config document's ``id_tokens_allowed`` (allowed=True)
    or ``id_tokens_revoked`` (allowed=False) map, keyed by ``token_id``."""
    _check_id(token_id, "token id")
    return _sign(
        cloud_key, _CTX_TOKEN_LIST, _canonical({"v": 1, "id": token_id, "ok": bool(allowed), "ts": float(now)})
    )


def verify_token_list_entry(entry: bytes, cloud_public_key: bytes | Sequence[bytes]) -> TokenListEntry:
    """Verify an allowed/revoked list entry.

    Raises:
        TokenInvalid: malformed or not signed by the cloud.
    """
    body = _open_cloud_signed(
        entry, _cloud_keys(cloud_public_key), _CTX_TOKEN_LIST, "token list entry", TokenInvalid, MAX_ENTRY_BYTES
    )
    if (
        not isinstance(body, dict)
        or set(body) != {"v", "id", "ok", "ts"}
        or body["v"] != 1
        or not _is_text(body["id"])
        or not isinstance(body["ok"], bool)
        or not _is_time(body["ts"])
    ):
        raise TokenInvalid("token list entry has the wrong shape")
    return TokenListEntry(body["id"], body["ok"], float(body["ts"]))


def _list_verdict(
    id_token: str, entries: Mapping[str, bytes], allowed: bool, keys: bytes | Sequence[bytes], ignored: list[str]
) -> float | None:
    """The time of a valid entry for ``id_token`` in one list, or None."""
    entry = entries.get(id_token)
    if entry is None:
        return None
    try:
        parsed = verify_token_list_entry(entry, keys)
    except TokenInvalid as exc:
        ignored.append(f"{'allowed' if allowed else 'revoked'}[{id_token}]: {exc.message}")
        return None
    if parsed.token_id != id_token or parsed.allowed != allowed:
        ignored.append(f"{'allowed' if allowed else 'revoked'}[{id_token}]: entry for another token or list")
        return None
    return parsed.ts


def authorize(
    id_token: str | None,
    *,
    driver_token_text: str | None,
    allowed_entries: Mapping[str, bytes],
    revoked_entries: Mapping[str, bytes],
    policy: Literal["refuse", "accept_limited"],
    limits: Limits | None,
    cloud_public_key: bytes | Sequence[bytes],
    now: float,
) -> Authorization:
    """Decide, offline, whether a session may start (a pure function).

    The decision table, first match wins (OCPP's LocalAuthorizeOffline with the
    local list, then AllowOfflineTxForUnknownId for the rest):

    1. a driver token that does not verify: refused (token_invalid), as is
       one for another id than the presented ``id_token`` (token_mismatch);
    2. the id is on the revoked list with an entry at least as new as any
       allowed entry: refused (revoked), even with a valid driver token;
    3. a valid but expired driver token: refused (token_expired);
    4. a valid driver token: accepted with its limits (driver_token);
    5. on the allowed list: accepted without limits (allowed_list);
    6. unknown: ``policy`` "refuse" refuses (unknown_refused); "accept_limited"
       accepts with ``limits`` and flags the session for review in the cloud
       (unknown_accepted).

    List entries that do not verify are ignored (listed in ``ignored``), so a
    forged "allowed" entry is worth nothing and a forged "revoked" one cannot
    lock a driver out.
    """
    if policy not in ("refuse", "accept_limited"):
        raise LocalSecurityError(f"policy must be 'refuse' or 'accept_limited', got {policy!r}")
    ignored: list[str] = []
    token: DriverToken | None = None
    expired = False
    if driver_token_text is not None:
        try:
            token = verify_driver_token(driver_token_text, cloud_public_key, now)
        except TokenExpired:
            expired = True
        except TokenInvalid as exc:
            return Authorization(False, "token_invalid", review=False, ignored=(exc.message,))
        if token is not None:
            if id_token is not None and token.token_id != id_token:
                return Authorization(False, "token_mismatch")
            id_token = token.token_id
    if id_token is None:
        if expired:
            return Authorization(False, "token_expired")
        raise LocalSecurityError("authorize needs an id_token or a driver token")
    allowed_ts = _list_verdict(id_token, allowed_entries, True, cloud_public_key, ignored)
    revoked_ts = _list_verdict(id_token, revoked_entries, False, cloud_public_key, ignored)
    if revoked_ts is not None and (allowed_ts is None or revoked_ts >= allowed_ts):
        return Authorization(False, "revoked", ignored=tuple(ignored))
    if expired:
        return Authorization(False, "token_expired", ignored=tuple(ignored))
    if token is not None:
        return Authorization(True, "driver_token", Limits(token.max_wh, token.max_minutes), False, tuple(ignored))
    if allowed_ts is not None:
        return Authorization(True, "allowed_list", None, False, tuple(ignored))
    if policy == "accept_limited":
        return Authorization(True, "unknown_accepted", limits, True, tuple(ignored))
    return Authorization(False, "unknown_refused", ignored=tuple(ignored))
