"""The simulator on small scenarios: reproducibility, partitions, hops, crashes and wipes.

Each test runs real nodes under a MockClock in one trio run (`Simulation.run`
calls `trio.run` itself, so these are plain functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import trio

from sim import Simulation, parse_scenario
from sim._metrics import holds

ROOT = Path(__file__).resolve().parent.parent


def scenario(**parts: Any) -> Any:
    raw: dict[str, Any] = {"name": "test", "duration": 300, "drain": 300, "sample_interval": 5}
    raw.update(parts)
    return parse_scenario(raw)


# --- reproducibility -------------------------------------------------------------------

SMALL = """
name = "small"
duration = 360
drain = 300
sample_interval = 5

[topology]
kind = "geometric"
nodes = 7
radius = 0.45

[network]
latency = { dist = "lognormal", median = 0.02, sigma = 0.6 }
loss = 0.05
bandwidth_kbps = 250

[uplink]
nodes = ["n01", "n05"]

[uplink.schedule.n01]
mode = "flapping"
up_s = { dist = "exponential", mean = 60 }
down_s = { dist = "exponential", mean = 30 }

[workload]
chargers = "all"
sessions_per_hour = 12
connectors = 2
session_minutes = { dist = "uniform", low = 1, high = 4 }
meter_interval = 20

[[faults.crash]]
node = "n03"
at = 100
down_for = 40

