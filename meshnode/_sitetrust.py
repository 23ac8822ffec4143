"""What the cloud trusts of one site: certificates its key signed, minus its revocations.

`meshnode cloud --site DIR` builds a `SiteTrust` from the site's public files and hands
two checks to the reconciliation service (`uplink.serve_cloud`):

- `authenticate(certificate, now)`: may the holder of this certificate forward the
  site's documents? Yes for a certificate the site key signed, not revoked, not
  expired, with a mesh role (charger, gateway). Every signed sync request is checked
  with it (`uplink.SignedSyncRequest`); an unsigned one is refused.
- `certify(device_id, declared)`: the key that a session document's `devices` entry
  vouches for, if the site signed that certificate for that device and has not
  revoked it (events of a revoked certificate are filed as conflicts, never billed).

The cloud needs only ``site.pub`` (and ``site.toml`` for the name) from the site
directory, never ``site.key`` or ``network.key``. Revocations are the files
``DIR/entries/*.cbor`` that `meshnode site revoke` writes (copy them over, or hand
them to the cloud's ``POST /v1/site/entries``); the directory is read again whenever
it changes, so a revocation takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from uplink import RemoteRequestError

from ._security import (
    MESH_ROLES,
    SITE_ENTRIES,
    SITE_PUB,
    BadCertificate,
    BadSiteEntry,
    Certificate,
    LocalSecurityError,
    Revocations,
    _read_key_file,
    _write_file,
    enrolled_certificates,
    entry_key,
)

log = logging.getLogger("meshnode.sitetrust")


class SiteTrust:
    """The cloud's view of a site's trust: its public key and its revocations.

    Args:
        site_dir: a copy of the site directory holding at least ``site.pub``.

    Raises:
        LocalSecurityError: no readable ``site.pub`` there.
    """

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = Path(site_dir)
        self.public_key = _read_key_file(
            self.site_dir / SITE_PUB,
            "site public key",
            f"copy the site's site.pub into {self.site_dir} (meshnode site init writes it)",
            secret=False,
        )
        self._entries_stamp: tuple[int, int] | None = None
        self.revocations = Revocations()
        self.reload()

    def reload(self) -> None:
        """Read ``entries/`` again if it changed since the last read."""
        folder = self.site_dir / SITE_ENTRIES
        try:
            st = os.stat(folder)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._entries_stamp:
            return
        self._entries_stamp = stamp
        entries: dict[str, bytes] = {}
        for path in sorted(folder.glob("*.cbor")) if stamp != (0, 0) else ():
            try:
                entry = path.read_bytes()
                entries[entry_key(entry)] = entry
            except Exception as exc:  # noqa: BLE001 - one damaged file must not hide the others
                log.warning("site entry %s ignored: %s", path, exc)
        self.revocations = Revocations.from_entries(entries, self.public_key)
        log.info("site trust: %d revocations from %s", len(self.revocations), folder)

    def _certificate(self, blob: bytes) -> Certificate | None:
        try:
            return Certificate.decode(blob, self.public_key)
        except BadCertificate:
            return None
        except Exception:  # noqa: BLE001 - bytes from a document: anything that is not ours
            return None

    def certify(self, device_id: str, declared: bytes) -> bytes | None:
        """The key a document's `devices` entry vouches for, or None (not ours, another id, revoked)."""
        self.reload()
        cert = self._certificate(declared)
        if cert is None or cert.node_id != device_id or self.revocations.is_revoked(cert):
            return None
        return cert.public_key

    def authenticate(self, certificate: bytes, now: float) -> tuple[str, bytes]:
        """(node id, public key) of a device that may forward for this site.

        Raises:
            RemoteRequestError: 401 not a certificate of this site; 403 revoked,
                expired or without a mesh role.
        """
        self.reload()
        cert = self._certificate(certificate)
        if cert is None:
            raise RemoteRequestError(401, "the request's certificate is not one this site issued")
        if self.revocations.is_revoked(cert):
            raise RemoteRequestError(403, f"the certificate of {cert.node_id!r} is revoked")
        if now > cert.not_after:
            raise RemoteRequestError(403, f"the certificate of {cert.node_id!r} has expired")
        if not set(cert.roles) & set(MESH_ROLES):
            raise RemoteRequestError(403, f"role {list(cert.roles)} may not forward sessions")
        return cert.node_id, cert.public_key

    def add_entry(self, entry: bytes) -> dict[str, str]:
        """Keep a site-signed revocation (``POST /v1/site/entries`` on the cloud).

        Raises:
            RemoteRequestError: 400 for anything but a revocation this site signed.
        """
        try:
            key = entry_key(entry)
            Revocations().add(entry, self.public_key, expected_key=key)
        except (BadSiteEntry, Exception) as exc:
            raise RemoteRequestError(400, f"not a revocation signed by this site: {exc}") from exc
        folder = self.site_dir / SITE_ENTRIES
        folder.mkdir(exist_ok=True)
        _write_file(folder / f"{key.replace(':', '_')}.cbor", entry, secret=False)
        self.reload()
        return {"section": "revocations", "key": key}


# --------------------------------------------------------------------------
# Re-enrolment of a wiped node: a new key starts a new chain, past the old one

CHAIN_BASE = "chain.base"
"""File in a data dir: the seq after which this node's fresh event chain starts."""
CHAIN_STRIDE = 2**40
"""Seq space per key of a node: no chain gets near it (a reading a second for 30,000 years)."""


def chain_base_at_enrolment(site_dir: Path, node_id: str, public_key: bytes) -> int:
    """Where the event chain of `node_id` under `public_key` starts (its first seq is this + 1).

    0 for the first key the site certified for this node id. A wiped node re-enrolled
    under a new key would otherwise start again at seq 1, and the cloud, which checks a
    device's chain across all its sessions, would take every new event for a fork of the
    old ones and bill none of them. So the k-th key of a node id starts at k * 2**40: its
    chain cannot meet the old one, the old events keep verifying with the old
    certificate (it stays in their sessions' `devices` map), the new ones with the new.
    """
    keys: list[bytes] = []
    for cert in enrolled_certificates(site_dir):
        if cert.node_id == node_id and cert.public_key not in keys:
            keys.append(cert.public_key)
    index = keys.index(public_key) if public_key in keys else len(keys)
    return index * CHAIN_STRIDE


def write_chain_base(data_dir: Path, base: int) -> None:
    _write_file(Path(data_dir) / CHAIN_BASE, f"{base}\n".encode(), secret=False)


def read_chain_base(data_dir: Path) -> int:
    """The chain base kept in a data dir (0 when there is none)."""
    try:
        text = (Path(data_dir) / CHAIN_BASE).read_text().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise LocalSecurityError(f"{Path(data_dir) / CHAIN_BASE} is damaged: enrol the node again")
    return int(text)
