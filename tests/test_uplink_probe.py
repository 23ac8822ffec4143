"""Uplink score, the cloud HTTP client (mocked and over real HTTP), and the probe task."""

from __future__ import annotations

import logging
import random
import zlib
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from uplink._probe import (
    CloudBadResponse,
    CloudClient,
    CloudRefused,
    CloudTimeout,
    CloudUnreachable,
    UplinkError,
    UplinkScorer,
    latency_factor,
    serve_probe,
)
from uplink._wire import CloudSyncRequest, CloudSyncResponse, WireError, compress, decompress

BASE = "http://cloud.test"
FIXED_RESPONSE = CloudSyncResponse({"doc-1": b"\x42\x00\x01"}, {"doc-2": "refused for the test"})
_CBOR_DEFLATE = {"Content-Type": "application/cbor", "Content-Encoding": "deflate"}

# --- the score ----------------------------------------------------------------------------


def test_latency_factor_shape() -> None:
    assert latency_factor(0.0) == 1.0
    assert latency_factor(0.15) == 1.0
    assert latency_factor(1.075) == pytest.approx(0.75)
    assert latency_factor(2.0) == 0.5
    assert latency_factor(30.0) == 0.5


def test_no_probe_yet_scores_zero() -> None:
    assert UplinkScorer().score(0.0) == 0


def test_first_success_scores_by_latency() -> None:
    assert UplinkScorer().observe(True, 0.05, 0.0) == 100
    assert UplinkScorer().observe(True, 1.075, 0.0) == 75
    assert UplinkScorer().observe(True, 2.5, 0.0) == 50
    # A success without a time: nothing known against the link's speed.
    assert UplinkScorer().observe(True, None, 0.0) == 100


def test_rtt_is_smoothed() -> None:
    s = UplinkScorer()
    s.observe(True, 0.15, 0.0)
    # srtt = 0.15 + (1.75 - 0.15) / 8 = 0.35; L = 1 - 0.5 * 0.2 / 1.85 = 0.9459
    assert s.observe(True, 1.75, 5.0) == 95
    assert s.srtt == pytest.approx(0.35)


def test_failures_cost_eight_points_each_then_cut_to_zero() -> None:
    s = UplinkScorer()
    assert s.observe(True, 0.1, 0.0) == 100
    assert s.observe(False, None, 5.0) == 92  # S = 0.92
    assert s.observe(False, 1.0, 10.0) == 85  # S = 0.8464; a failure's rtt is ignored
    assert s.failures_in_row == 2
    assert s.observe(False, None, 15.0) == 0  # three in a row: the cut
    assert s.observe(False, None, 20.0) == 0
    assert s.score(21.0) == 0


def test_recovery_after_outage_resumes_where_the_cut_left_it() -> None:
    s = UplinkScorer()
    s.observe(True, 0.1, 0.0)
    for i in range(1, 20):  # a long outage: only the first three failures lower S
        s.observe(False, None, 5.0 * i)
    # S = 0.92**3 = 0.778688, then one success: S + 0.08 * (1 - S) = 0.796393
    assert s.observe(True, 0.1, 100.0) == 80
    assert s.observe(True, 0.1, 105.0) == 81  # 0.812682
    assert s.failures_in_row == 0


def test_isolated_failure_recovers_gradually() -> None:
    s = UplinkScorer()
    s.observe(True, 0.1, 0.0)
    s.observe(False, None, 5.0)
    assert s.observe(True, 0.1, 10.0) == 93  # 0.92 + 0.08 * 0.08 = 0.9264
    assert s.observe(True, 0.1, 15.0) == 93  # 0.932288


def test_staleness_window() -> None:
    s = UplinkScorer(stale_after=20.0)
    s.observe(True, 0.1, 100.0)
    assert s.score(120.0) == 100  # exactly the window: still fresh
    assert s.score(120.001) == 0
    assert s.observe(True, 0.1, 150.0) == 100  # a fresh success brings it back


