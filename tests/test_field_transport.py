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
        await trio.sleep(1.2)
        assert t.loop_late_max < 0.4  # nothing blocked yet (a loaded test host may be a little late)
        quiet = [r for r in caplog.records if "transport watch" in r.getMessage()]
        time.sleep(0.6)  # noqa: ASYNC251 - the point: the loop cannot run
        await trio.sleep(1.3)
        assert t.loop_late_max >= 0.5
        lines = [r.getMessage() for r in caplog.records if "transport watch" in r.getMessage()]
        assert len(lines) - len(quiet) == 1, lines
        assert "loop late" in lines[-1] and "backlog" in lines[-1]
    assert t._watch is not None and t._watch._handle is None  # stopped with the transport
