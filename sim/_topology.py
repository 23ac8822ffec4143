"""Topologies: who can hear whom, as a networkx graph of node ids.

Every builder returns an undirected `networkx.Graph` whose nodes are the
simulated node ids (``n01``, ``n02``, ... zero-padded to the count, so that
sorting by id is sorting by number), with a ``pos`` attribute (x, y) where the
shape has a natural drawing, and per-edge link overrides (``latency``,
``loss``, ``bandwidth_kbps``) where the source gives them (an edge list). The
simulator lets two nodes exchange messages, and lets their discovery see each
other, exactly when the graph has an edge between them.

Randomised shapes (random geometric) take a `random.Random` made from the run's
seed, so the same seed gives the same graph in every process.

=============  ==============================================================
kind           keys (besides ``nodes``)
=============  ==============================================================
full           (none): everyone hears everyone
line           (none): n01 - n02 - ... - nN
ring           (none): a line whose ends meet
grid           ``rows`` (default: the largest divisor of nodes <= its root)
star           (none): n01 is the hub
geometric      ``radius`` (0.25), ``connect`` (true): nodes uniform in the
               unit square, an edge when closer than radius; with connect,
               each stray component is joined to the rest by its shortest
               gap, so that every node has some path
clusters       ``clusters`` (3), ``bridges`` (1): full meshes of about
               nodes/clusters, each joined to the next by ``bridges`` edges
               (a chain, or a ring when there are more than two)
edgelist       ``path``: lines ``a b [latency=S] [loss=P] [bandwidth_kbps=K]``
               (``#`` starts a comment); node ids as written; ``nodes`` unused
=============  ==============================================================
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from ._scenario import LinkSpec, ScenarioError, parse_dist


def node_names(count: int) -> list[str]:
    width = max(2, len(str(count)))
    return [f"n{i + 1:0{width}d}" for i in range(count)]


def _relabel(graph: nx.Graph, count: int) -> nx.Graph:
    names = node_names(count)
    mapping = {old: names[i] for i, old in enumerate(sorted(graph.nodes))}
    out = nx.Graph()
    out.add_nodes_from(sorted(mapping.values()))
    for old, new in mapping.items():
        out.nodes[new].update(graph.nodes[old])
    out.add_edges_from(sorted((mapping[a], mapping[b]) for a, b in graph.edges))
    return out


def _circle(graph: nx.Graph) -> None:
    nodes = sorted(graph.nodes)
    for i, n in enumerate(nodes):
        angle = 2 * math.pi * i / max(1, len(nodes))
        graph.nodes[n]["pos"] = (0.5 + 0.45 * math.cos(angle), 0.5 + 0.45 * math.sin(angle))


def build_topology(spec: Mapping[str, Any], rng: random.Random, base_dir: Path = Path(".")) -> nx.Graph:
    """Build the graph a scenario's [topology] table describes.

    Raises:
        ScenarioError: unknown kind, bad keys, or an unreadable edge list.
    """
    kind = spec.get("kind")
    where = "topology"
    allowed = {"kind", "nodes"} | {
        "grid": {"rows"}, "geometric": {"radius", "connect"}, "clusters": {"clusters", "bridges"},
        "edgelist": {"path"},
    }.get(str(kind), set())  # fmt: skip
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {unknown} for kind {kind!r}")
    if kind == "edgelist":
        return _edgelist(spec, base_dir)
    n = spec.get("nodes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScenarioError(f"{where}.nodes: a positive integer, got {n!r}")
    if kind == "full":
        g = nx.complete_graph(n)
        g = _relabel(g, n)
        _circle(g)
    elif kind == "line":
        g = _relabel(nx.path_graph(n), n)
        for i, name in enumerate(sorted(g.nodes)):
            g.nodes[name]["pos"] = (i / max(1, n - 1), 0.5)
    elif kind == "ring":
        g = _relabel(nx.cycle_graph(n), n)
        _circle(g)
    elif kind == "grid":
        rows = spec.get("rows") or max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
        if not isinstance(rows, int) or rows < 1 or n % rows:
            raise ScenarioError(f"{where}.rows: a divisor of nodes ({n}), got {rows!r}")
        cols = n // rows
        base = nx.grid_2d_graph(rows, cols)
        g = nx.Graph()
        index = {(r, c): r * cols + c for r in range(rows) for c in range(cols)}
        g.add_nodes_from(range(n))
        g.add_edges_from((index[a], index[b]) for a, b in base.edges)
        for (r, c), i in index.items():
            g.nodes[i]["pos"] = (c / max(1, cols - 1), r / max(1, rows - 1))
        g = _relabel(g, n)
    elif kind == "star":
        g = _relabel(nx.star_graph(n - 1), n)
        hub, *leaves = sorted(g.nodes)
        g.nodes[hub]["pos"] = (0.5, 0.5)
        for i, leaf in enumerate(leaves):
            angle = 2 * math.pi * i / max(1, len(leaves))
            g.nodes[leaf]["pos"] = (0.5 + 0.45 * math.cos(angle), 0.5 + 0.45 * math.sin(angle))
    elif kind == "geometric":
        radius = spec.get("radius", 0.25)
        if isinstance(radius, bool) or not isinstance(radius, int | float) or radius <= 0:
            raise ScenarioError(f"{where}.radius: a positive number, got {radius!r}")
        g = _geometric(n, float(radius), rng, bool(spec.get("connect", True)))
    elif kind == "clusters":
        g = _clusters(n, spec, rng)
    else:
        raise ScenarioError(f"{where}.kind: unknown kind {kind!r}")
    return g


def _geometric(n: int, radius: float, rng: random.Random, connect: bool) -> nx.Graph:
    pos = {i: (rng.random(), rng.random()) for i in range(n)}
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for i in range(n):
        g.nodes[i]["pos"] = pos[i]
    # A plain double loop (not networkx's own generator) keeps the edges a pure
    # function of the positions, whatever networkx version or numpy is around.
    for i in range(n):
        xi, yi = pos[i]
        for j in range(i + 1, n):
            if (xi - pos[j][0]) ** 2 + (yi - pos[j][1]) ** 2 <= radius * radius:
                g.add_edge(i, j)
    if connect:
        components = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: (-len(c), c[0]))
        joined = set(components[0])
        for comp in components[1:]:
            best = min(
                ((pos[a][0] - pos[b][0]) ** 2 + (pos[a][1] - pos[b][1]) ** 2, a, b)
                for a in comp for b in sorted(joined)
            )  # fmt: skip
            g.add_edge(best[1], best[2])
            joined.update(comp)
    return _relabel(g, n)


def _clusters(n: int, spec: Mapping[str, Any], rng: random.Random) -> nx.Graph:
    k = spec.get("clusters", 3)
    bridges = spec.get("bridges", 1)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ScenarioError(f"topology.clusters: an integer from 1 to nodes, got {k!r}")
    if not isinstance(bridges, int) or bridges < 1:
        raise ScenarioError(f"topology.bridges: a positive integer, got {bridges!r}")
    members = [list(range(i * n // k, (i + 1) * n // k)) for i in range(k)]
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for c, nodes in enumerate(members):
        cx = 0.5 + 0.35 * math.cos(2 * math.pi * c / k) if k > 1 else 0.5
        cy = 0.5 + 0.35 * math.sin(2 * math.pi * c / k) if k > 1 else 0.5
        for j, node in enumerate(nodes):
            angle = 2 * math.pi * j / max(1, len(nodes))
            g.nodes[node]["pos"] = (cx + 0.12 * math.cos(angle), cy + 0.12 * math.sin(angle))
        g.add_edges_from((a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :])
    pairs = [(c, c + 1) for c in range(k - 1)] + ([(k - 1, 0)] if k > 2 else [])
    for a, b in pairs:
        for j in range(bridges):
            left, right = members[a], members[b]
            g.add_edge(left[(len(left) - 1 - j) % len(left)], right[j % len(right)])
    return _relabel(g, n)


def _edgelist(spec: Mapping[str, Any], base_dir: Path) -> nx.Graph:
    path = spec.get("path")
    if not isinstance(path, str):
        raise ScenarioError("topology.path: the edge list file (relative to the scenario)")
    full = (base_dir / path) if not Path(path).is_absolute() else Path(path)
    try:
        text = full.read_text()
    except OSError as exc:
        raise ScenarioError(f"topology.path: cannot read {full}: {exc.strerror}") from exc
    g = nx.Graph()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{full.name}:{lineno}"
        if len(parts) == 1:
            g.add_node(parts[0])
            continue
        a, b, *attrs = parts
        if a == b:
            raise ScenarioError(f"{where}: a node cannot link to itself")
        overrides: dict[str, Any] = {}
        for attr in attrs:
            key, sep, value = attr.partition("=")
            if not sep or key not in ("latency", "loss", "bandwidth_kbps"):
                raise ScenarioError(f"{where}: expected latency=, loss= or bandwidth_kbps=, got {attr!r}")
            try:
                overrides[key] = float(value)
            except ValueError as exc:
                raise ScenarioError(f"{where}: {key} must be a number") from exc
        g.add_edge(a, b)
        if overrides:
            g.edges[a, b]["link"] = LinkSpec(
                parse_dist(overrides["latency"], f"{where}.latency") if "latency" in overrides else None,
                overrides.get("loss"), overrides.get("bandwidth_kbps"),
            )  # fmt: skip
    if g.number_of_nodes() == 0:
        raise ScenarioError(f"topology.path: {full} lists no nodes")
    out = nx.Graph()
    out.add_nodes_from(sorted(g.nodes))
    out.add_edges_from(sorted((min(a, b), max(a, b), d) for a, b, d in g.edges(data=True)))
    return out


def layout(graph: nx.Graph, seed: int) -> dict[str, tuple[float, float]]:
    """Positions for drawing: the graph's own, else a seeded spring layout."""
    if all("pos" in graph.nodes[n] for n in graph.nodes):
        return {n: tuple(graph.nodes[n]["pos"]) for n in graph.nodes}
    return {n: tuple(p) for n, p in nx.spring_layout(graph, seed=seed % (2**32)).items()}


def hop_counts(graph: nx.Graph, sources: list[str]) -> dict[str, dict[str, int]]:
    """Shortest-path hop counts from each source (for delay-by-distance metrics)."""
    return {s: dict(nx.single_source_shortest_path_length(graph, s)) for s in sorted(set(sources))}
