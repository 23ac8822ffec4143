"""Who may use the cloud's HTTP API: the operator's tokens, except where a route has its own proof.

The cloud takes the node's mechanism (`uplink/_apiauth.py`): two tokens in a folder,

- ``api.token``: the **operator** token (every route: reads, review decisions, site entries);
- ``api-read.token``: the **read-only** token (GET/HEAD: the ledger, sessions, conflicts,
  stats, the page's data, ``/metrics`` for Prometheus); a write with it answers 403,

sent as ``Authorization: Bearer TOKEN``; none or a wrong one answers 401 JSON. The
folder is the one holding the cloud's signing key (``--key``, by default next to the
SQLite database), so a cloud's secrets live together: ``cloud.key``, ``api.token``,
``api-read.token``, all 0600, made on the first start and kept.

Routes that need no token, and why:

- ``POST /v1/sync``: every request is signed by a certified device of the site
  (`uplink.SignedSyncRequest`, checked by the service); a token there would be one
  more secret on every node for nothing;
- ``/ocpi/...``: the OCPI party's own token (``--ocpi-token``, docs/ocpi.md);
- ``GET /healthz``: what every node's uplink probe asks, and says nothing but "up";
- ``GET /v1/issuer``: the cloud's public key, which the site hands to every node anyway;
- ``GET /`` and ``/assets/...``: the page's HTML, CSS and script, which hold no data (the
  page asks for the token and sends it with every data request, docs/operator.md).

Which clouds take tokens: one started with ``--site`` (it serves a real site; its
ready line says ``"api": "token"``). Without ``--site`` the cloud is a lab cloud, as
open for reading as it is for sync, and its ready line says so (``"api": "open"``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ._apiauth import ApiGuard, ApiTokens
from ._wire import SYNC_PATH

OPEN_PATHS = frozenset({SYNC_PATH, "/healthz", "/v1/issuer", "/"})
"""Paths answered without a token (reasons in the module docstring)."""
OPEN_PREFIXES = ("/ocpi/", "/assets/")


def needs_token(path: str) -> bool:
    """Whether a request to `path` must carry one of the cloud's tokens."""
    if path in OPEN_PATHS or path == "/ocpi" or path.startswith(OPEN_PREFIXES):
        return False
    return True


def cloud_token_dir(key_path: str | Path) -> Path:
    """The folder of the cloud's tokens: the one holding its signing key."""
    return Path(key_path).resolve().parent


def load_cloud_tokens(key_path: str | Path) -> ApiTokens:
    """The cloud's tokens beside its key, made (0600) when missing.

    Raises:
        TokenFileError: a token file is there but damaged or unreadable.
        OSError: the folder cannot be written.
    """
    return ApiTokens.load_or_create(cloud_token_dir(key_path))


def guard_cloud(app: Any, tokens: ApiTokens | None) -> None:
    """Put the token check in front of every route of the cloud's Starlette `app` but the open ones.

    With `tokens` None nothing is added (a lab cloud). Bodies are bounded by the routes
    themselves (`MAX_REQUEST_BYTES` for sync), so the guard sets no body limit.
    """
    if tokens is None:
        return
    app.add_middleware(
        ApiGuard, tokens=tokens, max_body=None, protected=needs_token, where="api.token beside cloud.key",
        realm="meshnode-cloud",
    )  # fmt: skip


class SeenRequests:
    """Signed sync requests the cloud has taken, by signature, while their timestamp is valid.

    A signed sync request (`uplink.SignedSyncRequest`) carries its time, and the cloud
    takes it only within `window` seconds of its clock (`MAX_SYNC_SKEW`). Inside that
    window, the same bytes sent again (a captured request replayed) would change no
    ledger row, document, conflict or receipt (Automerge sync applies a change once),
    but would still count as a request in the stats and metrics, reset the cloud's sync
    state for its documents (work for the real leader) and show its node as the site's
    leader, just now, on the page. So the cloud remembers each signature it took until
    the timestamp check alone would refuse it, and refuses the same signature again.
    A forwarder signs every request afresh (a new timestamp), so it never sends one twice.

    Bounded: only certified devices with valid signatures add entries (about one per
    forwarded batch); past `limit` the oldest are forgotten. Kept in memory, per process:
    several cloud instances behind one address each refuse only what they saw themselves.
    """

    def __init__(self, window: float, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._expiry: dict[bytes, float] = {}  # signature digest -> when the ts check takes over

    def __len__(self) -> int:
        return len(self._expiry)

    def first_sight(self, sig: bytes, ts: float, now: float) -> bool:
        """True the first time a valid request's signature is seen; False for a replay."""
        while self._expiry:  # oldest first (insertion order): what the clock check refuses now
            oldest = next(iter(self._expiry))
            if self._expiry[oldest] >= now:
                break
            del self._expiry[oldest]
        key = hashlib.sha256(sig).digest()
        if key in self._expiry:
            return False
        while len(self._expiry) >= self.limit:  # full: forget the oldest
            del self._expiry[next(iter(self._expiry))]
        self._expiry[key] = ts + self.window
        return True
