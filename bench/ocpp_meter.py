"""Meter values through one node: throughput and latency with 10 OCPP 1.6 chargers.

    PYTHONPATH=. .venv/bin/python bench/ocpp_meter.py --chargers 10 --readings 30

One `meshnode run` process (`--insecure`, loopback 127.0.14.x, tests/ocpp_helpers.py);
`--chargers` charge points (the `ocpp` library's, `meshnode/_chargepoints.py`) each
start a transaction, then all send `--readings` MeterValues at once, each waiting for
the node's answer before the next (as a charger does: one transaction message in
flight). A reading's latency is from sending to the CALLRESULT, i.e. after the node
signed, stored and folded the meter event. Prints one JSON object: readings/s over
the whole run, latency p50/p95/max in ms, and whether every session holds every
reading. Note the node's per-charger rate limit (50 messages/s, burst 100) caps a
single charger, not this figure at these sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

# This script's directory (first on the path) must not be searched: its name would shadow
# the `ocpp` library. The repository root takes its place.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from meshnode._chargepoints import SimChargePoint, running  # noqa: E402
from tests.ocpp_helpers import start_nodes  # noqa: E402


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chargers", type=int, default=10)
    parser.add_argument("--readings", type=int, default=30, help="meter values per charger")
    args = parser.parse_args()
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        [node] = start_nodes(Path(tmp), 1, peered=False)
        try:

            async def scenario() -> float:
                cps = [SimChargePoint(f"CP-B{i}", [node.ocpp_url], version="1.6") for i in range(args.chargers)]
                async with running(*cps):
                    txs = [await cp.start(f"TAG-B{i}", 1000, evse=1) for i, cp in enumerate(cps)]

                    async def one(cp: SimChargePoint, tx) -> None:  # type: ignore[no-untyped-def]
                        for k in range(1, args.readings + 1):
                            t0 = time.perf_counter()
                            await cp.meter(tx, 1000 + 10 * k)
                            latencies.append((time.perf_counter() - t0) * 1000)
                        assert not cp.queue and not cp.errors, cp.errors

                    t0 = time.perf_counter()
                    await asyncio.gather(*(one(cp, tx) for cp, tx in zip(cps, txs, strict=True)))
                    return time.perf_counter() - t0

            elapsed = asyncio.run(scenario())
            sessions = node.sessions()
            complete = len(sessions) == args.chargers and all(
                sum(e["type"] == "meter" for e in s["events"]) == args.readings for s in sessions
            )
        finally:
            node.kill()
    total = args.chargers * args.readings
    print(
        json.dumps(
            {
                "chargers": args.chargers,
                "readings": total,
                "elapsed_s": round(elapsed, 2),
                "readings_per_s": round(total / elapsed, 1),
                "latency_ms": {"p50": _q(latencies, 0.5), "p95": _q(latencies, 0.95), "max": round(max(latencies), 1)},
                "all_recorded": complete,
            }
        )
    )


if __name__ == "__main__":
    main()
