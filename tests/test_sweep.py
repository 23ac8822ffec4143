"""`meshsim sweep` on Dask distributed: the same table as a serial run of the same seeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim._sweep import parse_params, sweep
from tests.procs import free_port

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


def _sweep_cli(out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`meshsim sweep` as a user runs it, in its own process: Dask's event loop must not share a
    process whose asyncio policy trio-asyncio has replaced (earlier tests in this one)."""
    args = [sys.executable, "-m", "sim.cli", "sweep", str(SCENARIO), *(a for p in PARAMS for a in ("--param", p))]
    return subprocess.run(
        [*args, "--seeds", "2", "--out", str(out), *extra], capture_output=True, text=True, timeout=timeout
    )


def test_a_local_two_worker_cluster_gives_the_serial_table(tmp_path: Path, serial_table: str) -> None:
    out = _sweep_cli(tmp_path, "--jobs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "on a local Dask cluster of 2 worker processes" in out.stderr
    assert (tmp_path / "sweep.csv").read_text() == serial_table
    # every run's own files were written by the client from the workers' results
    assert len(list(tmp_path.glob("*/seed-*/summary.json"))) == 4


def test_a_running_scheduler_gives_the_serial_table(tmp_path: Path, serial_table: str) -> None:
    """`--scheduler tcp://...`: the runs go to a cluster started elsewhere, here by the `dask` CLI
    (a scheduler and a worker process with two single-threaded workers), as docs/sim.md shows."""
    port = free_port("127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1",
         "--no-dashboard", "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out = _sweep_cli(tmp_path, "--scheduler", address)
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
        for proc in (worker, scheduler):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"on the Dask cluster at {address}" in out.stderr
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
