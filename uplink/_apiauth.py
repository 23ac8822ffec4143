"""Bearer tokens and request limits for an HTTP API: the node's and the cloud's.

Both services keep two tokens in a folder (`ApiTokens`), as files:

- ``api.token``: the **operator** token (read and write), one line;
- ``api-read.token``: the **read-only** token (GET/HEAD only), one line.

Both are random (256 bits), written atomically with mode 0600 when missing, and kept;
delete a file and restart the service to rotate that token. A request carries one as
``Authorization: Bearer TOKEN`` (RFC 6750 section 2.1). A browser's ``EventSource``
cannot set headers, so a GET that asks for ``text/event-stream`` may carry it as
``?access_token=TOKEN`` (RFC 6750 section 2.3) instead; nothing else accepts a token
in the URL (URLs end up in logs and histories).

One ASGI middleware (`ApiGuard`) wraps a whole application, so every route it
protects is covered, including the ones added later: a route cannot forget to check
the token. Which paths are protected is the service's choice (`protected`): the
node protects ``/v1``; the cloud everything but its device sync route (signed), OCPI
(its own token), its health probe and its public key (`uplink._cloudauth`).

Answers: no or unknown token -> 401 JSON with ``WWW-Authenticate: Bearer``; a
read-only token on a write (any method but GET/HEAD/OPTIONS) -> 403 JSON. With no
tokens (an ``--insecure`` node, a cloud without ``--site``) the guard lets everything
through, and the service says so.

Limits, for every request whatever its route: a body longer than ``max_body`` is
refused with 413 as soon as the declared length or the bytes read so far pass it
(the body is never buffered whole first), and a JSON body nested deeper than
``MAX_JSON_DEPTH`` is refused by `json_depth_ok` before the parser sees it.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

API_TOKEN = "api.token"
"""The operator token's file in the data dir (read and write)."""
API_READ_TOKEN = "api-read.token"
"""The read-only token's file in the data dir."""
READ = "read"
WRITE = "write"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON body may have (the API's bodies are flat)."""

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{16,128}$")


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was read (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class TokenFileError(Exception):
    """A token file exists but cannot be used (damaged, unreadable)."""


def _write_secret(path: Path, text: str) -> None:
    """Write a token file atomically, mode 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_or_create(path: Path) -> str:
    if path.exists():
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read {path}: {exc}") from exc
        if not _TOKEN_RE.match(token):
            raise TokenFileError(f"{path} does not hold a token; delete it and restart the service to make a new one")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return token
    token = "mn_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_secret(path, token)
    return token


@dataclass(frozen=True)
class ApiTokens:
    """The node's two API tokens. `repr` shows neither."""

    write: str
    read: str

    def __repr__(self) -> str:
        return "ApiTokens(write=***, read=***)"

    @classmethod
    def load_or_create(cls, data_dir: Path) -> ApiTokens:
        """The tokens in `data_dir`, created (0600) when missing. Raises TokenFileError."""
        data_dir = Path(data_dir)
        return cls(_load_or_create(data_dir / API_TOKEN), _load_or_create(data_dir / API_READ_TOKEN))

    def role_of(self, token: str | None) -> str | None:
        """WRITE, READ, or None for a missing or unknown token (constant-time compares)."""
        if not token:
            return None
        given = token.encode()
        write = hmac.compare_digest(given, self.write.encode())
        read = hmac.compare_digest(given, self.read.encode())
        return WRITE if write else READ if read else None


def read_token_file(data_dir: Path, *, write: bool = True) -> str | None:
    """The token kept in a data dir (for `meshnode status` and tools on the same host), or None."""
    path = Path(data_dir) / (API_TOKEN if write else API_READ_TOKEN)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays and objects at most `limit` deep.

    A scan over the bytes that skips string contents (so brackets inside strings do
    not count); it runs before `json.loads`, whose recursion a deeply nested body
    would otherwise exhaust (a RecursionError, and a 500, for 60 KB of ``[``).
    """
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _json_error(
    status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": message}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    }
    return start, body


def _bearer(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def _header(scope: dict[str, Any], wanted: bytes) -> str:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return str(value.decode("latin-1"))
    return ""


def _query_token(scope: dict[str, Any]) -> str | None:
    """`?access_token=` for an event stream only (GET asking for text/event-stream)."""
    if scope.get("method") != "GET" or "text/event-stream" not in _header(scope, b"accept"):
        return None
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("access_token")
    return values[0] if values else None


def under_v1(path: str) -> bool:
    """The node's rule: every route under ``/v1`` is protected."""
    return path == "/v1" or path.startswith("/v1/")


class ApiGuard:
    """ASGI middleware: token check on the protected routes, body limit on every request.

    Args:
        app: the application it guards.
        tokens: the service's tokens; None leaves the API open (``--insecure``).
        max_body: largest request body in bytes; None leaves it to the routes.
        protected: which paths need a token (default: under ``/v1``).
        where: where the tokens are kept, for the 401 and 403 texts (e.g. "DATA/api.token").
        realm: the ``WWW-Authenticate`` realm.
    """

    def __init__(
        self,
        app: Any,
        *,
        tokens: ApiTokens | None,
        max_body: int | None,
        protected: Callable[[str], bool] = under_v1,
        where: str = "DATA/api.token",
        realm: str = "meshnode",
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body = max_body
        self.protected = protected
        self.where = where
        self.realm = realm

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.tokens is not None and self.protected(scope.get("path", "")):
            role = self.tokens.role_of(_bearer(scope) or _query_token(scope))
            if role is None:
                await _refuse(
                    receive,
                    send,
                    *_json_error(
                        401,
                        f"this API needs a token: Authorization: Bearer TOKEN (see {self.where})",
                        ((b"www-authenticate", f'Bearer realm="{self.realm}"'.encode()),),
                    ),
                )
                return
            if role != WRITE and scope.get("method") not in READ_METHODS:
                await _refuse(
                    receive, send, *_json_error(403, f"a read-only token cannot change anything; use {self.where}")
                )
                return
        if self.max_body is None:
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body:
            await _refuse(
                receive, send, *_json_error(413, f"request body is larger than {self.max_body} bytes"), drain=False
            )
            return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Any) -> Any:
        seen = 0
        limit = self.max_body or 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive


DRAIN_MAX = 64 * 1024
"""A refused request's body is read (and dropped) up to this many bytes before the answer."""


async def _refuse(receive: Any, send: Any, start: dict[str, Any], body: bytes, drain: bool = True) -> None:
    """Answer without the app. The request's body is read first (at most `DRAIN_MAX` bytes), so
    the connection is in step to carry the client's next request: answered before its body was
    read, the server closed the connection, and a client that had sent its next request on it
    (keep-alive) got no answer at all. A body that is longer (or not read: `drain` False) gets
    ``Connection: close``, so the client does not reuse the connection."""
    more = drain
    seen = 0
    while more and seen <= DRAIN_MAX:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        seen += len(message.get("body", b""))
        more = bool(message.get("more_body", False))
    if more or not drain:
        start = {**start, "headers": [*start["headers"], (b"connection", b"close")]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
