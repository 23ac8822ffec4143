"""Charge-point registrations: site-signed entries that let a charger log in to any node.

OCPP Security Profile 1 (HTTP Basic at the WebSocket upgrade, user = the charge
point id) needs every node of a site to know every charger's password, also a
node that joined after the charger was registered, and also while the site has no
uplink. So a registration is one more *site-signed entry* in the replicated site
config, like a revocation: `meshnode charger add --site DIR --id CP-ID` signs

    {"v": 1, "t": "charger", "site": NAME, "id": CP-ID, "ts": NOW,
     "pw": {"alg": "scrypt", "n": 16384, "r": 8, "p": 1, "salt": 16 bytes, "hash": 32 bytes}}

with the site key, and the entry goes into the site config's `revocations` map under
`charger:<id>` (the map holds every site-signed entry; the document's sections are
fixed by its genesis change, so a new kind of entry cannot get a section of its own
without forking every site's config). A node accepts an entry only if the site key
signed it, for its own site.

Only a salted scrypt hash of the password is stored: the password is made up by
the CLI (24 random characters, about 143 bits), printed once and never written
anywhere, so the replicated hash is worthless to whoever copies a node's store.
Registering the same id again replaces the password (the newer `ts` wins).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import nacl.signing

from .._security import (
    MAX_ENTRY_BYTES,
    BadSiteEntry,
    LocalSecurityError,
    Site,
    _canonical,
    _check_id,
    _open_signed,
    _sign,
    _split_signed,
    _verify_key,
)

_CTX_CHARGER = b"meshnode/charger-registration/v1\x00"
ENTRY_PREFIX = "charger:"
"""Key prefix of registrations in the site config's `revocations` map."""

MAX_CHARGER_ID = 48
"""OCPP 2.0.1's limit on a charging station's identity (1.6 chargers fit it too)."""

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
"""scrypt cost: about 16 MiB and a few tens of ms per check (a login, not a message)."""


@dataclass(frozen=True)
class ChargerRegistration:
    """A verified registration: `charger_id` may log in with the password whose hash this holds."""

    charger_id: str
    ts: float
    salt: bytes
    hash: bytes
    n: int
    r: int
    p: int

    def check_password(self, password: str) -> bool:
        """Whether `password` is this charger's (constant-time compare)."""
        if len(password) > 256:
            return False
        got = hashlib.scrypt(password.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p, dklen=len(self.hash))
        return hmac.compare_digest(got, self.hash)


def new_password() -> str:
    """A fresh charger password: 24 characters from `secrets.token_urlsafe` (printable ASCII)."""
    return secrets.token_urlsafe(18)


def charger_entry(site: Site, charger_id: str, password: str, now: float) -> bytes:
    """A site-signed registration of `charger_id` with (a hash of) `password`.

    Raises:
        LocalSecurityError: no site key, or an unusable charger id.
    """
    key: nacl.signing.SigningKey = site.require_signing_key()
    _check_id(charger_id, "charge point id")
    if len(charger_id) > MAX_CHARGER_ID or "/" in charger_id or ":" in charger_id:
        raise LocalSecurityError(
            f"a charge point id is at most {MAX_CHARGER_ID} characters without '/' or ':' "
            f"(it is the last part of the charger's URL and the HTTP Basic user), got {charger_id!r}"
        )
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    body: dict[str, Any] = {
        "v": 1,
        "t": "charger",
        "site": site.name,
        "id": charger_id,
        "ts": float(now),
        "pw": {"alg": "scrypt", **SCRYPT, "salt": salt, "hash": digest},
    }
    return _sign(key, _CTX_CHARGER, _canonical(body))


def is_charger_entry(entry: bytes) -> bool:
    """Whether an entry claims to be a registration (shape only, nothing verified)."""
    import cbor2

    try:
        signed, _ = _split_signed(entry, "entry", BadSiteEntry, MAX_ENTRY_BYTES)
        body = cbor2.loads(signed)
    except Exception:
        return False
    return isinstance(body, dict) and body.get("t") == "charger"


def verify_charger_entry(entry: bytes, site_public_key: bytes, site_name: str) -> ChargerRegistration:
    """Check a registration: signed by this site's key, for this site, well formed.

    Raises:
        BadSiteEntry: it is not (nothing may be taken from it).
    """
    body, _ = _open_signed(
        entry, _verify_key(site_public_key), _CTX_CHARGER, "charger registration", BadSiteEntry, MAX_ENTRY_BYTES
    )
    pw = body.get("pw")
    cid = body.get("id")
    if body.get("v") != 1 or body.get("t") != "charger" or not isinstance(pw, dict):
        raise BadSiteEntry("charger registration: unknown version or kind")
    if body.get("site") != site_name:
        raise BadSiteEntry(f"charger registration for site {body.get('site')!r}, not {site_name!r}")
    if not isinstance(cid, str) or not cid or len(cid) > 128 or not cid.isprintable():
        raise BadSiteEntry("charger registration: bad charge point id")
    n, r, p, salt, digest = (pw.get(k) for k in ("n", "r", "p", "salt", "hash"))
    if (
        pw.get("alg") != "scrypt"
        or not (isinstance(n, int) and isinstance(r, int) and isinstance(p, int))
        or not (2 <= n <= 2**17 and n & (n - 1) == 0 and 1 <= r <= 16 and 1 <= p <= 4)
        or not isinstance(salt, bytes)
        or not isinstance(digest, bytes)
        or not 16 <= len(digest) <= 64
        or not isinstance(body.get("ts"), int | float)
    ):
        raise BadSiteEntry("charger registration: bad password hash")
    return ChargerRegistration(cid, float(body["ts"]), salt, digest, n, r, p)


__all__ = [
    "ENTRY_PREFIX",
    "ChargerRegistration",
    "charger_entry",
    "is_charger_entry",
    "new_password",
    "verify_charger_entry",
]
