"""Scenarios: what to simulate, read from TOML (see docs/sim.md for every key).

A scenario is plain data: the topology, the network's links, the uplinks and
their schedules, the workload of the chargers, the faults, and how long to run.
It is parsed once into frozen dataclasses so that a typo fails at load time
with the key's dotted name, not an hour into a run. `apply_overrides` changes
keys by dotted name before parsing (`meshsim run --set`, `meshsim sweep
--param`), so a sweep can vary anything a scenario file can say.

Distributions (latency, session length, outage length) are written as a
number (a constant) or a table with a `dist` key:

==============  ======================================  ==========================
dist            parameters                              sample
==============  ======================================  ==========================
constant        value                                   value
uniform         low, high                               low + u * (high - low)
normal          mean, sd                                clipped at 0
lognormal       median, sigma                           median * exp(sigma * z)
exponential     mean                                    -mean * ln(1 - u)
==============  ======================================  ==========================

Every distribution samples by inverse transform from one uniform number, so a
caller that owns its randomness (a hash of a message, a per-charger
`random.Random`) decides exactly which number is drawn.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

_STANDARD_NORMAL = NormalDist()


class ScenarioError(ValueError):
    """A scenario file or override that cannot be used; the message names the key."""


# --- distributions --------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """A distribution of non-negative numbers, sampled by inverse transform."""

    kind: str = "constant"
    a: float = 0.0
    b: float = 0.0

    def sample(self, u: float) -> float:
        """The value at quantile `u` (0 <= u < 1)."""
        u = min(max(u, 1e-12), 1.0 - 1e-12)
        if self.kind == "constant":
            return self.a
        if self.kind == "uniform":
            return self.a + u * (self.b - self.a)
        if self.kind == "normal":
            return max(0.0, self.a + self.b * _STANDARD_NORMAL.inv_cdf(u))
        if self.kind == "lognormal":
            return self.a * math.exp(self.b * _STANDARD_NORMAL.inv_cdf(u))
        if self.kind == "exponential":
            return -self.a * math.log(1.0 - u)
        raise AssertionError(self.kind)

    @property
    def mean(self) -> float:
        if self.kind == "constant":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "normal":
            return self.a
        if self.kind == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        return self.a

    def describe(self) -> str:
        if self.kind == "constant":
            return f"{self.a:g}"
        names = {"uniform": ("low", "high"), "normal": ("mean", "sd"), "lognormal": ("median", "sigma"),
                 "exponential": ("mean", None)}[self.kind]  # fmt: skip
        parts = [f"{names[0]}={self.a:g}"] + ([f"{names[1]}={self.b:g}"] if names[1] else [])
        return f"{self.kind}({', '.join(parts)})"


_DIST_PARAMS = {
    "constant": ("value", None),
    "uniform": ("low", "high"),
    "normal": ("mean", "sd"),
    "lognormal": ("median", "sigma"),
    "exponential": ("mean", None),
}


def parse_dist(value: Any, where: str) -> Dist:
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected a number or a distribution table, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ScenarioError(f"{where}: must not be negative")
        return Dist("constant", float(value))
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}: expected a number or a distribution table, got {value!r}")
    kind = value.get("dist")
    if kind not in _DIST_PARAMS:
        raise ScenarioError(f"{where}.dist: one of {', '.join(_DIST_PARAMS)}, got {kind!r}")
    first, second = _DIST_PARAMS[kind]
    allowed = {"dist", first} | ({second} if second else set())
    unknown = set(value) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)} for dist {kind!r}")
    a = _number(value, first, where, None)
    b = _number(value, second, where, None) if second else 0.0
    if kind == "uniform" and b < a:
        raise ScenarioError(f"{where}: high must not be below low")
    return Dist(kind, a, b)


def _number(table: Mapping[str, Any], key: str, where: str, default: float | None, *, minimum: float = 0.0) -> float:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ScenarioError(f"{where}.{key}: expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def _int(table: Mapping[str, Any], key: str, where: str, default: int | None, *, minimum: int = 0) -> int:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScenarioError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


# --- the parts of a scenario --------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """How one link (or the default link) behaves. None means: as the default."""

    latency: Dist | None = None
    """One-way latency in seconds."""
    loss: float | None = None
    """Probability that one message (a request or a response) is lost."""
    bandwidth_kbps: float | None = None
    """A message of n bytes takes n * 8 / (bandwidth_kbps * 1000) seconds to cross, on top of latency."""


DEFAULT_LINK = LinkSpec(latency=Dist("lognormal", 0.01, 0.5), loss=0.0, bandwidth_kbps=1000.0)


@dataclass(frozen=True)
class UplinkSpec:
    """One node's path to the cloud over time."""

    mode: str = "up"
    """up, down, flapping (alternating random up and down spells) or windows (down in listed intervals)."""
    up_s: Dist = Dist("exponential", 120.0)
    down_s: Dist = Dist("exponential", 60.0)
    down: tuple[tuple[float, float], ...] = ()
    latency: Dist | None = None


