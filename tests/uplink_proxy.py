"""Small TCP proxies for end-to-end tests: an uplink they cut and restore, and a tap on a node's API.

Each uplink node's `--cloud-url` points at its own proxy, which forwards to the
cloud service. Two ways to cut it:

- `cut()` (reset): the link fails loudly. Every open connection is reset and new
  ones are reset as soon as they are accepted, so the client sees errors at once.
- `cut(silent=True)` (blackhole): the link goes quiet, as a 4G link often does.
  Connections stay open but nothing gets through either way: bytes are read and
  dropped, new connections are accepted and never answered, so the client only
  learns from its own timeouts.

`restore()` lets connections through again; connections that lost bytes or were
held during a silent cut are reset then (their HTTP exchange is broken anyway).
The listening socket stays bound throughout, so nobody else takes its port. When
the cloud itself is down, a new connection through the proxy is reset.

Plain threads and blocking sockets: the proxy must keep working while the test's
main thread sleeps or polls, and it carries a few requests a second.
"""

from __future__ import annotations

import socket
import struct
import threading


def _reset(sock: socket.socket) -> None:
    """Make a connection fail as a broken link does: RST on close, and wake blocked readers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reset_and_close(sock: socket.socket) -> None:
    _reset(sock)
    sock.close()


def _listen(host: str) -> socket.socket:
    """A TCP listener on a free port of `host`."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(64)
    return listener


class UplinkProxy:
    """Forward TCP from `listen_host` (a port the kernel picks) to `target`.

    Attributes:
        port: the port it listens on.
        url: ``http://listen_host:port``, for `meshnode run --cloud-url`.
        connections: connections forwarded so far.
        refused: connections reset because the uplink was cut or the cloud was down.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = _listen(listen_host)
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._tainted: set[socket.socket] = set()  # lost bytes during a silent cut
        self._held: list[socket.socket] = []  # accepted during a silent cut
        self._up = True
        self._silent = False
        self._closed = False
        self.connections = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._up

    def cut(self, *, silent: bool = False) -> None:
        """The uplink fails: loudly (resets) or, with `silent`, by dropping everything."""
        with self._lock:
            self._up, self._silent = False, silent
            if silent:
                self._tainted |= self._open
                return
            sockets, self._open = list(self._open), set()
        for s in sockets:
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self._up, self._silent = True, False
            broken, self._tainted = list(self._tainted), set()
            held, self._held = self._held, []
            self._open -= set(broken)
        for s in broken:
            _reset(s)
        for s in held:
            _reset_and_close(s)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.restore()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)

    # --- internals ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._up:
                    self.refused += 1
                    if self._silent:
                        self._held.append(client)
                    else:
                        _reset_and_close(client)
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                self.refused += 1  # the cloud is down
                _reset_and_close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
                self.connections += 1
            done = threading.Semaphore(0)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._silent:
                    continue  # the link is down: the bytes are lost
                dst.sendall(data)
        except OSError:
            pass
        # One direction ended: end the other one too; the second pump to finish closes both.
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if done.acquire(blocking=False):
            with self._lock:
                for s in (src, dst):
                    self._open.discard(s)
                    self._tainted.discard(s)
            src.close()
            dst.close()
        else:
            done.release()


class ApiTap:
    """A TCP relay in front of a node's HTTP API that can hold back one answer.

    End-to-end tests send a node's API requests through it. `arm(marker)` makes
    the next request whose request line contains `marker` go through to the node
    as usual, but the node's answer is kept here, not passed on: `wait_held()`
    returns once the answer has started to arrive (the node has handled the
    request, the client has not heard back). A test that SIGKILLs the node then
    is certain to have landed the kill with the request in flight, and knows
    what the node answered (`held_response`). When either side closes, the
    client's connection is reset: it never sees the held answer.

    Attributes:
        url: ``http://listen_host:port``, to use instead of the node's own URL.
        held_request_line: the request line of the held exchange.
        held_response: the bytes of the answer held back.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = _listen(listen_host)
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._held = threading.Event()
        self.held_request_line = b""
        self.held_response = b""
        self._closed = False
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept_loop, name=f"tap-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def arm(self, marker: bytes) -> None:
        """Hold the answer to the next request whose request line contains `marker`."""
        with self._lock:
            self._marker = marker
            self._held.clear()
            self.held_request_line = self.held_response = b""

    def wait_held(self, timeout: float) -> bool:
        """Until an answer is held (True), or `timeout` seconds (False)."""
        return self._held.wait(timeout)

    def held_answer(self) -> tuple[int, bytes] | None:
        """(status, body) of the held answer once it has all arrived (by its Content-Length), else None."""
        with self._lock:
            data = self.held_response
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        length = next(
            (int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.strip().lower() == b"content-length"),
            None,
        )
        if length is None or len(body) < length:
            return None
        return int(lines[0].split()[1]), body[:length]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sockets, self._open = list(self._open), set()
        for s in sockets:
            _reset(s)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
                upstream.settimeout(None)
            except OSError:
                _reset_and_close(client)  # the node is down
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._connection, args=(client, upstream), daemon=True).start()

    def _connection(self, client: socket.socket, upstream: socket.socket) -> None:
        hold = threading.Event()
        answer = threading.Thread(target=self._answers, args=(upstream, client, hold), daemon=True)
        answer.start()
        first = True
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    upstream.shutdown(socket.SHUT_WR)  # pass the client's end of request on
                    break
                if first:
                    first = False
                    line = data.split(b"\r\n", 1)[0]
                    with self._lock:
                        if self._marker is not None and self._marker in line:
                            self._marker = None
                            self.held_request_line = line
                            hold.set()
                upstream.sendall(data)
        except OSError:
            pass
        answer.join()
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)
        if hold.is_set():
            _reset_and_close(client)  # the client never hears the held answer
        else:
            client.close()
        upstream.close()

    def _answers(self, upstream: socket.socket, client: socket.socket, hold: threading.Event) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if hold.is_set():
                    with self._lock:
                        self.held_response += data
                    self._held.set()
                    continue
                client.sendall(data)
        except OSError:
            pass
        if hold.is_set():
            _reset(client)  # wakes the request side, which closes both
        else:
            try:
                client.shutdown(socket.SHUT_WR)  # a plain end of the answer
            except OSError:
                pass
