"""The short field run: six enrolled nodes in network namespaces, faults for about a minute, then the audit.

What runs and what is checked is in `harness.py` and docs/field.md. The
scenario (`short_schedule`), under 30 % loss on the LAN from start to heal:
SIGKILL of the leader and restart on its data dir, SIGKILL of another node and
restart, a host isolated for 15 s, the cloud SIGKILLed for 8 s and restarted on
its database, the leader's uplink flapped twice; then everything heals.

It needs root (namespaces, veth, bridge, nftables). Without root it fails,
saying so: a skipped field test would look like a passing one, and CI runs as
root. The long, seeded run is `bench/field.py`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from .harness import FieldFailure, FieldRun, Settings, short_schedule
from .netns import missing_requirements

pytestmark = pytest.mark.slow


def test_acknowledged_sessions_reach_the_ledger_once_through_crashes_partitions_and_loss() -> None:
    problem = missing_requirements()
    if problem:
        pytest.fail(problem, pytrace=False)
    # Not pytest's tmp_path: it keeps only the last three runs of anyone's pytest on this machine,
    # and the logs of a failed field run are the evidence. Removed when the run passes.
    workdir = Path(tempfile.mkdtemp(prefix="field-test-"))
    faults, heal_at = short_schedule()
    run = FieldRun(
        Settings(nodes=6, uplinks=2, loss=30, seed=1, faults=faults, heal_at=heal_at, converge_timeout=90.0),
        workdir,
        progress=print,
    )
    try:
        report = run.run()
    except FieldFailure as exc:
        pytest.fail(f"the field run could not go on: {exc}\nlogs: {workdir}", pytrace=False)
    brief = {k: v for k, v in report.items() if k not in ("timeline", "logs", "exits", "faults")}
    print(json.dumps(brief, indent=1))
    if not report["passed"]:
        # The logs stay in the work dir; their ends, and every crash's traceback, go with the failure.
        print(run.diagnostics(lines=60))
        for e in report["exits"]:
            print(f"==== {e['process']} exited by itself (code {e['code']}, start #{e['start']}):\n{e['log_tail']}")
        print("log summaries:", json.dumps(report["logs"], indent=1))
        pytest.fail(
            "field guarantees broken:\n- " + "\n- ".join(report["failures"]) + f"\nlogs: {report['workdir']}",
            pytrace=False,
        )
    # The run did what it claims to have done (a scenario that silently skipped its faults proves nothing).
    assert report["acknowledged_sessions"] >= 12 and report["stopped_sessions"] == report["acknowledged_sessions"]
    timeline = "\n".join(report["timeline"])
    for happened in (
        "(leader) SIGKILLed",
        "(other) SIGKILLed",
        "isolated for",
        "cloud SIGKILLed",
        "uplink cut",
        "converged",
    ):
        assert happened in timeline, f"{happened!r} is not in the timeline:\n{timeline}"
    shutil.rmtree(workdir, ignore_errors=True)
