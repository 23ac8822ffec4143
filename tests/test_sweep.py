"""`meshsim sweep` on Dask distributed: the same table as a serial run of the same seeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim._sweep import parse_params, sweep

SCENARIO = Path(__file__).resolve().parent.parent / "sim" / "scenarios" / "line10.toml"
# A small grid with real work in it: sessions start and meter within the run, under loss.
PARAMS = [
    "duration=60",
    "drain=40",
    "workload.sessions_per_hour=600",
    "workload.meter_interval=10",
    "topology.nodes=3",
    "network.loss=0,0.2",
]


def _serial(out: Path) -> str:
    return sweep(SCENARIO, parse_params(PARAMS), 2, out, serial=True, report=lambda _: None, progress=False).read_text()


@pytest.fixture(scope="module")
def serial_table(tmp_path_factory: pytest.TempPathFactory) -> str:
    table = _serial(tmp_path_factory.mktemp("serial"))
    rows = [line.split(",") for line in table.splitlines()]
    header = rows[0]
    events = [int(r[header.index("events")]) for r in rows[1:]]
    assert len(rows) == 1 + 2 * 2 and all(e > 0 for e in events), table  # the runs did something
    return table


def test_a_local_two_worker_cluster_gives_the_serial_table(tmp_path: Path, serial_table: str) -> None:
    lines: list[str] = []
    table = sweep(SCENARIO, parse_params(PARAMS), 2, tmp_path, jobs=2, report=lines.append, progress=False)
    assert table.read_text() == serial_table
    assert "a local Dask cluster of 2 worker processes" in lines[0]
    # every run's own files were written by the client from the workers' results
    assert len(list(tmp_path.glob("*/seed-*/summary.json"))) == 4


def test_a_running_scheduler_gives_the_serial_table(tmp_path: Path, serial_table: str) -> None:
    """`--scheduler tcp://...`: the runs go to a cluster started elsewhere (here: in this test)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        out = subprocess.run(
            [sys.executable, "-m", "sim.cli", "sweep", str(SCENARIO), *(a for p in PARAMS for a in ("--param", p)),
             "--seeds", "2", "--out", str(tmp_path), "--scheduler", address],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"the Dask cluster at {address}" in out.stderr
    assert "4/4" in out.stderr  # the progress bar reached the end
    assert (tmp_path / "sweep.csv").read_text() == serial_table
    assert out.stdout == serial_table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--serial", "--scheduler", "tcp://127.0.0.1:1"], "exclude each other"),
        (["--param", "network.loss"], "expected NAME=V1,V2"),
        (["--param", "network.nonsense=1"], "nonsense"),
    ],
)
def test_bad_sweep_arguments_are_refused_with_a_message(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sim.cli", "sweep", str(SCENARIO), "--seeds", "1", "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "sweep.csv").exists()
