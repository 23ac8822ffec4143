"""`DataDirTokens`: the operator tokens of this host's services as an httpx auth, for tools.

Its own module because of httpx: the node's API guard (`uplink._apiauth`) is imported by every
node, httpx only by what sends HTTP requests (a node's uplink, the demo, tests).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import httpx

from ._apiauth import read_token_file


class DataDirTokens(httpx.Auth):
    """An httpx auth for tools that drive several services of this host (the demo, tests): the
    operator token of the node or cloud a request goes to, read from its folder on first use.

    Args:
        data_dirs: the service's address (host, or host:port) -> the folder of its api.token.
    """

    def __init__(self, data_dirs: dict[str, Path]) -> None:
        self._dirs = dict(data_dirs)
        self._tokens: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        host = request.url.host
        key = f"{host}:{request.url.port}" if f"{host}:{request.url.port}" in self._dirs else host
        if key not in self._tokens and key in self._dirs:
            token = read_token_file(self._dirs[key])
            if token:
                self._tokens[key] = token
        if key in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[key]}"
        yield request


__all__ = ["DataDirTokens"]
