"""Uplink probe and score: how well this node reaches the cloud, as a number from 0 to 100.

The score is what the election compares (``meshnode/_membership.py``: threshold 50,
buckets and stickiness margin of 20 points, which assume a node's score wobbles by
no more than about ±9 points while its link is healthy). Three parts:

- `UplinkScorer` (sans-IO): turns probe outcomes into the score. Time comes in as
  ``now``; it reads no clock and does no I/O.
- `CloudClient` (thin I/O): the HTTP client for the cloud's ``GET /healthz`` and
  ``POST /v1/sync`` (`uplink._wire`). It translates httpx errors into `UplinkError`
  subclasses with ``raise ... from exc``, split by what went wrong: the cloud said
  no (`CloudRefused`), the network broke (`CloudUnreachable`), the time ran out
  (`CloudTimeout`), or the cloud answered with something unreadable
  (`CloudBadResponse`, which is also a `WireError`).
- `serve_probe`: the trio task that probes every few seconds and publishes the score.

The score formula (and why)
---------------------------

::

    score = round(100 * S * L(srtt))            while the link counts as up
    score = 0                                   after `fail_limit` failures in a row, or when
                                                no probe has succeeded for `stale_after` seconds

    S    = EWMA of probe success (1 or 0), weight `alpha` = 0.08, seeded by the first probe
    srtt = EWMA of successful round-trip times, weight 1/8 (RFC 6298 section 2), seeded by the first
    L(r) = 1.0 for r <= 0.15 s; then linear down to 0.5 at r = 2.0 s; 0.5 beyond

- **Outages are a cut, not an average.** A link that is down is worthless now, so
  three failures in a row (about 15 s at the 5 s probe interval) give 0 at once
  rather than letting an average drift down. While the cut holds, failures stop
  lowering S: S measures how *flaky* the link is while it is up, so a link that
  comes back after a long outage scores about what it scored before it (one
  probe), instead of crawling up from zero for a minute.
- **A lost probe on a good link is not a handover.** ``alpha = 0.08``: one isolated
  failure costs 8 points, inside the ±9 band the election assumes, so a leader
  with a good link does not lose the role to a challenger over one lost probe. A
  link that keeps losing probes still sinks: at 50 % loss S settles near 0.5, and
  a link that flaps (up one probe, down three) scores under 30 even while it is up,
  well below the threshold.
- **Latency matters less than working.** A slow 4G link that works is worth far
  more than none, so latency at most halves the score (``L >= 0.5``) and never
  pushes a working link below the threshold on its own. Below 150 ms a human
  cannot tell and a sync batch is bound by bandwidth, so ``L = 1``.
- **Jitter stays small.** L is linear in the RTT with a slope of 0.5 / 1.85 s, about
  27 points per second, and it sees the smoothed RTT, which always lies within
  the range of the samples it averaged. So if a healthy link's RTT stays within
  ±j of some base value, its score stays within ``27 * j + 0.5`` points of the
  score at that base: ±300 ms of jitter moves it at most ±8.6 points, whatever
  the order of the samples (property-tested in ``tests/test_uplink_probe.py``).
  A log-shaped curve would have been steeper at low RTT (±100 ms around 200 ms
  would already move it ±10 points), which is why the curve is linear.
- **Silence is not health.** If probing stops (the task died, the clock jumped),
  ``score(now)`` falls to 0 after `stale_after` (20 s: four probe intervals), so a
  node never keeps advertising an uplink it has stopped checking.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ._wire import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    MAX_INFLATED,
    SYNC_PATH,
    CloudSyncRequest,
    CloudSyncResponse,
    WireError,
    compress,
    decompress,
)

if TYPE_CHECKING:
    import httpx

# httpx is imported when a `CloudClient` is made: a node without an uplink never loads it (with
# the command-line tools httpx brings when they are installed, rich and click, ~7 MB of memory).

log = logging.getLogger("uplink.probe")

HEALTH_PATH = "/healthz"
DEFAULT_PROBE_INTERVAL = 5.0
DEFAULT_PROBE_TIMEOUT = 2.0
MAX_ERROR_TEXT = 300
"""Characters of a refusal's text that we keep (it ends up in logs and on the status page)."""
MAX_HEALTH_BODY = 64 * 1024


# --- errors ----------------------------------------------------------------------------


class UplinkError(Exception):
    """Base of the errors the cloud client raises: the cloud could not be used this time."""


class CloudUnreachable(UplinkError):
    """The network broke it: no connection, connection reset, DNS failure, protocol error."""


class CloudTimeout(UplinkError):
    """No complete answer within the time allowed (the cloud or the path is too slow)."""


