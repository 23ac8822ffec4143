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
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert report_path.exists(), proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["inputs"] == INPUTS
    # Every resource of the node is a target, and each got inputs.
    assert {"coap:/m/hello:GET", "coap:/m/members:POST", "coap:/m/digest:POST", "coap:/m/sync:POST",
            "http:node-api", "http:cloud"} <= set(report["targets"])
    assert all(report["inputs_by_target"].get(t, 0) > 0 for t in report["targets"])
    assert (report["crashes"], report["documents_changed"]) == (0, 0), json.dumps(report["failures"], indent=2)
    # Memory: after the warm-up (first tenth), growth stays far below the field's 2.6 KB per input.
    growth_per_input = (report["rss_end_mb"] - report["rss_after_warmup_mb"]) * 2**20 / (INPUTS * 0.9)
    assert growth_per_input < 1024, report