[[faults.crash]]
node = "leader"
at = 200
down_for = 30
wipe = true
"""


def _meshsim(scenario_path: Path, seed: int, out: Path, hash_seed: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return subprocess.Popen(
        [sys.executable, "-m", "sim.cli", "run", str(scenario_path), "--seed", str(seed), "--out", str(out),
         "--no-plots", "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_same_seed_same_summary_across_processes_and_different_seed_differs(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    runs = [(1, "1", tmp_path / "a"), (1, "2", tmp_path / "b"), (2, "3", tmp_path / "c")]
    procs = [_meshsim(path, seed, out, hash_seed) for seed, hash_seed, out in runs]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
    a, b, c = ((out / "summary.json").read_bytes() for _, _, out in runs)
    assert a == b
    assert a != c
    summary = json.loads(a)
    # The run did something worth reproducing: sessions, crashes, a wipe, and the cloud.
    assert summary["sessions"] > 3 and summary["crashes"] == 1 and summary["wipes"] == 1
    assert summary["events_not_in_cloud"] == 0 and summary["events_lost"] == 0
    assert summary["sessions_billed_twice"] == 0
    assert (tmp_path / "a" / "timeseries.csv").read_bytes() == (tmp_path / "b" / "timeseries.csv").read_bytes()


# --- partitions --------------------------------------------------------------------------


def test_partition_each_side_converges_then_everything_after_heal():
    sc = scenario(
        duration=420,
        topology={"kind": "clusters", "nodes": 8, "clusters": 2, "bridges": 1},
        network={"latency": {"dist": "uniform", "low": 0.005, "high": 0.03}, "loss": 0.02},
        uplink={"nodes": ["n01"]},  # only side A reaches the cloud
        workload={"chargers": "all", "sessions_per_hour": 8, "session_minutes": {"dist": "uniform", "low": 1, "high": 3},
                  "meter_interval": 20},
        faults={"partition": [{"at": 60, "heal": 300, "groups": [["n01", "n02", "n03", "n04"],
                                                                 ["n05", "n06", "n07", "n08"]]}]},
    )  # fmt: skip
    sides = [{"n01", "n02", "n03", "n04"}, {"n05", "n06", "n07", "n08"}]
    seen: dict[str, int] = {"inside": 0, "across": 0}

    def during_partition(sim: Simulation) -> None:
        now = trio.current_time()
        for change in sim.metrics.changes:
            if not 60 <= change.t0 <= now - 20:
                continue
            side = next(s for s in sides if change.origin in s)
            for node_id, node in sim.metrics.running.items():
                held = holds(node, change.doc_id, change.event_id)
                if node_id in side:
                    assert held, f"{node_id} lacks {change.kind} of {change.origin} made at {change.t0:.1f}"
                    seen["inside"] += 1
                elif change.t0 > 62:
                    assert not held, f"{node_id} got a change from across the partition"
                    seen["across"] += 1

    sim = Simulation(sc, 3, checks=[(200, during_partition), (290, during_partition)])
    s = sim.run().summary
    assert seen["inside"] > 20 and seen["across"] > 20
    assert s["partitions"] == 1
    assert s["convergence_s"]["not_converged"] == 0
    assert s["convergence_s"]["max"] > 100  # changes made during the partition waited for the heal
    assert s["events_lost"] == 0 and s["events_not_in_cloud"] == 0
    assert s["sessions_billed_twice"] == 0
    assert s["sessions_reconciled"] == s["sessions"] > 4


# --- hops ----------------------------------------------------------------------------------


def test_line_of_ten_change_at_one_end_reaches_the_other_and_delay_grows_with_hops():
    raw = tomllib.loads((ROOT / "sim" / "scenarios" / "line10.toml").read_text())
    raw["duration"] = 240
    sc = parse_scenario(raw)
    s = Simulation(sc, 1).run().summary
    by_hops = s["delay_by_hops_s"]
    assert sorted(by_hops, key=int) == [str(h) for h in range(1, 10)]
    # Every change made at n01 reached n10 (9 hops away) ...
    assert by_hops["9"]["count"] == s["events"] > 5
    assert s["convergence_s"]["not_converged"] == 0
    # ... and the farther a node, the later it got it.
    medians = [by_hops[str(h)]["p50"] for h in range(1, 10)]
    assert medians == sorted(medians), medians
    assert medians[-1] > 3 * medians[0]


# --- crashes and wipes -----------------------------------------------------------------------


def test_crashed_node_restarts_with_its_store_and_wiped_node_catches_up_from_peers():
    sc = scenario(
        duration=360,
        topology={"kind": "ring", "nodes": 6},
        network={"latency": {"dist": "uniform", "low": 0.005, "high": 0.02}, "loss": 0.01},
        workload={"chargers": ["n01", "n02", "n05", "n06"], "sessions_per_hour": 12,
                  "session_minutes": {"dist": "uniform", "low": 1, "high": 3}, "meter_interval": 15},
        faults={"crash": [{"node": "n03", "at": 100, "down_for": 60},
                          {"node": "n04", "at": 200, "down_for": 40, "wipe": True}]},
    )  # fmt: skip
    facts: dict[str, Any] = {}

    def before(name: str):
        def check(sim: Simulation) -> None:
            node = sim.slots[name].node
            facts[name + "_docs"] = set(node.replica.docs)
            facts[name + "_key"] = node.signer.public_key

        return check

    def while_down(name: str):
        def check(sim: Simulation) -> None:
            assert not sim.slots[name].running
            facts[name + "_stored"] = sim.stored_docs(name)

        return check

    def caught_up(name: str):
        def check(sim: Simulation) -> None:
            node = sim.slots[name].node
            assert sim.slots[name].running and node is not None
            facts[name + "_key_after"] = node.signer.public_key
            facts[name + "_caught_up"] = all(
                holds(node, c.doc_id, c.event_id) for c in sim.metrics.changes if c.t0 < trio.current_time() - 15
            )

        return check

    sim = Simulation(sc, 5, checks=[
        (99.9, before("n03")), (130, while_down("n03")), (230, caught_up("n03")),
        (199.9, before("n04")), (220, while_down("n04")), (300, caught_up("n04")),
    ])  # fmt: skip
    s = sim.run().summary
    assert s["crashes"] == 1 and s["wipes"] == 1
    # The power cut kept the store (everything the node held), and the device key.
    assert facts["n03_docs"] and facts["n03_stored"] == facts["n03_docs"]
    assert facts["n03_key_after"] == facts["n03_key"]
    # The wipe took everything; the node came back as a new device and caught up from peers.
    assert facts["n04_docs"] and facts["n04_stored"] is None
    assert facts["n04_key_after"] != facts["n04_key"]
    assert facts["n03_caught_up"] and facts["n04_caught_up"]
    assert s["convergence_s"]["not_converged"] == 0 and s["events_lost"] == 0


# --- the SWIM failure detector -----------------------------------------------------------------


def test_swim_detector_moves_the_leader_off_a_cut_node_takes_it_back_after_the_heal_and_buries_a_crash():
    """`node.detector = "swim"` on a 3x3 grid (up to 4 hops, 2 % loss): no heartbeats travel,
    yet a leader cut off by a partition is found by its neighbours' failed probes and declared
    DEAD everywhere, the rest follow the other uplink; after the heal the cut node refutes and
    everyone agrees again; a crashed node (discovery says it left) is DEAD on every node."""
    sc = scenario(
        duration=300,
        drain=0,
        topology={"kind": "grid", "nodes": 9},
        network={"latency": {"dist": "uniform", "low": 0.005, "high": 0.03}, "loss": 0.02},
        uplink={"nodes": ["n01", "n09"]},
        workload={"chargers": [], "sessions_per_hour": 0},
        node={"detector": "swim"},
        faults={"partition": [{"at": 100, "heal": 200, "groups": [["n09"], [f"n0{i}" for i in range(1, 9)]]}],
                "crash": [{"node": "n05", "at": 250, "down_for": 1000}]},
    )  # fmt: skip
    seen: dict[float, dict[str, tuple[str | None, set[str]]]] = {}

    def look(sim: Simulation) -> None:
        now = trio.current_time()
        seen[now] = {
            node_id: (
                slot.node.leader,
                {v.record.node_id for v in slot.node.membership.view(now) if v.state.name == "DEAD"},
            )
            for node_id, slot in sim.slots.items()
            if slot.running and slot.node is not None
        }

    sim = Simulation(sc, 1, checks=[(99.0, look), (170.0, look), (240.0, look), (290.0, look)])
    s = sim.run().summary
    before, cut, healed, crashed = (seen[t] for t in (99.0, 170.0, 240.0, 290.0))
    assert {leader for leader, _ in before.values()} == {"n09"}
    assert all(dead == set() for _, dead in before.values())
    for node_id, (leader, dead) in cut.items():
        if node_id != "n09":
            assert leader == "n01" and "n09" in dead, (node_id, leader, dead)
    assert {leader for leader, _ in healed.values()} == {"n09"}
    assert all(dead == set() for _, dead in healed.values()), healed
    assert set(crashed) == set(before) - {"n05"}
    assert all(dead == {"n05"} for _, dead in crashed.values()), crashed
    assert s["partitions"] == 1 and s["crashes"] == 1
