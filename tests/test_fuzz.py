"""A short coverage-guided fuzz run of every CoAP resource, the node's HTTP API, OCPP frames
from a connected charger and the cloud's endpoints.

The targets live in tests/fuzz_targets.py (built from the node's route table,
so new resources are fuzzed too); bench/fuzz.py runs the long version. Here
a few thousand inputs run in a child process (libFuzzer ends its process) and
the run must show no crash, no changed document, flat memory after the
warm-up, and log lines far fewer than inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        "coap:/m/ocpp/command:POST",
        "coap-sealed:/m/sync:POST",
        "coap-sealed:/m/ocpp/command:POST",
        "http:node-api",
        "http:node-api-guarded",
        "ocpp:1.6",
        "ocpp:2.0.1",
        "http:cloud",
        "http:cloud-site",
    } <= set(report["targets"])
    assert all(report["inputs_by_target"].get(t, 0) > 0 for t in report["targets"])
    assert (report["crashes"], report["documents_changed"]) == (0, 0), json.dumps(report["failures"], indent=2)
    # Memory: after the warm-up (first tenth), growth stays far below the field's 2.6 KB per input.
    growth_per_input = (report["rss_end_mb"] - report["rss_after_warmup_mb"]) * 2**20 / (INPUTS * 0.9)
    assert growth_per_input < 1024, report
    # Bad input is logged at a bounded rate (a line per kind of refusal per 10 s), not a line
    # per input: the field saw 21,653 WARNING lines for 24,000 fuzzed datagrams. A template may
    # stand for a few kinds (the transport's are per code and resource): at most 32 each.
    windows = report["seconds"] / 10 + 1
    too_many = {k: n for k, n in report["log_lines_by_template"].items() if n > 32 * windows}
    assert not too_many, (windows, too_many)


def _routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route of a Starlette application; a mount serves files under it."""
    from starlette.routing import Mount

    out = set()
    for route in app.routes:
        if isinstance(route, Mount):
            out.add(("GET", route.path + "/{asset}"))
        else:
            out |= {(m, route.path) for m in route.methods - {"HEAD"}}
    return out


async def test_the_http_targets_cover_every_route_of_the_node_and_the_cloud(tmp_path: Path, autojump_clock) -> None:
    """The HTTP targets list their routes (a route is picked by an input byte): a route added to
    the node's API or to the cloud fails this test until it is added to the target's list."""
    from meshnode._api import build_app
    from tests.fuzz_targets import CLOUD_API, CLOUD_KEY, NODE_API, open_victim
    from uplink import OperatorConfig
    from uplink._cloud import open_cloud

    template = {"/v1/sessions/{sid}": "/v1/sessions/{session_id}", "/v1/chargers/{cp}": "/v1/chargers/{charger_id}"}

    def spelled(path: str) -> str:  # the targets' placeholders, as the applications spell them
        for ours, theirs in template.items():
            path = path.replace(ours, theirs)
        return path.replace("/v1/reviews/{sid}", "/v1/reviews/{session_id}")

    async with open_victim(tmp_path / "node") as (victim, _, _, _):
        assert _routes(build_app(victim)) == {(m, spelled(p)) for m, p in NODE_API}
    async with open_cloud(
        f"sqlite:///{tmp_path / 'cloud.db'}", signing_key=CLOUD_KEY, operator=OperatorConfig(ocpi_token="t")
    ) as cloud:
        assert _routes(cloud.app) == {(m, spelled(p)) for m, p in CLOUD_API}


async def test_a_new_route_is_a_target_and_a_crash_in_it_is_reported(tmp_path: Path, autojump_clock) -> None:
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
