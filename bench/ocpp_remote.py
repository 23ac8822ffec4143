"""Remote start/stop latency: through the charger's own node, and through another node of the mesh.

    PYTHONPATH=. .venv/bin/python bench/ocpp_remote.py --rounds 20

Two `meshnode run` processes (static peers, `--insecure`, loopback 127.0.14.x); one
OCPP 2.0.1 station (the `ocpp` library's) connected to node 1. Each round sends
`POST /v1/chargers/{id}/start` then `POST /v1/sessions/{id}/stop` to node 1 (the
station's node: executed locally) or to node 2 (one mesh hop over CoAP to node 1,
which sends the OCPP request), alternating, and times the HTTP answer (202 = the
station accepted). Prints one JSON object: p50/p95/max per path, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshnode._chargepoints import SimChargePoint, running  # noqa: E402
from tests.ocpp_helpers import start_nodes, wait_peers  # noqa: E402
from tests.procs import wait_until  # noqa: E402


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nodes = start_nodes(Path(tmp), 2)
        try:
            wait_peers(nodes)
            n1, n2 = nodes
            times: dict[str, list[float]] = {"start_local": [], "start_mesh": [], "stop_local": [], "stop_mesh": []}

            def post(url: str) -> float:
                t0 = time.perf_counter()
                r = httpx.post(url, json={"id_token": "RFID-BENCH"}, timeout=30)
                assert r.status_code == 202, r.text
                return (time.perf_counter() - t0) * 1000

            async def scenario() -> None:
                st = SimChargePoint("CS-BENCH", [n1.ocpp_url])
                async with running(st):
                    for i in range(args.rounds):
                        node, path = (n1, "local") if i % 2 == 0 else (n2, "mesh")
                        times[f"start_{path}"].append(
                            await asyncio.to_thread(post, f"{node.url}/v1/chargers/CS-BENCH/start")
                        )
                        await st.settle()
                        [tx] = [t for t in st.transactions.values() if not t.ended]

                        def session() -> str | None:
                            open_ = [s for s in node.sessions("CS-BENCH") if s["state"] == "charging"]
                            return open_[0]["session_id"] if open_ else None

                        await asyncio.to_thread(wait_until, lambda: session() is not None, 30)
                        sid = await asyncio.to_thread(session)
                        times[f"stop_{path}"].append(
                            await asyncio.to_thread(post, f"{node.url}/v1/sessions/{sid}/stop")
                        )
                        await st.settle()
                        assert tx.stop_acked

            asyncio.run(scenario())
        finally:
            for n in nodes:
                n.kill()
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                **{
                    k: {"p50_ms": _q(v, 0.5), "p95_ms": _q(v, 0.95), "max_ms": round(max(v), 1), "n": len(v)}
                    for k, v in times.items()
                },
                "mean_mesh_overhead_ms": round(
                    statistics.mean(times["start_mesh"] + times["stop_mesh"])
                    - statistics.mean(times["start_local"] + times["stop_local"]),
                    1,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
