"""The guard in front of the node's HTTP API: operator tokens, body and nesting limits.

The mechanism is `uplink`'s (`uplink/_apiauth.py`), shared with the cloud; the node's
choices are here. Tokens (docs/security.md, "Node API"):

- ``DATA/api.token``: the **operator** token (read and write);
- ``DATA/api-read.token``: the **read-only** token (GET/HEAD only).

Both are made (0600) by `meshnode enroll` or when an enrolled node starts without them.
Every route under ``/v1`` is protected (`serve_api` wraps the whole application);
a node started with ``--insecure`` has no tokens, its API is open and it says so (its
ready line and ``/v1/status``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uplink import (
    API_READ_TOKEN,
    API_TOKEN,
    MAX_JSON_DEPTH,
    READ,
    READ_METHODS,
    WRITE,
    ApiGuard,
    ApiTokens,
    BodyTooLarge,
    TokenFileError,
    json_depth_ok,
    read_token_file,
)

if TYPE_CHECKING:
    from uplink import DataDirTokens


def __getattr__(name: str) -> Any:
    # `DataDirTokens` (for tools: the demo, tests) brings httpx, which a node does not need.
    if name == "DataDirTokens":
        import uplink

        return uplink.DataDirTokens
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "API_READ_TOKEN", "API_TOKEN", "MAX_JSON_DEPTH", "READ", "READ_METHODS", "WRITE", "ApiGuard", "ApiTokens",
    "BodyTooLarge", "DataDirTokens", "TokenFileError", "json_depth_ok", "node_guard", "read_token_file",
]  # fmt: skip


def node_guard(app: Any, tokens: ApiTokens | None, max_body: int) -> ApiGuard:
    """The node's guard: a token on every ``/v1`` route (none with ``tokens=None``), `max_body` on all."""
    return ApiGuard(app, tokens=tokens, max_body=max_body, where="DATA/api.token", realm="meshnode")
