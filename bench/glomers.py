"""The Gossip Glomers broadcast bar (challenges 3d and 3e at once) in the simulator.

Runs sim/scenarios/glomers.toml: 25 nodes, every pair linked, 100 ms one way, no
loss, about 100 acknowledged events a second for 20 s, and prints JSON:

    {"events": ..., "convergence_s": {"p50": ..., "p95": ..., "max": ...},
     "messages_per_event": ..., "events_lost": ..., "goal_met": ..., "wall_s": ...}

Goal (issue 9): median < 0.4 s, max < 0.6 s, < 20 mesh messages (requests +
responses; a one-way push counts once) per event, nothing lost.

The nodes boot at random instants in the first second while the workload has
started already, so the first changes count a node that boots after them as
missing until it has caught up. Gossip Glomers starts its workload once every
node is up; `after_mesh_formed` gives the same figures for the changes
acknowledged once every node ran and held every other as a verified neighbour
(the headline `convergence_s` and `goal_met` keep every change), and
`before_mesh_formed` splits the earlier ones: a node that boots after a change
holds it at the earliest its boot + one hello round trip (0.2 s) + one push
(0.1 s) later, so a change made at 0.0 s counted against a node booting at 0.95 s
takes 1.25 s whatever the protocol does once the node runs.

Which max is the Glomers figure: the headline `convergence_s` and `goal_met` count
every node for every change, booted or not, and keep that floor (so they say
`goal_met: false` whatever the protocol does). `running_at_change` counts, for
each change, the nodes that had booted when it was made (Gossip Glomers' own
terms: its nodes are all up before the workload starts, and a node cannot hold
what was made before it existed), with `goal_met` on those figures; the changes
a node booted after are measured from its boot in `before_mesh_formed`. Boot
times are sampled every 10 ms, so a node that booted within 10 ms before a
change may be left out of that change's count.

    python bench/glomers.py [--seed N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent


def _after(sim: Any, formed: float | None) -> dict[str, Any]:
    """Convergence of the changes acknowledged once the mesh had formed."""
    from sim import percentile

    def rounded(v: float | None) -> float | None:
        return None if v is None else round(v, 6)

    if formed is None:
        return {"mesh_formed_s": None}
    times = [c.converged_at - c.t0 for c in sim.metrics.changes if c.t0 >= formed and c.converged_at is not None]
    late = sum(1 for c in sim.metrics.changes if c.t0 >= formed and c.converged_at is None)
    conv = {
        "p50": rounded(percentile(times, 0.5)),
        "p95": rounded(percentile(times, 0.95)),
        "max": rounded(max(times) if times else None),
        "changes": len(times),
        "not_converged": late,
    }
    return {
        "mesh_formed_s": formed,
        "convergence_s": conv,
        "goal_met": bool(times and not late and conv["p50"] < 0.4 and conv["max"] < 0.6),
    }


def _running(sim: Any, booted: dict[str, float], mpe: float | None, lost: int) -> dict[str, Any]:
    """Convergence of every change over the nodes that had booted when it was made."""
    from sim import percentile

    times: list[float] = []
    late = 0
    for c in sim.metrics.changes:
        up = [n for n, at in booted.items() if at <= c.t0 and n != c.origin]
        if all(n in c.first_held for n in up):
            times.append(max((c.first_held[n] for n in up), default=c.t0) - c.t0)
        else:
            late += 1
    conv = {
        "p50": round(percentile(times, 0.5) or 0.0, 6),
        "p95": round(percentile(times, 0.95) or 0.0, 6),
        "max": round(max(times, default=0.0), 6),
        "changes": len(times),
        "not_converged": late,
    }
    return {
        "convergence_s": conv,
        "goal_met": bool(
            times and not late and conv["p50"] < 0.4 and conv["max"] < 0.6 and mpe is not None and mpe < 20 and not lost
        ),
        "counts": "per change, the nodes booted when it was made (Gossip Glomers starts its load once all are up)",
    }


def _before(sim: Any, formed: float | None, booted: dict[str, float]) -> dict[str, Any]:
    """The changes acknowledged before the mesh had formed, split by what they waited for.

    A change made before a node booted cannot reach it before that node's boot,
    its hellos (a verified hello is a round trip, 0.2 s here) and one push (0.1
    s): `per_node_after_boot_s` measures those pairs from the boot; the other
    pairs (the node ran when the change was made) from the change."""
    if formed is None:
        return {}
    early = [c for c in sim.metrics.changes if c.t0 < formed]
    up_at_t0: list[float] = []
    after_boot: list[tuple[float, float, str, float]] = []
    for c in early:
        for node_id, at in c.first_held.items():
            boot = booted.get(node_id)
            if node_id == c.origin or boot is None:
                continue
            if boot <= c.t0:
                up_at_t0.append(at - c.t0)
            else:
                after_boot.append((at - boot, c.t0, node_id, at - c.t0))
    worst = max(after_boot, default=None)
    return {
        "changes": len(early),
        "max_s": round(max((c.converged_at - c.t0 for c in early if c.converged_at is not None), default=0.0), 6),
        "per_node_up_at_change_max_s": round(max(up_at_t0, default=0.0), 6),
        "per_node_after_boot_max_s": round(worst[0], 6) if worst else None,
        "worst_after_boot": {"t0": round(worst[1], 3), "node": worst[2], "booted": round(booted[worst[2]], 3),
                             "held_after_t0_s": round(worst[3], 6)} if worst else None,
        "boot_resolution_s": 0.01,
    }  # fmt: skip


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
    formed: list[float] = []

    def mesh_formed(sim: Simulation) -> None:
        nodes = [slot.node for slot in sim.slots.values()]
        if not formed and all(n is not None and len(n.neighbours) == len(nodes) - 1 for n in nodes):
            formed.append(round(trio.current_time(), 3))

    booted: dict[str, float] = {}

    def boots(sim: Simulation) -> None:
        for node_id, slot in sim.slots.items():
            if slot.node is not None and node_id not in booted:
                booted[node_id] = round(trio.current_time(), 3)

    checks = [(i * 0.05, mesh_formed) for i in range(1, 200)] + [(i * 0.01, boots) for i in range(0, 200)]
    started = time.perf_counter()
    sim = Simulation(scenario, args.seed, checks=checks)
    result = sim.run()
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
        "running_at_change": _running(sim, booted, mpe, s["events_lost"]),
        "after_mesh_formed": _after(sim, formed[0] if formed else None),
        "before_mesh_formed": _before(sim, formed[0] if formed else None, booted),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
