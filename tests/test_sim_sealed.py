"""A sealed (enrolled) site in the simulator: every node has a certificate from the
seeded site and seals all its mesh traffic (`sealed = true`); it converges, and a
seed gives the same run every time (certificates, nonces and the cloud's actors
come from the seed through seams, nothing is patched)."""

from __future__ import annotations

import json

from sim import Simulation, parse_scenario

SEALED = {
    "name": "sealed",
    "duration": 40,
    "drain": 60,
    "sample_interval": 5,
    "sealed": True,
    "topology": {"kind": "line", "nodes": 4},
    "network": {"latency": 0.05, "loss": 0.05},
    "uplink": {"nodes": ["n01"]},
    "workload": {"chargers": "all", "sessions_per_hour": 180, "connectors": 1, "session_minutes": 1,
                 "meter_interval": 5},
}  # fmt: skip


def _run(seed: int, **changes: object) -> tuple[dict, Simulation]:
    sim = Simulation(parse_scenario({**SEALED, **changes}), seed)
    return sim.run().summary, sim


def _mesh(summary: dict) -> str:
    """The summary without the uplink's request counters: in this scenario the
    forwarder makes one cloud request more or less from run to run, sealed or not,
    and did so before the simulator's cloud ran through seams (an open question
    for the simulator); everything the mesh did is compared."""
    return json.dumps({k: v for k, v in summary.items() if k != "cloud"}, sort_keys=True)


def test_a_sealed_simulated_site_converges_and_is_reproducible_by_seed():
    one, sim = _run(3)
    assert one["events"] > 20
    assert one["events_lost"] == 0 and one["convergence_s"]["not_converged"] == 0
    assert one["events_not_in_cloud"] == 0 and one["sessions_billed_twice"] == 0
    # Sealed for real: every node ran enrolled, opened what it received, refused nothing.
    for slot in sim.slots.values():
        node = slot.last_node
        assert node is not None and node.sealer is not None and node.identity is not None
        assert not node.sealer.refused
    assert one["cloud"]["requests"] > 0
    two, _ = _run(3)
    assert _mesh(one) == _mesh(two)
    other, _ = _run(4)
    assert _mesh(other) != _mesh(one)
    # Sealing is real: unsealed, the same seed puts fewer bytes on the wire.
    plain, _ = _run(3, sealed=False)
    assert plain["bytes"] < one["bytes"]
