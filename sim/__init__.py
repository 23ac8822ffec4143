"""Deterministic simulator that runs the node's real code on a simulated network.

`Simulation(scenario, seed).run()` runs many real `meshnode.Node`s in one trio
run under a virtual clock (`VirtualClock`: trio's autojumping `MockClock`, cheaper), on a `SimNetwork` shaped by a networkx topology, with an
in-process reference cloud behind simulated uplinks, and returns a `RunResult`
whose `summary` is byte-for-byte the same for the same scenario and seed.
The command line is `meshsim` (`sim.cli`); the scenario format and the metrics
are described in docs/sim.md.
"""

import importlib.util

_MISSING = [name for name in ("networkx", "matplotlib") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ModuleNotFoundError(
        f"the simulator needs {' and '.join(_MISSING)}, which the node does not: pip install 'meshnode[sim]'",
        name=_MISSING[0],
    )

from ._cloud import CLOUD_URL, SimCloud, UplinkSchedule, UplinkTransport, open_sim_cloud
from ._metrics import Metrics, percentile
from ._network import Link, SimNetwork, TrafficCounters
from ._runner import EPOCH, RunResult, Simulation
from ._scenario import (
    Dist,
    LinkSpec,
    Scenario,
    ScenarioError,
    apply_overrides,
    load_raw,
    load_scenario,
    parse_dist,
    parse_scenario,
)
from ._topology import build_topology, node_names

__all__ = [
    "CLOUD_URL", "EPOCH", "Dist", "Link", "LinkSpec", "Metrics", "RunResult", "Scenario",
    "ScenarioError", "SimCloud", "SimNetwork", "Simulation", "TrafficCounters", "UplinkSchedule",
    "UplinkTransport", "apply_overrides", "build_topology", "load_raw", "load_scenario", "node_names",
    "open_sim_cloud", "parse_dist", "parse_scenario", "percentile",
]  # fmt: skip