def test_first_probe_failing_scores_zero_and_success_counts_from_there() -> None:
    s = UplinkScorer()
    assert s.observe(False, None, 0.0) == 0
    assert s.observe(True, 0.1, 5.0) == 8  # S = 0 + 0.08


def test_scorer_rejects_bad_settings() -> None:
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.5}, {"fail_limit": 0}, {"stale_after": 0.0}):
        with pytest.raises(ValueError):
            UplinkScorer(**kwargs)  # type: ignore[arg-type]


JITTER = 0.3


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(min_value=0.001, max_value=1.8),
    offsets=st.lists(st.floats(min_value=-JITTER, max_value=JITTER), min_size=1, max_size=60),
)
def test_healthy_link_jitter_stays_within_nine_points(base: float, offsets: list[float]) -> None:
    """The election's 20-point stickiness margin assumes ±9 points of noise per node.

    Whatever the order of RTT samples within ±300 ms of a base value, the score stays
    within 9 points of the score at the base (the smoothed RTT stays in that range,
    and the latency factor moves about 27 points per second).
    """
    reference = round(100 * latency_factor(base))
    s = UplinkScorer()
    for i, off in enumerate(offsets):
        score = s.observe(True, max(0.0, base + off), 5.0 * i)
        assert abs(score - reference) <= 9, (base, off, score, reference)


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(min_value=0.001, max_value=1.8),
    offsets=st.lists(st.floats(min_value=-JITTER, max_value=JITTER), min_size=12, max_size=40),
    lost=st.integers(min_value=10, max_value=39),
)
def test_one_lost_probe_on_a_healthy_link_stays_within_nine_points(
    base: float, offsets: list[float], lost: int
) -> None:
    s = UplinkScorer()
    for i, off in enumerate(offsets):
        s.observe(True, max(0.0, base + off), 5.0 * i)
    before = s.score(5.0 * len(offsets))
    after = s.observe(False, None, 5.0 * len(offsets))
    assert 0 <= before - after <= 9


# --- CloudClient over httpx.MockTransport -----------------------------------------------


def _cbor_reply(response: CloudSyncResponse, status: int = 200) -> httpx.Response:
    # A raw stream, as a network transport delivers it (httpx decodes `content=` eagerly).
    return httpx.Response(
        status,
        stream=httpx.ByteStream(compress(response.encode())),
        headers={"Content-Type": "application/cbor", "Content-Encoding": "deflate"},
    )


def _client(handler: Any, **kwargs: Any) -> CloudClient:
    return CloudClient(BASE, transport=httpx.MockTransport(handler), **kwargs)


async def test_probe_measures_round_trip_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET" and request.url.path == "/healthz"
        await trio.sleep(0.3)
        return httpx.Response(200, json={"ok": True})

    client = _client(handler)
    assert await client.probe(2.0) == pytest.approx(0.3)
    await client.aclose()


async def test_probe_refused_carries_status_and_json_error() -> None:
    client = _client(lambda request: httpx.Response(503, json={"error": "ledger unavailable"}))
    with pytest.raises(CloudRefused) as info:
        await client.probe(2.0)
    assert info.value.status == 503
    assert info.value.message == "ledger unavailable"
    await client.aclose()


async def test_probe_connection_error_is_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = _client(handler)
    with pytest.raises(CloudUnreachable) as info:
        await client.probe(2.0)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    await client.aclose()


async def test_probe_slow_answer_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)
        return httpx.Response(200)

    client = _client(handler)
    start = trio.current_time()
    with pytest.raises(CloudTimeout):
        await client.probe(2.0)
    assert trio.current_time() - start == pytest.approx(2.0)
    await client.aclose()


async def test_httpx_timeout_is_a_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    client = _client(handler)
    with pytest.raises(CloudTimeout) as info:
        await client.sync(CloudSyncRequest("n1", "site", {"d": None}), 5.0)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    await client.aclose()


