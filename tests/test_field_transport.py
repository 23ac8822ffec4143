"""The CoAP transport's watch: what a slow mesh waits for, measured and logged at a bounded rate."""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio_asyncio

import meshnode._coap as coap
from meshnode._coap import open_coap_transport

from .procs import free_port

A = "127.0.11.31"


async def test_the_watch_measures_a_late_loop_and_says_so_once_per_period(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coap, "WATCH_REPORT", 1.0)
    monkeypatch.setattr(coap, "WATCH_IDLE", 0.1)  # no request in progress here
    caplog.set_level(logging.INFO, logger="meshnode.coap")
    async with trio_asyncio.open_loop(), open_coap_transport(A, free_port(A)) as t:
        start = trio.current_time()
        await trio.sleep(0.3)
        time.sleep(1.0)  # noqa: ASYNC251 - the point: the loop cannot run
        await trio.sleep(2.5)
        elapsed = trio.current_time() - start
        assert t.loop_late_max >= 0.8  # a look was due during the block (every 0.1 s here)
        lines = [r.getMessage() for r in caplog.records if "transport watch" in r.getMessage()]
        # Said, with the figure, and at a bounded rate: one line per report period at most.
        assert any(float(line.split("max ")[1].split(" s")[0]) >= 0.8 for line in lines), lines
        assert 1 <= len(lines) <= elapsed / coap.WATCH_REPORT + 1, lines
        assert all("loop late" in line and "backlog" in line for line in lines)
    assert t._watch is not None and t._watch._handle is None  # stopped with the transport


async def test_a_request_whose_peer_went_quiet_says_so_not_that_it_hit_the_cap() -> None:
    """The timeout message tells the two bounds apart: a request that the peer's other
    answers kept alive, until the peer went quiet for `timeout`, does not claim that it
    ran to the cap (the field logs read as if every such request had waited 60 s)."""
    from meshnode._coap import PROGRESS_CAP
    from meshnode._transport import RequestTimeout

    a_at, b_at = "127.0.11.32", "127.0.11.33"
    async with trio_asyncio.open_loop():  # noqa: SIM117 (the loop must be open before the transports)
        async with (
            open_coap_transport(a_at, free_port(a_at)) as a,
            open_coap_transport(b_at, free_port(b_at), handler_timeout=30) as b,
            trio.open_nursery() as nursery,
        ):
            release = trio.Event()

            async def stuck(payload: bytes, remote: str) -> bytes:
                await release.wait()
                return b"late"

            async def echo(payload: bytes, remote: str) -> bytes:
                return payload

            b.route("/m/stuck", stuck)
            b.route("/m/echo", echo)
            timeout = 0.5

            async def chatter_for(seconds: float) -> None:
                with trio.move_on_after(seconds):
                    while True:
                        await a.request(b.address, "/m/echo", b"hi", timeout=1)
                        await trio.sleep(0.05)

            nursery.start_soon(chatter_for, 1.5)
            start = trio.current_time()
            with pytest.raises(RequestTimeout) as raised:
                await a.request(b.address, "/m/stuck", b"x", timeout=timeout)
            took = trio.current_time() - start
            message = str(raised.value)
            assert f"then nothing for {timeout:g} s" in message and "not in full" not in message, message
            assert 1.5 <= took < PROGRESS_CAP * timeout, took
            release.set()
