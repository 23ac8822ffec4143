"""Remote start and stop of a charger wherever in the mesh it is connected.

`POST /v1/chargers/{id}/start` and `POST /v1/sessions/{id}/stop` may reach any
node's API; the charger's WebSocket is held by one node (or none). The node
that takes the API request (the origin) asks; the node holding the connection
executes; nothing else happens anywhere:

- **Locally first.** If this node holds the charger's connection it sends the
  OCPP request itself (RequestStart/RequestStopTransaction in 2.0.1,
  RemoteStart/RemoteStopTransaction in 1.6) and answers with the charger's
  answer.
- **Else one hop over the mesh.** The origin posts a `CommandRequest` to
  `/m/ocpp/command` of live members (membership view, addresses included), in
  at most two waves: first the node the session or the charger was last seen
  at (`hint`: the last node that wrote to the session, or the node that
  answered for this charger last time), then every other live member at once.
  A receiving node never forwards: it executes if it holds the charger and
  answers "absent" otherwise. One hop keeps the work bounded (at most
  `MAX_TARGETS` requests, each with its own deadline) and loop-free.
- **Outcomes**, first that applies: a node answered "accepted" (the charger
  accepted); a node answered "rejected" (the charger refused: no such
  transaction, EVSE busy); every asked node answered "absent" (no reachable
  node holds the charger); else "unreachable" (some nodes did not answer in
  time, so the charger may be behind them).

On an enrolled site the route is sealed like every other `/m` route (the
transport wraps it: only site members' requests are opened, and `from` must be
the node whose certificate signed the request). On an unenrolled (`--insecure`)
node it is as open as the HTTP API itself.

A charger connected to two nodes at once (a half-open socket on the old one
after a failover) can be asked twice: a remote stop is idempotent at the
charger (the second is "rejected": no such running transaction), and a remote
start is accepted by at most one connection, the live one; the transaction it
starts is recorded by the bridge like any other.

`CommandRouting` below decides who is asked and what the outcome is; it does no
I/O and reads no clock. The few lines of I/O live in `RemoteCommands` at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cbor2
import trio

log = logging.getLogger("meshnode.ocpp.remote")

RESOURCE = "/m/ocpp/command"
MAX_TARGETS = 32
"""Members asked for one command (a site has a few dozen nodes)."""
REQUEST_TIMEOUT = 10.0
"""Deadline of one request to one node: it covers the holder's OCPP round trip to
the charger (which has its own, shorter, deadline: `CHARGER_TIMEOUT`)."""
CHARGER_TIMEOUT = 8.0
"""Seconds a charger has to answer a remote start or stop."""
MAX_TEXT = 128
MAX_URL = 256
MAX_SLOT = 15
"""Highest network-profile slot a command may set (stations have a few)."""
MAX_PAYLOAD = 2048

Outcome = Literal["accepted", "rejected", "absent", "unreachable"]
Kind = Literal["start", "stop", "profile"]


class CommandError(Exception):
    """A command request from a peer does not parse (answered 4.00)."""


@dataclass(frozen=True)
class Command:
    """What the origin wants done to a charger.

    `start`: `id_token` (and an optional `evse`, None: the charger chooses).
    `stop`: `transaction_id` (the charger's own id as OCPP names it: 2.0.1's
    string, 1.6's integer as text) and the session it belongs to.
    `profile` (2.0.1 only): SetNetworkProfile, `url` of another central system (node)
    in connection `slot`.
    """

    kind: Kind
    charger: str
    id_token: str | None = None
    evse: int | None = None
    transaction_id: str | None = None
    session_id: str | None = None
    slot: int | None = None
    url: str | None = None


@dataclass(frozen=True)
class CommandRequest:
    sender: str
    command: Command

    def encode(self) -> bytes:
        c = self.command
        body: dict[str, Any] = {"from": self.sender, "kind": c.kind, "cp": c.charger}
        fields = (
            ("tok", c.id_token), ("evse", c.evse), ("tx", c.transaction_id), ("sid", c.session_id),
            ("slot", c.slot), ("url", c.url),
        )  # fmt: skip
        for key, value in fields:
            if value is not None:
                body[key] = value
        return cbor2.dumps(body)

    @classmethod
    def decode(cls, payload: bytes) -> CommandRequest:
        if len(payload) > MAX_PAYLOAD:
            raise CommandError(f"command larger than {MAX_PAYLOAD} bytes")
        try:
            obj = cbor2.loads(payload)
        except Exception as exc:  # cbor2 raises several error types for bad input
            raise CommandError(f"command is not valid CBOR ({exc})") from exc
        if not isinstance(obj, dict):
            raise CommandError("command must be a CBOR map")
        kind = obj.get("kind")
        if kind not in ("start", "stop", "profile"):
            raise CommandError("command kind must be 'start', 'stop' or 'profile'")
        slot = obj.get("slot")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_SLOT):
            raise CommandError(f"command slot must be an integer from 0 to {MAX_SLOT}")
        evse = obj.get("evse")
        if evse is not None and (not isinstance(evse, int) or isinstance(evse, bool) or not 0 < evse <= 1000):
            raise CommandError("command evse must be an integer from 1 to 1000")
        command = Command(
            kind=kind,
            charger=_text(obj.get("cp"), "cp"),
            id_token=_text(obj.get("tok"), "tok", optional=True),
            evse=evse,
            transaction_id=_text(obj.get("tx"), "tx", optional=True),
            session_id=_text(obj.get("sid"), "sid", optional=True),
            slot=slot,
            url=check_url(obj.get("url"), optional=True),
        )
        if kind == "start" and command.id_token is None:
            raise CommandError("a start command needs tok (the id token)")
        if kind == "stop" and command.transaction_id is None:
            raise CommandError("a stop command needs tx (the transaction id)")
        if kind == "profile" and (command.slot is None or command.url is None):
            raise CommandError("a profile command needs slot and url")
        return cls(_text(obj.get("from"), "from"), command)


@dataclass(frozen=True)
class CommandReply:
    outcome: Outcome
    node: str
    detail: str = ""
    transaction_id: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"outcome": self.outcome, "node": self.node, "detail": self.detail[:200]}
        if self.transaction_id is not None:
            body["tx"] = self.transaction_id
        return cbor2.dumps(body)

    @classmethod
    def decode(cls, payload: bytes) -> CommandReply:
        try:
            obj = cbor2.loads(payload)
        except Exception as exc:
            raise CommandError(f"reply is not valid CBOR ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("outcome") not in ("accepted", "rejected", "absent"):
            raise CommandError("reply must be a map with outcome accepted, rejected or absent")
        detail = obj.get("detail", "")
        return cls(
            outcome=obj["outcome"],
            node=_text(obj.get("node"), "node"),
            detail=detail[:200] if isinstance(detail, str) else "",
            transaction_id=_text(obj.get("tx"), "tx", optional=True),
        )


def check_url(value: Any, *, optional: bool = False) -> Any:
    """A central system's URL for a network profile: ws:// or wss://, printable, bounded."""
    if value is None and optional:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_URL
        or not value.isprintable()
        or " " in value
        or not value.startswith(("ws://", "wss://"))
    ):
        raise CommandError(f"url must be a ws:// or wss:// URL of at most {MAX_URL} characters")
    return value


