"""The simulator's parts on their own: scenarios, topologies, the network's links, uplink schedules, CLI."""

from __future__ import annotations

import random
from pathlib import Path

import networkx as nx
import pytest
import trio
import trio.testing

from meshnode._transport import RequestTimeout
from sim import Dist, LinkSpec, ScenarioError, SimNetwork, UplinkSchedule, build_topology, load_scenario, parse_scenario
from sim._scenario import UplinkSpec, apply_overrides, parse_dist
from sim.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_example_scenarios_load():
    for path in sorted((ROOT / "sim" / "scenarios").glob("*.toml")):
        scenario = load_scenario(path)
        assert scenario.duration > 0, path


def test_scenario_errors_name_the_key():
    base = {"duration": 10, "topology": {"kind": "line", "nodes": 3}}
    parse_scenario(base)
    with pytest.raises(ScenarioError, match="network.loss"):
        parse_scenario(apply_overrides(base, {"network.loss": 2}))
    with pytest.raises(ScenarioError, match="topology.kind"):
        parse_scenario(apply_overrides(base, {"topology.kind": "blob"}))
    with pytest.raises(ScenarioError, match=r"node.fanotu"):
        parse_scenario(apply_overrides(base, {"node.fanotu": 3}))
    with pytest.raises(ScenarioError, match="workload.session_minutes"):
        parse_scenario(apply_overrides(base, {"workload.session_minutes": {"dist": "uniform", "low": 1}}))


def test_distributions_sample_by_quantile():
    assert parse_dist(0.5, "x").sample(0.9) == 0.5
    u = parse_dist({"dist": "uniform", "low": 1, "high": 3}, "x")
    assert u.sample(0.5) == pytest.approx(2.0)
    ln = parse_dist({"dist": "lognormal", "median": 0.02, "sigma": 0.5}, "x")
    assert ln.sample(0.5) == pytest.approx(0.02)
    ex = Dist("exponential", 10.0)
    assert ex.sample(1 - 1 / 2.718281828459045) == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize(
    "spec, nodes, edges",
    [
        ({"kind": "full", "nodes": 5}, 5, 10),
        ({"kind": "line", "nodes": 5}, 5, 4),
        ({"kind": "ring", "nodes": 5}, 5, 5),
        ({"kind": "grid", "nodes": 12, "rows": 3}, 12, 17),
        ({"kind": "star", "nodes": 6}, 6, 5),
        ({"kind": "clusters", "nodes": 9, "clusters": 3, "bridges": 1}, 9, 12),
    ],
)
def test_topologies(spec, nodes, edges):
    g = build_topology(spec, random.Random(1))
    assert g.number_of_nodes() == nodes and g.number_of_edges() == edges
    assert nx.is_connected(g)
    assert sorted(g.nodes) == [f"n{i:02d}" for i in range(1, nodes + 1)]


def test_geometric_topology_is_seeded_and_connected():
    spec = {"kind": "geometric", "nodes": 60, "radius": 0.12}
    a = build_topology(spec, random.Random("7:topology"))
    b = build_topology(spec, random.Random("7:topology"))
    c = build_topology(spec, random.Random("8:topology"))
    assert sorted(a.edges) == sorted(b.edges) != sorted(c.edges)
    assert nx.is_connected(a) and nx.is_connected(c)


def test_edge_list_topology(tmp_path):
    (tmp_path / "site.edges").write_text("# a site\na b latency=0.1\nb c loss=0.5\nd\n")
    g = build_topology({"kind": "edgelist", "path": "site.edges"}, random.Random(1), tmp_path)
    assert sorted(g.nodes) == ["a", "b", "c", "d"]
    assert g.edges["b", "c"]["link"].loss == 0.5
    assert g.edges["a", "b"]["link"].latency.sample(0.3) == 0.1