@dataclass(frozen=True)
class CrashSpec:
    node: str
    """A node id, "leader" (the leader most nodes see at that moment), "random" or "uplink"."""
    at: float
    down_for: float | None
    """Seconds until the node restarts; None: it stays down until the workload ends."""
    wipe: bool = False


@dataclass(frozen=True)
class ChurnSpec:
    crashes_per_hour: float = 0.0
    down_s: Dist = Dist("exponential", 60.0)
    wipe_fraction: float = 0.0


@dataclass(frozen=True)
class PartitionSpec:
    at: float
    heal: float | None
    groups: tuple[tuple[str, ...], ...] = ()
    split: str | None = None
    """"halves": by x position (or by id when the topology has no positions)."""


@dataclass(frozen=True)
class JoinSpec:
    node: str
    at: float


@dataclass(frozen=True)
class WorkloadSpec:
    chargers: Any = "all"
    """"all", an integer (that many nodes, picked with the seed), or a list of node ids."""
    sessions_per_hour: float = 1.0
    """Poisson arrivals per charger while a connector is free."""
    connectors: int = 1
    session_minutes: Dist = Dist("uniform", 20.0, 90.0)
    meter_interval: float = 60.0
    power_kw: Dist = Dist("uniform", 7.0, 22.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    site: str
    duration: float
    """Seconds of workload and faults."""
    drain: float
    """At most this many seconds more, with the faults over and no new sessions, for the mesh to settle."""
    sample_interval: float
    topology: Mapping[str, Any]
    network: LinkSpec
    links: tuple[tuple[str, str, LinkSpec], ...]
    node: Mapping[str, Any]
    uplink_nodes: Any
    uplink_default: UplinkSpec
    uplink_latency: Dist
    uplinks: Mapping[str, UplinkSpec]
    workload: WorkloadSpec | None
    crashes: tuple[CrashSpec, ...]
    churn: ChurnSpec | None
    partitions: tuple[PartitionSpec, ...]
    joins: tuple[JoinSpec, ...]
    sealed: bool = False
    """An enrolled site: every node has a certificate and seals its traffic (keys from the seed)."""
    base_dir: Path = field(default=Path("."))
    raw: Mapping[str, Any] = field(default_factory=dict)


NODE_KEYS = {
    "gossip_interval": float, "fanout": int, "suspect_after": float, "dead_after": float,
    "request_timeout": float, "max_sync_rounds": int, "probe_interval": float, "leader_threshold": int,
    "retention": float, "push_interval": float, "neighbour_ttl": float, "idle_interval": float,
    "detector": str,
}  # fmt: skip
"""NodeConfig fields a scenario may set in [node] (everything else the simulator decides)."""

DETECTORS = ("heartbeat", "swim")
"""`node.detector`: the node's failure detectors (docs/membership.md)."""

TOPOLOGY_KINDS = ("full", "line", "ring", "grid", "star", "geometric", "clusters", "edgelist")
_TOP_KEYS = {"name", "description", "site", "duration", "drain", "sample_interval", "topology", "network",
             "node", "uplink", "workload", "faults", "sealed"}  # fmt: skip


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {unknown} (allowed: {', '.join(sorted(allowed))})")


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}{key}: expected a table")
    return value


def _link(table: Mapping[str, Any], where: str, extra: set[str] = frozenset()) -> LinkSpec:  # type: ignore[assignment]
    _check_keys(table, {"latency", "loss", "bandwidth_kbps"} | set(extra), where)
    latency = parse_dist(table["latency"], f"{where}.latency") if "latency" in table else None
    loss = _number(table, "loss", where, None) if "loss" in table else None
    if loss is not None and loss > 1:
        raise ScenarioError(f"{where}.loss: a probability, 0 to 1")
    bw = _number(table, "bandwidth_kbps", where, None, minimum=1e-9) if "bandwidth_kbps" in table else None
    return LinkSpec(latency, loss, bw)


