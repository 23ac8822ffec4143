"""The node's services: what a local command (HTTP API, simulator, charger) can do.

- `SessionService` (sessions.py): start a session, record its events, read its state.
- `SiteConfigService` (site_config.py): signed site entries and offline authorisation.

They refuse a command with a domain error (errors.py: `NotFound`, `NotAuthorised`,
`InvalidCommand`, `Conflict`, all `ServiceError`), never with a transport's status
code; the HTTP API maps them in one table. They do no I/O of their own: the node
wires them to its replica and gives them a `commit` callback (store, then announce).
"""

from .errors import Conflict, InvalidCommand, NotAuthorised, NotFound, ServiceError
from .sessions import API_EVENT_TYPES, FoldCache, SessionService, limit_reached
from .site_config import SiteConfigService

__all__ = [
    "API_EVENT_TYPES",
    "Conflict",
    "FoldCache",
    "InvalidCommand",
    "NotAuthorised",
    "NotFound",
    "ServiceError",
    "SessionService",
    "SiteConfigService",
    "limit_reached",
]