async def test_sync_sends_deflated_cbor_and_decodes_the_reply() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        got = CloudSyncRequest.decode(decompress(request.content))
        assert got.node_id == "n1" and got.site == "field" and got.reset == ("d1",)
        return _cbor_reply(CloudSyncResponse({"d1": b"\x42\x01"}, {"d2": "not a session"}))

    client = _client(handler)
    request = CloudSyncRequest("n1", "field", {"d1": b"\x42\x00", "d2": None}, ("d1",))
    response, sent = await client.sync(request, 5.0)
    assert response == CloudSyncResponse({"d1": b"\x42\x01"}, {"d2": "not a session"})
    (req,) = seen
    assert req.method == "POST" and req.url.path == "/v1/sync"
    assert req.headers["content-type"] == "application/cbor"
    assert req.headers["content-encoding"] == "deflate"
    assert req.headers["accept-encoding"] == "deflate"
    assert sent == len(req.content) == len(zlib.compress(request.encode(), 6))
    await client.aclose()


async def test_sync_accepts_a_reply_httpx_has_already_decoded() -> None:
    # httpx.Response(content=...) in a MockTransport handler is read and inflated eagerly.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=compress(FIXED_RESPONSE.encode()), headers=_CBOR_DEFLATE)

    client = _client(handler)
    response, _ = await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    assert response == FIXED_RESPONSE
    await client.aclose()


async def test_sync_accepts_an_uncompressed_reply() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = CloudSyncResponse({}).encode()
        return httpx.Response(200, content=body, headers={"Content-Type": "application/cbor"})

    client = _client(handler)
    response, _ = await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    assert response == CloudSyncResponse({})
    await client.aclose()


async def test_sync_refused_with_json_error() -> None:
    client = _client(lambda request: httpx.Response(400, json={"error": "site mismatch"}))
    with pytest.raises(CloudRefused) as info:
        await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    assert (info.value.status, info.value.message) == (400, "site mismatch")
    await client.aclose()


async def test_sync_refused_with_plain_text_is_kept_short() -> None:
    client = _client(lambda request: httpx.Response(502, text="bad gateway " * 100))
    with pytest.raises(CloudRefused) as info:
        await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    assert info.value.status == 502
    assert info.value.message.startswith("bad gateway") and len(info.value.message) <= 300
    await client.aclose()


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (compress(b"\xff\x00 not cbor"), _CBOR_DEFLATE),
        (b"not deflate", _CBOR_DEFLATE),
        (compress(CloudSyncResponse({}).encode()), {"Content-Type": "application/cbor", "Content-Encoding": "gzip"}),
        (b'{"msgs": {}}', {"Content-Type": "application/json"}),
        (compress(b"\0" * (17 * 1024 * 1024)), _CBOR_DEFLATE),
        (compress(b"\xa0"), _CBOR_DEFLATE),  # an empty map: no msgs
    ],
    ids=["not-cbor", "not-deflate", "gzip", "json", "deflate-bomb", "no-msgs"],
)
async def test_sync_bad_reply_is_a_wire_error(body: bytes, headers: dict[str, str]) -> None:
    # A raw stream, so that httpx does not decode the body before our client sees it.
    client = _client(lambda request: httpx.Response(200, headers=headers, stream=httpx.ByteStream(body)))
    with pytest.raises(CloudBadResponse) as info:
        await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    assert isinstance(info.value, WireError) and isinstance(info.value, UplinkError)
    await client.aclose()


async def test_sync_reply_larger_than_the_bound_is_refused_unread() -> None:
    incompressible = random.Random(1).randbytes(4000)
    big = _cbor_reply(CloudSyncResponse({"d": incompressible}))
    client = _client(lambda request: big, max_response=1000)
    with pytest.raises(CloudBadResponse, match="larger than 1000 bytes"):
        await client.sync(CloudSyncRequest("n1", "s", {"d": None}), 5.0)
    await client.aclose()