def _uplink(table: Mapping[str, Any], where: str, base: UplinkSpec) -> UplinkSpec:
    _check_keys(table, {"mode", "up_s", "down_s", "down", "latency"}, where)
    mode = table.get("mode", base.mode)
    if mode not in ("up", "down", "flapping", "windows"):
        raise ScenarioError(f"{where}.mode: up, down, flapping or windows, got {mode!r}")
    windows = []
    for i, w in enumerate(table.get("down", base.down)):
        if (
            not (isinstance(w, list | tuple) and len(w) == 2 and all(isinstance(x, int | float) for x in w))
            or w[1] < w[0]
        ):
            raise ScenarioError(f"{where}.down[{i}]: expected [start, end] seconds")
        windows.append((float(w[0]), float(w[1])))
    if mode == "windows" and not windows:
        raise ScenarioError(f"{where}: mode windows needs down = [[start, end], ...]")
    return UplinkSpec(
        mode=mode,
        up_s=parse_dist(table["up_s"], f"{where}.up_s") if "up_s" in table else base.up_s,
        down_s=parse_dist(table["down_s"], f"{where}.down_s") if "down_s" in table else base.down_s,
        down=tuple(windows),
        latency=parse_dist(table["latency"], f"{where}.latency") if "latency" in table else base.latency,
    )