def _text(value: Any, what: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise CommandError(f"{what} must be a printable string of 1 to {MAX_TEXT} characters")
    return value


# --- the decision: whom to ask, and what the answers mean ---------------------------------


@dataclass
class CommandRouting:
    """Whom one command is sent to, in waves, and its outcome (sans-IO).

    Rules:
      1. Only live members other than ourselves are asked, at most `max_targets`,
         in a fixed order (hint first, then by node id), each at most once.
      2. Wave 1 is the hint alone (when it is a live member); wave 2 is every other
         target at once. A wave is sent only when the previous one has all answered
         (or failed) without a decisive answer.
      3. An "accepted" answer decides at once; then "rejected". "absent" from every
         target means no reachable node holds the charger; any failure among them
         makes it "unreachable" instead (it may be behind the silent one).
    """

    targets: list[tuple[str, str]]
    """(node id, address) in the order asked."""
    hint: str | None = None
    replies: dict[str, CommandReply] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    _sent: int = 0

    @classmethod
    def plan(
        cls,
        self_id: str,
        members: Iterable[tuple[str, str]],
        hint: str | None = None,
        max_targets: int = MAX_TARGETS,
    ) -> CommandRouting:
        live = {nid: addr for nid, addr in members if nid != self_id and addr}
        order = sorted(live, key=lambda nid: (nid != hint, nid))[:max_targets]
        return cls([(nid, live[nid]) for nid in order], hint if hint in live else None)

    def next_wave(self) -> list[tuple[str, str]]:
        """The targets to ask now (empty when decided or nobody is left)."""
        if self.decided() is not None or self._pending():
            return []
        if self._sent == 0 and self.hint is not None:
            wave = self.targets[:1]
        else:
            wave = self.targets[self._sent :]
        self._sent += len(wave)
        return wave

    def _pending(self) -> bool:
        asked = [nid for nid, _ in self.targets[: self._sent]]
        return any(nid not in self.replies and nid not in self.failed for nid in asked)

    def on_reply(self, reply_from: str, reply: CommandReply) -> None:
        self.replies[reply_from] = reply

    def on_failure(self, node_id: str) -> None:
        self.failed.add(node_id)

    def decided(self) -> CommandReply | None:
        """The decisive answer so far, if any (rule 3, first two cases)."""
        for outcome in ("accepted", "rejected"):
            for nid, _ in self.targets:
                r = self.replies.get(nid)
                if r is not None and r.outcome == outcome:
                    return r
        return None

    def outcome(self, self_id: str) -> CommandReply:
        """The final answer once no wave is left (rule 3)."""
        decided = self.decided()
        if decided is not None:
            return decided
        if self.failed:
            names = ", ".join(sorted(self.failed))
            return CommandReply("unreachable", self_id, f"no answer from {names}: the charger may be connected there")
        asked = len(self.targets)
        return CommandReply("absent", self_id, f"not connected to this node nor to any of {asked} reachable members")


# --- I/O: the route and the origin's loop ---------------------------------------------------

Execute = Callable[[Command], Awaitable[CommandReply | None]]
"""Carry out a command on a charger connected to this node; None when it is not."""
SendRequest = Callable[[str, str, bytes], Awaitable[bytes]]
"""Send a request to an address and resource, return the answer (raises on failure)."""


class RemoteCommands:
    """Carries out remote commands for one node: locally, else over the mesh.

    Args:
        node_id: this node.
        execute: the local executor (the OCPP server's connections).
        request: the mesh transport's request (sealed on an enrolled site).
        members: the live members, (node id, address), right now.
        check_sender: raises when a sealed request's `from` is not its signer.
    """

    def __init__(
        self,
        node_id: str,
        execute: Execute,
        request: SendRequest,
        members: Callable[[], Sequence[tuple[str, str]]],
        check_sender: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.node_id = node_id
        self._execute = execute
        self._request = request
        self._members = members
        self._check_sender = check_sender
        self.last_seen: dict[str, str] = {}
        """Charger id -> the node that answered for it last (a hint, bounded below)."""
        self.counters = {"local": 0, "forwarded": 0, "served": 0, "refused": 0}

    async def run(self, command: Command, hint: str | None = None) -> CommandReply:
        """Carry out `command` wherever its charger is connected."""
        local = await self._execute(command)
        if local is not None:
            self.counters["local"] += 1
            return local
        routing = CommandRouting.plan(self.node_id, self._members(), hint or self.last_seen.get(command.charger))
        payload = CommandRequest(self.node_id, command).encode()
        while wave := routing.next_wave():
            self.counters["forwarded"] += len(wave)
            async with trio.open_nursery() as nursery:
                for nid, address in wave:
                    nursery.start_soon(self._ask, routing, nid, address, payload)
        result = routing.outcome(self.node_id)
        if result.outcome in ("accepted", "rejected"):
            if len(self.last_seen) >= 4096:
                self.last_seen.clear()
            self.last_seen[command.charger] = result.node
        return result

    async def _ask(self, routing: CommandRouting, nid: str, address: str, payload: bytes) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT + 1.0):
                reply = CommandReply.decode(await self._request(address, RESOURCE, payload))
        except Exception as exc:  # noqa: BLE001 - any failure of one peer is that peer's "no answer"
            log.info("remote command to %s at %s failed: %r", nid, address, exc)
            routing.on_failure(nid)
            return
        routing.on_reply(nid, reply)

    async def serve_request(self, payload: bytes, remote: str) -> bytes:
        """The `/m/ocpp/command` handler: execute here or answer "absent"; never forward."""
        try:
            request = CommandRequest.decode(payload)
        except CommandError as exc:
            self.counters["refused"] += 1
            from .._transport import BadRequest

            raise BadRequest(str(exc)) from exc
        self._check_sender(request.sender)
        self.counters["served"] += 1
        reply = await self._execute(request.command)
        return (reply or CommandReply("absent", self.node_id, "charger not connected here")).encode()


def members_of(view: Iterable[Any]) -> list[tuple[str, str]]:
    """(node id, address) of member records (`MemberRecord`)."""
    return [(r.node_id, r.address) for r in view]


# --- this node's side: the charger connections, the node, the HTTP routes --------------------


def transaction_of(data: Any) -> tuple[str | None, int | None]:
    """(2.0.1 transaction id, 1.6 integer id) a session's OCPP start recorded, from its
    `crdt.SessionData` (the start event's ``data.ocpp``, written by the bridge)."""
    from crdt import decode_event

    for blob in data.events.values():
        try:
            body, _ = decode_event(blob)
        except Exception:  # noqa: BLE001 - an unreadable event is not the start we look for
            continue
        ocpp = (body.get("data") or {}).get("ocpp") if body.get("type") == "start" else None
        if isinstance(ocpp, dict):
            ref, txid = ocpp.get("transaction_ref"), ocpp.get("transaction_id")
            return (ref if isinstance(ref, str) else None, txid if isinstance(txid, int) else None)
    return None, None


def last_writer(view: Any) -> str | None:
    """The device that wrote a session's newest event: the node its charger spoke to last."""
    return view.applied[-1].record.device_id if getattr(view, "applied", None) else None


class ConnectionExecutor:
    """Carries a command out on a charger connected to this node (`OcppServer`), per version."""

    def __init__(self, node_id: str, server: Callable[[], Any]) -> None:
        self.node_id = node_id
        self._server = server

    async def __call__(self, command: Command) -> CommandReply | None:
        server = self._server()
        handler = server.handlers.get(command.charger) if server is not None else None
        if handler is None:
            return None
        # A charger is connected here: its version's module is loaded already (not the other's).
        from ocpp.exceptions import OCPPError

        from ._server import ChargerNotConnected

        v201 = getattr(handler, "_ocpp_version", "") == "2.0.1"
        if v201:
            from ._v201 import V201Commands, remote_start_id
        else:
            from ._v16 import V16Commands
        try:
            with trio.fail_after(CHARGER_TIMEOUT + 0.5):
                if command.kind == "start":
                    assert command.id_token is not None
                    if v201:
                        rid = remote_start_id(command.charger, command.id_token, f"{trio.current_time()!r}")
                        status, tx = await V201Commands(server).request_start(
                            command.charger, command.id_token, command.evse, remote_id=rid, timeout=CHARGER_TIMEOUT
                        )
                    else:
                        status, tx = (
                            await V16Commands(server).remote_start(command.charger, command.id_token, command.evse),
                            None,
                        )
                elif command.kind == "profile":
                    assert command.slot is not None and command.url is not None
                    if not v201:
                        return CommandReply(
                            "rejected", self.node_id, "OCPP 1.6 has no network profiles: give the charger several URLs"
                        )
                    status, tx = (
                        await V201Commands(server).set_network_profile(command.charger, command.slot, command.url),
                        None,
                    )
                else:
                    assert command.transaction_id is not None
                    if v201:
                        status = await V201Commands(server).request_stop(
                            command.charger, command.transaction_id, timeout=CHARGER_TIMEOUT
                        )
                    else:
                        try:
                            txid = int(command.transaction_id)
                        except ValueError:
                            return CommandReply("rejected", self.node_id, "not a 1.6 transaction id")
                        status = await V16Commands(server).remote_stop(command.charger, txid)
                    tx = None
        except ChargerNotConnected:
            return None
        except (TimeoutError, trio.TooSlowError):
            return CommandReply("rejected", self.node_id, f"the charger did not answer within {CHARGER_TIMEOUT:g} s")
        except OCPPError as exc:
            return CommandReply("rejected", self.node_id, f"the charger answered {exc.code}")
        outcome: Outcome = "accepted" if status == "Accepted" else "rejected"
        return CommandReply(outcome, self.node_id, f"charger answered {status}", tx)


def install(node: Any) -> RemoteCommands:
    """Give a `Node` its remote commands: the `/m/ocpp/command` route on its transport
    (sealed there on an enrolled site) and `node.remote_commands` for the HTTP API."""

    def members() -> list[tuple[str, str]]:
        if node.membership is None:
            return []
        return members_of(node.membership.live_peers(node.now()))

    async def request(address: str, resource: str, payload: bytes) -> bytes:
        return bytes(await node.transport.request(address, resource, payload, timeout=REQUEST_TIMEOUT))

    remote = RemoteCommands(
        node.node_id,
        ConnectionExecutor(node.node_id, lambda: getattr(node, "ocpp", None)),
        request,
        members,
        check_sender=node._check_sender,
    )

    async def handler(payload: bytes, remote_address: str) -> bytes:
        node._check_ready()
        return await remote.serve_request(payload, remote_address)

    node.transport.route(RESOURCE, handler)
    return remote


HTTP_STATUS: dict[str, int] = {"accepted": 202, "rejected": 409, "absent": 404, "unreachable": 504}
"""The HTTP status of each outcome of a remote command."""


def http_routes(node: Any) -> list[Any]:
    """The node API's remote-command routes (Starlette):

        POST /v1/chargers/{charger_id}/start   {"id_token", "evse"?} -> 202 {"outcome", "node", ...}
        POST /v1/sessions/{session_id}/stop    {}                    -> 202 {"outcome", "node", ...}
        POST /v1/chargers/{charger_id}/network-profile  {"slot", "url"} -> 202 (2.0.1 SetNetworkProfile)

    202 means the charger accepted (the session starts or stops when it sends its
    TransactionEvent / Start/StopTransaction, as any session does); 409 the charger
    refused, 404 no reachable node holds the charger (or no such session), 504 some
    node that may hold it did not answer.
    """
    import json

    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def body_of(request: HttpRequest) -> dict[str, Any] | Response:
        raw = await request.body()
        if len(raw) > MAX_PAYLOAD:
            return JSONResponse({"error": f"request body is larger than {MAX_PAYLOAD} bytes"}, status_code=413)
        if not raw.strip():
            return {}
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "request body is not valid JSON"}, status_code=400)
        if not isinstance(obj, dict):
            return JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
        return obj

    def answer(reply: CommandReply, **extra: Any) -> Response:
        body: dict[str, Any] = {"outcome": reply.outcome, "node": reply.node, "detail": reply.detail, **extra}
        if reply.transaction_id is not None:
            body["transaction_id"] = reply.transaction_id
        if reply.outcome != "accepted":
            body["error"] = reply.detail
        return JSONResponse(body, status_code=HTTP_STATUS[reply.outcome])

    def bad(message: str, status: int = 400) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    async def start(request: HttpRequest) -> Response:
        obj = await body_of(request)
        if isinstance(obj, Response):
            return obj
        charger = request.path_params["charger_id"]
        token, evse = obj.get("id_token"), obj.get("evse")
        try:
            _text(charger, "charger id")
            _text(token, "'id_token'")
        except CommandError as exc:
            return bad(str(exc))
        if evse is not None and (not isinstance(evse, int) or isinstance(evse, bool) or not 0 < evse <= 1000):
            return bad("'evse' must be an integer from 1 to 1000")
        reply = await node.remote_commands.run(Command("start", charger, id_token=token, evse=evse))
        return answer(reply, charger=charger)

    async def profile(request: HttpRequest) -> Response:
        obj = await body_of(request)
        if isinstance(obj, Response):
            return obj
        charger, slot = request.path_params["charger_id"], obj.get("slot")
        try:
            _text(charger, "charger id")
            url = check_url(obj.get("url"))
        except CommandError as exc:
            return bad(str(exc))
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_SLOT:
            return bad(f"'slot' must be an integer from 0 to {MAX_SLOT}")
        reply = await node.remote_commands.run(Command("profile", charger, slot=slot, url=url))
        return answer(reply, charger=charger)

    async def stop(request: HttpRequest) -> Response:
        obj = await body_of(request)
        if isinstance(obj, Response):
            return obj
        session_id = request.path_params["session_id"]
        try:
            data, view = node.sessions.fold(session_id)
        except Exception:  # KeyError (no such document), DocumentError (not a session)
            return bad(f"no session {session_id!r} on this node", 404)
        if view.state in ("completed", "reconciled"):
            return bad(f"session {session_id} is {view.state} already", 409)
        ref, txid = transaction_of(data)
        tx = ref if ref is not None else (str(txid) if txid is not None else None)
        if tx is None:
            return bad(f"session {session_id} was not started by a charger over OCPP: stop it with its events", 409)
        command = Command("stop", data.charger, transaction_id=tx, session_id=session_id)
        reply = await node.remote_commands.run(command, hint=last_writer(view))
        return answer(reply, session_id=session_id, charger=data.charger)

    return [
        Route("/v1/chargers/{charger_id}/start", start, methods=["POST"]),
        Route("/v1/sessions/{session_id}/stop", stop, methods=["POST"]),
        Route("/v1/chargers/{charger_id}/network-profile", profile, methods=["POST"]),
    ]


__all__ = [
    "CHARGER_TIMEOUT",
    "ConnectionExecutor",
    "HTTP_STATUS",
    "Command",
    "CommandError",
    "CommandReply",
    "CommandRequest",
    "CommandRouting",
    "RESOURCE",
    "RemoteCommands",
    "http_routes",
    "install",
    "last_writer",
    "members_of",
    "transaction_of",
]
