"""The long field run: an enrolled site of real processes, seeded faults under loss, and the ledger audit as JSON.

    sudo PYTHONPATH=. .venv/bin/python bench/field.py --seed 1 --duration 300 --loss 30

Runs the harness of `tests/field/` (docs/field.md): `--nodes` enrolled
`meshnode run` processes, each in its own network namespace on one bridge,
default ports, mDNS, two with an uplink to a `meshnode cloud` process in a
namespace of its own; a charger per node driving the HTTP API. For `--duration`
seconds the LAN loses `--loss` % of its frames (nftables) while, in every round
of about 90 s, at seeded times: the leader and another node are SIGKILLed and
restarted on their data dirs, a host is isolated for 30 s, the cloud is
SIGKILLed and restarted, the leader's uplink flaps. Then everything heals and
the run waits (at most `--converge-timeout`) for the nodes and the ledger to
agree.

Prints one JSON object on stdout (progress on stderr): acknowledged sessions
and events against the ledger, lost, billed twice, energy mismatches,
unexpected ledger rows, conflicts, node exits (with the exception that ended
each), seconds to converge after the heal, receipt spread (first node to last)
and stop-to-receipt-on-every-node p50/p95, API outcomes, and `failures`: every
broken guarantee. Exit status 0 only when `failures` is empty. The logs stay in
the printed work dir when the run fails (or with --keep). Needs root.

The run's processes share the machine with whatever else runs on it. With the
kernel's autogroup scheduling (`/proc/sys/kernel/sched_autogroup_enabled`),
each session is one scheduling group and other sessions' `nice` does not give
way to this one: `--autogroup-nice -10` sets the nice of this run's group
(start it in a session of its own: `setsid python bench/field.py ...`). The
JSON records the group, its nice and the CPU pressure over the run (`host`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _host import host_report, host_snapshot  # bench/_host.py

from tests.field.harness import (
    FieldFailure,
    FieldRun,
    Settings,
    seeded_schedule,
    short_schedule,
)
from tests.field.netns import missing_requirements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults under loss (default 300)")
    parser.add_argument("--loss", type=int, default=30, help="percent of LAN frames dropped until the heal")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--converge-timeout", type=float, default=300.0)
    parser.add_argument("--short", action="store_true", help="the test's short schedule instead of a seeded one")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data dirs) after a pass too")
    parser.add_argument(
        "--autogroup-nice",
        type=int,
        default=None,
        help="set the nice of this process's autogroup (its session) first, e.g. -10 (see above)",
    )
    args = parser.parse_args(argv)
    if args.autogroup_nice is not None:
        Path("/proc/self/autogroup").write_text(f"{args.autogroup_nice}\n")
    host_before = host_snapshot()
    problem = missing_requirements()
    if problem:
        print(f"bench/field.py: {problem}", file=sys.stderr)
        return 2
    if args.nodes < 3 or not 0 <= args.loss < 100 or args.duration < 30:
        parser.error("--nodes must be at least 3, --loss from 0 to 99, --duration at least 30")
    faults, heal_at = short_schedule() if args.short else seeded_schedule(args.seed, args.duration)
    workdir = Path(tempfile.mkdtemp(prefix="field-"))
    settings = Settings(
        nodes=args.nodes,
        loss=args.loss,
        seed=args.seed,
        faults=faults,
        heal_at=heal_at,
        converge_timeout=args.converge_timeout,
    )
    run = FieldRun(settings, workdir, progress=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = run.run()
    except FieldFailure as exc:
        print(
            json.dumps(
                {
                    "passed": False,
                    "failures": [f"the run could not go on: {exc}"],
                    "seed": args.seed,
                    "workdir": str(workdir),
                },
                indent=1,
            )
        )
        return 1
    for e in report["exits"]:
        print(f"==== {e['process']} exited by itself (code {e['code']}):\n{e.pop('log_tail')}", file=sys.stderr)
    report["duration_s"] = args.duration
    report["host"] = host_report(host_before, host_snapshot(), report.get("wall_s") or 0.0)
    print(json.dumps(report, indent=1))
    if report["passed"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs and data dirs kept in {workdir}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