async def test_aclose_leaves_an_injected_client_open() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    client = CloudClient(BASE, client=http)
    await client.aclose()
    assert not http.is_closed
    assert await client.probe(1.0) >= 0.0
    await http.aclose()
    owned = _client(lambda r: httpx.Response(200))
    await owned.aclose()
    with pytest.raises(RuntimeError):  # our own misuse, not the cloud's failure
        await owned.probe(1.0)


# --- the probe task ---------------------------------------------------------------------


async def test_serve_probe_publishes_a_score_per_probe_on_a_fixed_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = True
    probes: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        probes.append(trio.current_time())
        await trio.sleep(0.1)
        if not up:
            raise httpx.ConnectError("down", request=request)
        return httpx.Response(200)

    scores: list[tuple[float, int]] = []
    client = _client(handler)
    scorer = UplinkScorer()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_probe(
                client, scorer, lambda s: scores.append((trio.current_time(), s)), task_status=task_status
            )
        )
        await trio.sleep(12.0)  # probes at 0, 5, 10
        up = False
        await trio.sleep(15.0)  # probes at 15, 20, 25 fail
        up = True
        await trio.sleep(5.0)  # probe at 30 succeeds
        nursery.cancel_scope.cancel()
    start = probes[0]
    assert [round(p - start, 6) for p in probes] == [0, 5, 10, 15, 20, 25, 30]
    assert [s for _, s in scores] == [100, 100, 100, 92, 85, 0, 80]
    await client.aclose()


async def test_serve_probe_rejects_timeout_not_shorter_than_interval() -> None:
    client = _client(lambda r: httpx.Response(200))
    with pytest.raises(ValueError):
        await serve_probe(client, UplinkScorer(), lambda s: None, interval=2.0, timeout=2.0)
    await client.aclose()


# --- CloudClient over real HTTP (Starlette on Hypercorn, trio) --------------------------


def _cloud_app(received: list[tuple[dict[str, str], CloudSyncRequest]]) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def sync(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") != "deflate":
            return JSONResponse({"error": "body must be deflated"}, status_code=415)
        try:
            got = CloudSyncRequest.decode(decompress(body))
        except WireError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if got.node_id == "slow":
            await trio.sleep(5)
        received.append((dict(request.headers), got))
        return Response(
            compress(FIXED_RESPONSE.encode()),
            headers={"Content-Type": "application/cbor", "Content-Encoding": "deflate"},
        )

    return Starlette(routes=[Route("/healthz", healthz), Route("/v1/sync", sync, methods=["POST"])])


async def test_cloud_client_over_real_http() -> None:
    received: list[tuple[dict[str, str], CloudSyncRequest]] = []
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.fake_cloud")
    config.graceful_timeout = 0.2
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, _cloud_app(received), config)
        base = binds[0]
        client = CloudClient(base)
        try:
            rtt = await client.probe(2.0)
            assert 0.0 <= rtt < 2.0

            request = CloudSyncRequest("n1", "field", {"doc-1": b"\x42\x00", "doc-2": None}, ("doc-1",))
            response, sent = await client.sync(request, 5.0)
            assert response == FIXED_RESPONSE
            headers, got = received[-1]
            assert got == request
            assert headers["content-type"] == "application/cbor"
            assert headers["content-encoding"] == "deflate"
            assert int(headers["content-length"]) == sent == len(compress(request.encode()))

            start = trio.current_time()
            with pytest.raises(CloudTimeout):
                await client.sync(CloudSyncRequest("slow", "field", {"doc-1": None}), 0.5)
            assert trio.current_time() - start < 2.0
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()

    # Nothing listens there any more: unreachable, not a timeout.
    gone = CloudClient(base)
    with pytest.raises(CloudUnreachable):
        await gone.probe(2.0)
    await gone.aclose()


async def test_refusal_message_from_starlette_detail() -> None:
    # Starlette's HTTPException handler answers {"detail": ...}.
    client = _client(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(CloudRefused) as info:
        await client.probe(2.0)
    assert (info.value.status, info.value.message) == (404, "Not Found")
    assert "404" in str(info.value)
    await client.aclose()