class CloudRefused(UplinkError):
    """The cloud answered with an HTTP error status (4xx: it blames us; 5xx: itself).

    Attributes:
        status: the HTTP status code.
        message: the cloud's error text (from its JSON body when it sent one).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"cloud refused with HTTP {status}: {message}")
        self.status = status
        self.message = message


class CloudBadResponse(WireError, UplinkError):
    """The cloud answered 2xx with a body that is not a valid sync response.

    It is a `WireError` (what the wire format raises for bad bodies) and an
    `UplinkError` (so one ``except UplinkError`` covers every way a sync can fail).
    """


# --- the score --------------------------------------------------------------------------


def latency_factor(rtt: float) -> float:
    """1.0 up to 150 ms, falling linearly to 0.5 at 2 s, and 0.5 beyond (see module docstring)."""
    if rtt <= UplinkScorer.FAST_RTT:
        return 1.0
    if rtt >= UplinkScorer.SLOW_RTT:
        return 0.5
    return 1.0 - 0.5 * (rtt - UplinkScorer.FAST_RTT) / (UplinkScorer.SLOW_RTT - UplinkScorer.FAST_RTT)


class UplinkScorer:
    """Turns probe outcomes into a 0-100 uplink score (sans-IO; the formula is in the module docstring).

    Args:
        alpha: weight of the newest probe in the success average S.
        fail_limit: failures in a row after which the score is 0.
        stale_after: seconds without a successful probe after which the score is 0.
    """

    FAST_RTT = 0.15
    SLOW_RTT = 2.0
    RTT_WEIGHT = 0.125

    def __init__(self, *, alpha: float = 0.08, fail_limit: int = 3, stale_after: float = 20.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if fail_limit < 1:
            raise ValueError("fail_limit must be at least 1")
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.alpha = alpha
        self.fail_limit = fail_limit
        self.stale_after = stale_after
        self._success: float | None = None
        self._srtt: float | None = None
        self._failures_in_row = 0
        self._last_success: float | None = None

    @property
    def srtt(self) -> float | None:
        """The smoothed round-trip time in seconds, or None before the first timed success."""
        return self._srtt

    @property
    def failures_in_row(self) -> int:
        return self._failures_in_row

    def observe(self, ok: bool, rtt: float | None, now: float) -> int:
        """Record one probe's outcome and return the score at `now`.

        Args:
            ok: whether the probe got a healthy answer.
            rtt: its round-trip time in seconds (ignored when `ok` is false; a
                success without a time leaves the smoothed RTT as it was).
            now: when the probe finished, on the caller's clock.
        """
        if ok:
            self._failures_in_row = 0
            self._last_success = now
            self._success = 1.0 if self._success is None else self._success + self.alpha * (1.0 - self._success)
            if rtt is not None and math.isfinite(rtt) and rtt >= 0.0:
                self._srtt = rtt if self._srtt is None else self._srtt + self.RTT_WEIGHT * (rtt - self._srtt)
        else:
            self._failures_in_row += 1
            # During an outage (the cut holds) S stays as it was: see "Outages are a cut".
            if self._failures_in_row <= self.fail_limit:
                self._success = 0.0 if self._success is None else self._success * (1.0 - self.alpha)
        return self.score(now)

    def score(self, now: float) -> int:
        """The score at `now`: 0 during an outage or when the last success is too old."""
        if self._failures_in_row >= self.fail_limit or self._last_success is None:
            return 0
        if now - self._last_success > self.stale_after:
            return 0
        assert self._success is not None
        factor = 1.0 if self._srtt is None else latency_factor(self._srtt)
        return max(0, min(100, math.floor(100.0 * self._success * factor + 0.5)))


# --- the HTTP client --------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    decoded: bool = False  # httpx has already undone the content encoding


class CloudClient:
    """HTTP client for the cloud reconciliation service at `base_url` (thin; no decisions).

    Args:
        base_url: e.g. ``https://cloud.example.net``; paths come from `uplink._wire`.
        client: an `httpx.AsyncClient` to use. The caller keeps ownership of it
            (`aclose` leaves it open). Tests pass one with ``httpx.MockTransport``.
        transport: used to build our own client when `client` is not given.
        max_response: largest response body (compressed or not) we read.
        clock: the time source for round-trip times; ``trio.current_time`` so
            that a simulator's ``MockClock`` drives it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response: int = MAX_INFLATED,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._owned = client is None
        self._client = client if client is not None else httpx.AsyncClient(transport=transport)
        self._max_response = max_response
        self._clock = clock

    async def aclose(self) -> None:
        """Close the HTTP client if we created it."""
        if self._owned:
            await self._client.aclose()

    async def probe(self, timeout: float = DEFAULT_PROBE_TIMEOUT) -> float:
        """GET /healthz. Returns the round-trip time in seconds.

        Raises:
            CloudRefused: the service answered with an error status (e.g. 503 while it
                cannot reach its ledger).
            CloudUnreachable, CloudTimeout: no answer.
        """
        start = self._clock()
        reply = await self._request("GET", HEALTH_PATH, timeout, headers={}, content=None, limit=MAX_HEALTH_BODY)
        rtt = self._clock() - start
        if not 200 <= reply.status < 300:
            raise CloudRefused(reply.status, _error_text(reply))
        return max(0.0, rtt)

    async def sync(self, request: CloudSyncRequest, timeout: float) -> tuple[CloudSyncResponse, int]:
        """POST one sync batch. Returns the decoded response and the request body's size on the wire.

        Raises:
            CloudRefused: 4xx/5xx, with the cloud's error text.
            CloudUnreachable, CloudTimeout: the batch may or may not have been applied;
                re-sending it is safe (Automerge sync is idempotent).
            CloudBadResponse: a 2xx whose body is not a valid sync response.
        """
        body = compress(request.encode())
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Content-Encoding": CONTENT_ENCODING,
            "Accept-Encoding": CONTENT_ENCODING,
        }
        reply = await self._request("POST", SYNC_PATH, timeout, headers=headers, content=body, limit=self._max_response)
        if not 200 <= reply.status < 300:
            raise CloudRefused(reply.status, _error_text(reply))
        content_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            raise CloudBadResponse(f"sync response has content type {content_type!r}, not {CONTENT_TYPE}")
        try:
            data = _decoded(reply)
            return CloudSyncResponse.decode(data), len(body)
        except CloudBadResponse:
            raise
        except WireError as exc:
            raise CloudBadResponse(str(exc)) from exc

    async def _request(
        self, method: str, path: str, timeout: float, *, headers: dict[str, str], content: bytes | None, limit: int
    ) -> _Reply:
        """Send one request; read at most `limit` raw bytes of the answer; translate errors.

        The whole exchange is bounded by `timeout` (httpx's own timeout bounds each
        phase separately, so a server that trickles bytes could otherwise hold us).
        The body is read raw: we decompress it ourselves, with a bound (`_wire`).
        """
        import httpx

        url = self.base_url + path
        try:
            with trio.fail_after(timeout):
                async with self._client.stream(
                    method, url, headers=headers, content=content, timeout=httpx.Timeout(timeout)
                ) as response:
                    if response.is_stream_consumed:
                        # An in-process transport (httpx.MockTransport with `content=`)
                        # handed over a body httpx has already read and decoded.
                        body = response.content
                        if len(body) > max(limit, MAX_INFLATED):
                            raise CloudBadResponse(f"response to {method} {path} is too large")
                        return _Reply(response.status_code, response.headers, body, decoded=True)
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > limit:
                            raise CloudBadResponse(f"response to {method} {path} is larger than {limit} bytes")
                        chunks.append(chunk)
                    return _Reply(response.status_code, response.headers, b"".join(chunks))
        except trio.TooSlowError as exc:
            raise CloudTimeout(f"{method} {path}: no answer within {timeout:g} s") from exc
        except httpx.TimeoutException as exc:
            raise CloudTimeout(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            # TransportError (connect, read, write, protocol) and the rest of httpx's
            # failures before an answer: the path to the cloud is broken.
            raise CloudUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise CloudUnreachable(f"{method} {path}: {exc}") from exc


def _decoded(reply: _Reply) -> bytes:
    if reply.decoded:
        return reply.body
    encoding = reply.headers.get("content-encoding", "identity").strip().lower()
    if encoding == CONTENT_ENCODING:
        return decompress(reply.body)
    if encoding in ("identity", ""):
        return reply.body
    raise CloudBadResponse(f"response has content encoding {encoding!r}; we accept {CONTENT_ENCODING} only")


def _error_text(reply: _Reply) -> str:
    """The cloud's error message: its JSON ``error`` (or ``detail``) field, else the body's text."""
    try:
        raw = _decoded(reply)
    except WireError:
        raw = reply.body
    text = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        for key in ("error", "detail", "message"):
            if isinstance(obj.get(key), str):
                text = obj[key]
                break
    text = text.strip() or "(no message)"
    return text[:MAX_ERROR_TEXT]


# --- the probe task ---------------------------------------------------------------------


async def serve_probe(
    client: CloudClient,
    scorer: UplinkScorer,
    on_score: Callable[[int], None],
    *,
    interval: float = DEFAULT_PROBE_INTERVAL,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe the cloud every `interval` seconds and publish the score through `on_score`.

    Runs until cancelled. The first probe runs at once, so a node that starts with a
    working uplink can lead within one round trip. Probes start on a fixed grid
    (start + k * interval) rather than `interval` after the previous one ended, so
    slow probes do not stretch the period the staleness window assumes.
    `on_score` is called after every probe, also when the score did not change
    (``Membership.set_uplink_score`` ignores an unchanged score).
    """
    if timeout >= interval:
        raise ValueError("the probe timeout must be shorter than the interval")
    task_status.started()
    next_at = trio.current_time()
    while True:
        try:
            rtt: float | None = await client.probe(timeout)
            ok = True
        except UplinkError as exc:
            log.debug("uplink probe failed: %s", exc)
            rtt, ok = None, False
        score = scorer.observe(ok, rtt, trio.current_time())
        on_score(score)
        next_at += interval
        now = trio.current_time()
        if next_at < now:  # we fell behind (a suspended process): restart the grid
            next_at = now
        await trio.sleep_until(next_at)
