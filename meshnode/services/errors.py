"""The errors of the node's services, named for what went wrong, not for a transport.

A service (sessions, site config) refuses a local user's command with one of these;
nothing has changed when it does. They carry no HTTP codes: the HTTP API maps each
kind to a status in one table (`meshnode._api.ERROR_STATUS`), the simulator logs
them, and another front end (OCPP, a CLI) can map them its own way.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a local command (API, CLI, simulator, charger) cannot be carried out.

    Attributes:
        message: what is wrong, for the user who sent the command.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    """The command names a session (or other object) this node does not hold."""


class NotAuthorised(ServiceError):
    """The offline authorisation refuses the driver (revoked, expired, unknown under "refuse")."""


class InvalidCommand(ServiceError):
    """The command itself is unacceptable: a wrong event type, a missing reading, an entry
    this node cannot verify. Sent again unchanged, it fails again."""


class Conflict(ServiceError):
    """The command is well formed but conflicts with the current state: a transition the
    session's state machine does not allow, a meter reading below the last one."""


__all__ = ["Conflict", "InvalidCommand", "NotAuthorised", "NotFound", "ServiceError"]
