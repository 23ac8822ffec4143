"""The Gossip Glomers broadcast bar (challenges 3d and 3e at once) in the simulator.

Runs sim/scenarios/glomers.toml: 25 nodes, every pair linked, 100 ms one way, no
loss, about 100 acknowledged events a second for 20 s, and prints JSON:

    {"events": ..., "convergence_s": {"p50": ..., "p95": ..., "max": ...},
     "messages_per_event": ..., "events_lost": ..., "goal_met": ..., "wall_s": ...}

Goal (issue 9): median < 0.4 s, max < 0.6 s, < 20 mesh messages (requests +
responses; a one-way push counts once) per event, nothing lost.

    python bench/glomers.py [--seed N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="scenario override, e.g. node.push_interval=0.3")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sim import Simulation, load_scenario

    overrides: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    scenario = load_scenario(ROOT / "sim" / "scenarios" / "glomers.toml", overrides)
    started = time.perf_counter()
    result = Simulation(scenario, args.seed).run()
    wall = time.perf_counter() - started
    s = result.summary
    conv = s["convergence_s"]
    mpe = s["messages_per_event"]
    out = {
        "scenario": "sim/scenarios/glomers.toml",
        "seed": args.seed,
        "nodes": s["nodes"],
        "events": s["events"],
        "events_per_s": round(s["events"] / scenario.duration, 1),
        "events_lost": s["events_lost"],
        "convergence_s": conv,
        "messages": s["messages"],
        "messages_per_event": mpe,
        "traffic_by_resource": s["traffic_by_resource"],
        "goal": {"p50_s": 0.4, "max_s": 0.6, "messages_per_event": 20},
        "goal_met": bool(
            conv["p50"] is not None
            and conv["p50"] < 0.4
            and conv["max"] < 0.6
            and mpe is not None
            and mpe < 20
            and s["events_lost"] == 0
        ),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