def parse_scenario(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> Scenario:
    """Check and parse a scenario's TOML data.

    Raises:
        ScenarioError: unknown or ill-typed keys, with the key's dotted name.
    """
    _check_keys(raw, _TOP_KEYS, "scenario")
    name = str(raw.get("name", "scenario"))
    duration = _number(raw, "duration", "scenario", None, minimum=1.0)
    drain = _number(raw, "drain", "scenario", 600.0)
    sample = _number(raw, "sample_interval", "scenario", 5.0, minimum=0.01)

    topology = dict(_table(raw, "topology", ""))
    kind = topology.get("kind")
    if kind not in TOPOLOGY_KINDS:
        raise ScenarioError(f"topology.kind: one of {', '.join(TOPOLOGY_KINDS)}, got {kind!r}")

    network_raw = _table(raw, "network", "")
    network = _link({k: v for k, v in network_raw.items() if k != "links"}, "network")
    network = LinkSpec(
        network.latency or DEFAULT_LINK.latency,
        network.loss if network.loss is not None else DEFAULT_LINK.loss,
        network.bandwidth_kbps or DEFAULT_LINK.bandwidth_kbps,
    )
    links = []
    for i, entry in enumerate(network_raw.get("links", [])):
        where = f"network.links[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("a"), str) or not isinstance(entry.get("b"), str):
            raise ScenarioError(f"{where}: expected a table with node ids a and b")
        rest = {k: v for k, v in entry.items() if k not in ("a", "b")}
        links.append((entry["a"], entry["b"], _link(rest, where)))

    node = dict(_table(raw, "node", ""))
    for key, value in node.items():
        kind_ = NODE_KEYS.get(key)
        if kind_ is None:
            raise ScenarioError(f"node.{key}: not a setting the simulator passes on (allowed: {', '.join(NODE_KEYS)})")
        if kind_ is str:
            if value not in DETECTORS:
                raise ScenarioError(f"node.{key}: one of {', '.join(DETECTORS)}")
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind_ is int and not isinstance(value, int))
        ):
            raise ScenarioError(f"node.{key}: expected a{'n integer' if kind_ is int else ' number'}")

    uplink_raw = _table(raw, "uplink", "")
    _check_keys(uplink_raw, {"nodes", "mode", "up_s", "down_s", "down", "latency", "schedule"}, "uplink")
    uplink_nodes = uplink_raw.get("nodes", [])
    if not (isinstance(uplink_nodes, int) and not isinstance(uplink_nodes, bool)) and not (
        isinstance(uplink_nodes, list) and all(isinstance(n, str) for n in uplink_nodes)
    ):
        raise ScenarioError("uplink.nodes: an integer count or a list of node ids")
    default_uplink = _uplink({k: v for k, v in uplink_raw.items() if k not in ("nodes", "schedule", "latency")},
                             "uplink", UplinkSpec())  # fmt: skip
    uplink_latency = parse_dist(
        uplink_raw.get("latency", {"dist": "uniform", "low": 0.03, "high": 0.08}), "uplink.latency"
    )
    schedule = _table(uplink_raw, "schedule", "uplink.")
    uplinks = {n: _uplink(t, f"uplink.schedule.{n}", default_uplink) for n, t in sorted(schedule.items())}

    workload = None
    if "workload" in raw:
        w = _table(raw, "workload", "")
        _check_keys(w, {"chargers", "sessions_per_hour", "connectors", "session_minutes", "meter_interval", "power_kw"},
                    "workload")  # fmt: skip
        chargers = w.get("chargers", "all")
        if not (chargers == "all" or (isinstance(chargers, int) and not isinstance(chargers, bool))
                or (isinstance(chargers, list) and all(isinstance(c, str) for c in chargers))):  # fmt: skip
            raise ScenarioError('workload.chargers: "all", an integer count or a list of node ids')
        workload = WorkloadSpec(
            chargers=chargers,
            sessions_per_hour=_number(w, "sessions_per_hour", "workload", 1.0),
            connectors=_int(w, "connectors", "workload", 1, minimum=1),
            session_minutes=parse_dist(
                w.get("session_minutes", {"dist": "uniform", "low": 20, "high": 90}), "workload.session_minutes"
            ),  # fmt: skip
            meter_interval=_number(w, "meter_interval", "workload", 60.0, minimum=0.1),
            power_kw=parse_dist(w.get("power_kw", {"dist": "uniform", "low": 7, "high": 22}), "workload.power_kw"),
        )

    faults = _table(raw, "faults", "")
    _check_keys(faults, {"crash", "churn", "partition", "join"}, "faults")
    crashes = []
    for i, c in enumerate(faults.get("crash", [])):
        where = f"faults.crash[{i}]"
        _check_keys(c, {"node", "at", "down_for", "wipe"}, where)
        if not isinstance(c.get("node"), str):
            raise ScenarioError(f'{where}.node: a node id, "leader", "random" or "uplink"')
        crashes.append(CrashSpec(
            c["node"], _number(c, "at", where, None),
            _number(c, "down_for", where, None) if "down_for" in c else None, bool(c.get("wipe", False)),
        ))  # fmt: skip
    churn = None
    if "churn" in faults:
        c = faults["churn"]
        _check_keys(c, {"crashes_per_hour", "down_s", "wipe_fraction"}, "faults.churn")
        churn = ChurnSpec(
            _number(c, "crashes_per_hour", "faults.churn", 0.0),
            parse_dist(c.get("down_s", 60.0), "faults.churn.down_s"),
            _number(c, "wipe_fraction", "faults.churn", 0.0),
        )
    partitions = []
    for i, p in enumerate(faults.get("partition", [])):
        where = f"faults.partition[{i}]"
        _check_keys(p, {"at", "heal", "groups", "split", "isolate"}, where)
        groups: list[tuple[str, ...]] = [tuple(g) for g in p.get("groups", [])]
        if "isolate" in p:
            groups.append(tuple(p["isolate"]))
        split = p.get("split")
        if split not in (None, "halves"):
            raise ScenarioError(f'{where}.split: "halves", got {split!r}')
        if not groups and split is None:
            raise ScenarioError(f"{where}: give groups, isolate or split")
        at = _number(p, "at", where, None)
        heal = _number(p, "heal", where, None) if "heal" in p else None
        if heal is not None and heal < at:
            raise ScenarioError(f"{where}.heal: before at")
        partitions.append(PartitionSpec(at, heal, tuple(groups), split))
    joins = []
    for i, j in enumerate(faults.get("join", [])):
        where = f"faults.join[{i}]"
        _check_keys(j, {"node", "at"}, where)
        if not isinstance(j.get("node"), str):
            raise ScenarioError(f"{where}.node: a node id")
        joins.append(JoinSpec(j["node"], _number(j, "at", where, None)))

    return Scenario(
        name=name, description=str(raw.get("description", "")), site=str(raw.get("site", name)),
        duration=duration, drain=drain, sample_interval=sample, topology=topology, network=network,
        links=tuple(links), node=node, uplink_nodes=uplink_nodes, uplink_default=default_uplink,
        uplink_latency=uplink_latency, uplinks=uplinks, workload=workload, crashes=tuple(crashes), churn=churn,
        partitions=tuple(partitions), joins=tuple(joins), base_dir=base_dir, raw=raw, sealed=_sealed(raw),
    )  # fmt: skip


def _sealed(raw: Mapping[str, Any]) -> bool:
    sealed = raw.get("sealed", False)
    if not isinstance(sealed, bool):
        raise ScenarioError(f"sealed: true or false, got {sealed!r}")
    return sealed


def parse_value(text: str) -> Any:
    """A command-line value: TOML syntax when it parses (1, 0.5, true, [..], {..}), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys set, e.g. {"network.loss": 0.2, "topology.nodes": 50}."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        table: dict[str, Any] = out
        for part in parts[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ScenarioError(f"{dotted}: {part} is not a table")
            table = nxt
        table[parts[-1]] = value
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read a scenario file, apply dotted overrides, and parse it."""
    raw = apply_overrides(load_raw(path), overrides or {})
    return parse_scenario(raw, Path(path).resolve().parent)
