"""Simulator cost: wall-clock seconds per simulated node-hour, and peak memory.

Runs the random geometric scenario (sim/scenarios/mesh200.toml: 2 % loss,
three uplinks, chargers) at 50, 200 and 1,000 nodes, each size in a fresh
process so that its peak RSS is its own, and prints JSON on stdout:

    {"runs": [{"nodes": 50, "simulated_s": ..., "wall_s": ...,
               "wall_s_per_node_hour": ..., "peak_rss_mib": ..., "messages": ...}, ...]}

The radius shrinks as 1/sqrt(nodes) so that every size has about the same
number of neighbours per node (about 10), the partition is left out (it is a
fault, not a size), and the chargers are 20 % of the nodes. Larger meshes are
simulated for less virtual time by default (their cost per simulated second
grows with the node count); pass --seconds N to simulate every size as long.

    python bench/sim.py [--sizes 50,200,1000] [--seconds N] [--warmup S] [--profile] [--detector swim|heartbeat]
                        [--set node.idle_interval=16 ...]

With --profile, a cProfile of the 200-node run's top functions goes to stderr,
and that run's time is reported as "profiled_wall_s" (cProfile slows it down,
so it is not the figure to compare with the 60 s goal; run without --profile
for that).

``after_warmup`` gives the CPU seconds per node-hour, messages and bytes per node and
second from ``--warmup`` simulated seconds (120 by default) to the end: the idle mesh's
cost without its start-up (hellos, the first claims, the cloud's ledger migration and
the imports), which dominates runs of a few minutes.

Besides wall time, each run reports its CPU time (``cpu_s``, and per simulated
node-hour): on a machine shared with other work the wall time includes waiting
for a core, the CPU time does not. ``membership`` is the failure detector's
accuracy (the share of running peers that running nodes held live, and ALIVE;
see `Simulation`'s summary): a cheaper idle mesh must not buy its savings with
false verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECONDS = {50: 600.0, 200: 600.0, 1000: 30.0}


def child(nodes: int, seconds: float, profile: bool, detector: str, warmup: float, sets: Sequence[str] = ()) -> None:
    sys.path.insert(0, str(ROOT))
    from sim import Simulation, load_scenario

    overrides = {
        "topology.nodes": nodes,
        "topology.radius": round(0.13 * math.sqrt(200 / nodes), 4),
        "workload.chargers": max(1, nodes // 5),
        "duration": seconds,
        "drain": 0.0,
        "faults": {},
        "node.detector": detector,
    }
    for item in sets:  # --set node.idle_interval=16
        key, _, value = item.partition("=")
        overrides[key] = float(value)
    scenario = load_scenario(ROOT / "sim" / "scenarios" / "mesh200.toml", overrides)
    started = time.perf_counter()
    cpu_started = time.process_time()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    steady: dict[str, float] = {}

    def settled(sim: Simulation) -> None:
        assert sim.net is not None
        steady.update(cpu=time.process_time(), t=warmup, messages=sim.net.total.messages, bytes=sim.net.total.bytes)

    result = Simulation(scenario, 1, checks=[(warmup, settled)] if 0 < warmup < seconds else ()).run()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if profile:
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(25)
    s = result.summary
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall_key = "profiled_wall_s" if profile else "wall_s"
    after: dict[str, object] = {}
    if steady:
        span = s["simulated_s"] - steady["t"]
        node_hours = nodes * span / 3600.0
        after = {
            "after_warmup": {
                "from_s": steady["t"],
                ("profiled_" if profile else "") + "cpu_s_per_node_hour": round(
                    (time.process_time() - steady["cpu"]) / node_hours, 3
                ),
                "messages_per_node_per_s": round((s["messages"] - steady["messages"]) / nodes / span, 3),
                "bytes_per_node_per_s": round((s["bytes"] - steady["bytes"]) / nodes / span, 1),
            }
        }
    print(
        json.dumps(
            {
                "nodes": nodes,
                "detector": detector,
                "set": list(sets),
                "simulated_s": s["simulated_s"],
                wall_key: round(wall, 2),
                ("profiled_" if profile else "") + "wall_s_per_node_hour": round(
                    wall / (nodes * s["simulated_s"] / 3600.0), 2
                ),
                ("profiled_" if profile else "") + "cpu_s": round(cpu, 2),
                ("profiled_" if profile else "") + "cpu_s_per_node_hour": round(
                    cpu / (nodes * s["simulated_s"] / 3600.0), 3
                ),
                "peak_rss_mib": round(peak, 1),
                "messages": s["messages"],
                "messages_per_node_per_s": s["messages_per_node_per_s"],
                "bytes_per_node_per_s": s["bytes_per_node_per_s"],
                "events": s["events"],
                "events_lost": s["events_lost"],
                "convergence_p50_s": s["convergence_s"]["p50"],
                "membership": s["membership"],
                "leaders_at_once_max": s["leaders_at_once_max"],
                "leader_split_samples": s["leader_split_samples"],
                **after,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200,1000")
    parser.add_argument("--seconds", type=float, default=None, help="simulated seconds for every size")
    parser.add_argument("--profile", action="store_true", help="profile the 200-node run (stderr)")
    parser.add_argument("--detector", default="swim", choices=("heartbeat", "swim"), help="the nodes' failure detector")
    parser.add_argument(
        "--warmup", type=float, default=120.0, help="simulated seconds of start-up left out of the after_warmup figures"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=NUMBER",
        help="a scenario override, e.g. node.idle_interval=16",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            args.child,
            args.seconds or DEFAULT_SECONDS.get(args.child, 60.0),
            args.profile,
            args.detector,
            args.warmup,
            args.set,
        )
        return 0
    runs = []
    for nodes in [int(n) for n in args.sizes.split(",")]:
        seconds = args.seconds or DEFAULT_SECONDS.get(nodes, 60.0)
        cmd = [sys.executable, __file__, "--child", str(nodes), "--seconds", str(seconds), "--detector", args.detector]
        cmd += ["--warmup", str(args.warmup)] + [f"--set={item}" for item in args.set]
        if args.profile and nodes == 200:
            cmd.append("--profile")
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{nodes} nodes: {runs[-1]}", file=sys.stderr)
    print(json.dumps({"scenario": "sim/scenarios/mesh200.toml (radius scaled)", "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
