"""A short coverage-guided fuzz run of every CoAP resource, the node's HTTP API and the cloud.

The targets live in tests/fuzz_targets.py (built from the node's route table,
so new resources are fuzzed too); bench/fuzz.py runs the long version. Here
a few thousand inputs run in a child process (libFuzzer ends its process) and
the run must show no crash, no changed document, and flat memory after the
warm-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INPUTS = 2000


def test_short_fuzz_run_finds_no_crash_no_change_and_flat_memory(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_targets", "--inputs", str(INPUTS), "--json", str(report_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert report_path.exists(), proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["inputs"] == INPUTS
    # Every resource of the node is a target, and each got inputs.
    assert {
        "coap:/m/hello:GET",
        "coap:/m/hello:POST",
        "coap:/m/push:POST",
        "coap:/m/state:POST",
        "coap:/m/digest:POST",
        "coap:/m/sync:POST",
        "coap-sealed:/m/sync:POST",
        "http:node-api",
        "http:cloud",
    } <= set(report["targets"])
    assert all(report["inputs_by_target"].get(t, 0) > 0 for t in report["targets"])
    assert (report["crashes"], report["documents_changed"]) == (0, 0), json.dumps(report["failures"], indent=2)
    # Memory: after the warm-up (first tenth), growth stays far below the field's 2.6 KB per input.
    growth_per_input = (report["rss_end_mb"] - report["rss_after_warmup_mb"]) * 2**20 / (INPUTS * 0.9)
    assert growth_per_input < 1024, report


async def test_a_new_route_is_a_target_and_a_crash_in_it_is_reported(tmp_path: Path) -> None:
    """The harness can fail: targets come from the route table, so a route
    added to the node is fuzzed, and a handler that crashes (5.00) counts."""
    from tests.fuzz_targets import coap_targets, open_victim

    async with open_victim(tmp_path) as (victim, transport, net, _):

        async def broken(payload: bytes, remote: str) -> bytes:
            raise KeyError("a bug")

        transport.route("/m/new", broken)
        targets = {t.name: t for t in coap_targets(victim, transport, net.recorded)}
        assert "coap:/m/new:POST" in targets
        crashed = await targets["coap:/m/new:POST"].one(b"\x01abc")
        assert crashed.crashed is not None and crashed.crashed.startswith("5.00")
        fine = await targets["coap:/m/hello:GET"].one(b"\x01")
        assert fine.crashed is None and not fine.changed
        assert net.recorded["/m/sync"], "seeds are recorded from a real exchange"