def test_uplink_schedules():
    assert UplinkSchedule.build(UplinkSpec("up"), 100, random.Random(1)).up(50)
    assert not UplinkSchedule.build(UplinkSpec("down"), 100, random.Random(1)).up(50)
    windows = UplinkSchedule.build(UplinkSpec("windows", down=((10.0, 20.0),)), 100, random.Random(1))
    assert windows.up(9.9) and not windows.up(10) and windows.up(20)
    flap = UplinkSchedule.build(
        UplinkSpec("flapping", Dist("constant", 30), Dist("constant", 10)), 100, random.Random(1)
    )
    assert flap.down == [(30.0, 40.0), (70.0, 80.0)]


async def test_network_latency_bandwidth_loss_and_partitions(autojump_clock):
    """Virtual time of a request over one link; silence out of range and across a cut."""
    addresses = {"n1": "10.0.0.1:5683", "n2": "10.0.0.2:5683", "n3": "10.0.0.3:5683"}
    net = SimNetwork(1, addresses, [("n1", "n2"), ("n2", "n3")],
                     LinkSpec(Dist("constant", 0.1), 0.0, 8.0))  # 8 kbit/s: 1000 bytes take 1 s  # fmt: skip

    async def echo(payload: bytes, remote: str) -> bytes:
        return payload

    async with net.transport(addresses["n1"]) as t1, net.transport(addresses["n2"]) as t2, \
            net.transport(addresses["n3"]) as t3:  # fmt: skip
        for t in (t1, t2, t3):
            t.route("/echo", echo)
        start = trio.current_time()
        assert await t1.request(addresses["n2"], "/echo", b"x" * 1000) == b"x" * 1000
        assert trio.current_time() - start == pytest.approx(2 * (0.1 + 1.0))
        with pytest.raises(RequestTimeout):  # no edge n1-n3
            await t1.request(addresses["n3"], "/echo", b"hi", timeout=1.0)
        net.partition([["n1"], ["n2", "n3"]])
        with pytest.raises(RequestTimeout):
            await t1.request(addresses["n2"], "/echo", b"hi", timeout=1.0)
        assert await t2.request(addresses["n3"], "/echo", b"hi") == b"hi"
        net.heal()
        assert await t1.request(addresses["n2"], "/echo", b"hi") == b"hi"
    assert net.total.undeliverable == 2


async def test_network_loss_rate_and_fate_depend_on_the_message_not_the_order(autojump_clock):
    addresses = {"n1": "10.0.0.1:5683", "n2": "10.0.0.2:5683"}

    def fates(order):
        net = SimNetwork(3, addresses, [("n1", "n2")], LinkSpec(Dist("uniform", 0.0, 1.0), 0.3, 1000.0))
        return {payload: net._fate("a", "b", "/x", payload, False) for payload in order}

    payloads = [bytes([i]) * 10 for i in range(200)]
    forward, backward = fates(payloads), fates(list(reversed(payloads)))
    assert forward == backward
    lost = sum(1 for u, _ in forward.values() if u < 0.3)
    assert 40 < lost < 80


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "meshsim" in capsys.readouterr().out
    assert main([]) == 2
    assert "run" in capsys.readouterr().out


def test_cli_reports_a_bad_scenario(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('duration = 10\n[topology]\nkind = "line"\nnodes = 3\n[network]\nloss = 7\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "network.loss" in capsys.readouterr().err


def test_cli_run_writes_results_and_plots(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'name = "tiny"\nduration = 120\ndrain = 60\n[topology]\nkind = "star"\nnodes = 4\n'
        '[uplink]\nnodes = ["n01"]\n[workload]\nchargers = ["n02"]\nsessions_per_hour = 60\n'
        "session_minutes = 1\nmeter_interval = 20\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(scenario), "--seed", "4", "--out", str(out), "--quiet"]) == 0
    for name in ("summary.json", "timeseries.csv", "convergence_cdf.png", "traffic.png", "topology.png", "run.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "topology.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
