"""`meshsim sweep`: one scenario over a grid of parameter values and seeds, on a Dask cluster.

Each grid point and seed is an independent run (runs share nothing, and each is reproducible on
its own, so the table does not depend on how the runs were spread over the workers: a serial run
of the same seeds gives the same `sweep.csv`). The runs go to Dask distributed: a local cluster
of worker processes on this machine by default, or an existing cluster with `--scheduler
tcp://HOST:8786` (docs/sim.md). The client parses the scenario and sends it whole, and the
workers send back each run's result, so workers need the package (`meshnode[sim]`) but not the
scenario file or the output directory. Rows come out in grid order, then seed order.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._scenario import Scenario, ScenarioError, load_scenario, parse_value

if TYPE_CHECKING:
    from ._runner import RunResult

COLUMNS = (
    ("nodes", ("nodes",)),
    ("events", ("events",)),
    ("events_lost", ("events_lost",)),
    ("events_not_in_cloud", ("events_not_in_cloud",)),
    ("sessions", ("sessions",)),
    ("sessions_billed_twice", ("sessions_billed_twice",)),
    ("convergence_p50", ("convergence_s", "p50")),
    ("convergence_p95", ("convergence_s", "p95")),
    ("convergence_max", ("convergence_s", "max")),
    ("not_converged", ("convergence_s", "not_converged")),
    ("receipt_p50", ("receipt_latency_s", "p50")),
    ("receipt_p95", ("receipt_latency_s", "p95")),
    ("messages_per_event", ("messages_per_event",)),
    ("bytes_per_node_per_s", ("bytes_per_node_per_s",)),
    ("leader_changes", ("leader_changes",)),
)


def parse_params(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """["network.loss=0,0.1"] -> [("network.loss", [0, 0.1])]."""
    out = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name or not values:
            raise ScenarioError(f"--param {spec!r}: expected NAME=V1,V2,...")
        out.append((name.strip(), [parse_value(v.strip()) for v in values.split(",")]))
    return out


def simulate(scenario: Scenario, seed: int) -> RunResult:
    """One run, on whichever worker (or in this process for a serial sweep)."""
    from ._runner import Simulation

    return Simulation(scenario, seed).run()


def _get(summary: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def sweep(
    path: str | Path,
    params: list[tuple[str, list[Any]]],
    seeds: int,
    out: Path,
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    serial: bool = False,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    progress: bool = True,
) -> Path:
    """Run the grid and write `out/sweep.csv` (one row per grid point and seed).

    Args:
        jobs: worker processes of the local cluster (default: all cores).
        scheduler: address of a running Dask scheduler (``tcp://HOST:8786``) instead of a
            local cluster.
        serial: run every run here, one after another, without Dask (the reference the
            distributed runs must match).
        progress: show a progress bar on stderr.
    """
    from ._report import write_results

    load_scenario(path)  # fail early on a bad file
    names = [name for name, _ in params]
    grid = list(itertools.product(*(values for _, values in params))) or [()]
    runs: list[tuple[dict[str, Any], Scenario, int, Path]] = []
    for point in grid:
        overrides = dict(zip(names, point, strict=True))
        scenario = load_scenario(path, overrides)  # fails early on a bad value
        label = "_".join(f"{n.split('.')[-1]}-{v}" for n, v in overrides.items()) or "base"
        for seed in range(1, seeds + 1):
            runs.append((overrides, scenario, seed, out / label / f"seed-{seed}"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    if serial:
        where = "in this process, one run after another"
    elif scheduler is None:
        jobs = jobs or os.cpu_count() or 1
        where = f"on a local Dask cluster of {jobs} worker processes"
    else:
        where = f"on the Dask cluster at {scheduler}"
    report(f"sweep: {len(runs)} runs ({len(grid)} grid points x {seeds} seeds) {where}")
    bar = _progress_bar(len(runs), enabled=progress)

    def finished(i: int, result: RunResult) -> None:
        write_results(result, runs[i][3], plots=False)
        results[i] = result.summary
        bar.update(1)

    try:
        if serial:
            for i, (_, scenario, seed, _) in enumerate(runs):
                finished(i, simulate(scenario, seed))
        else:
            _run_on_dask(runs, finished, jobs=jobs or 1, scheduler=scheduler)
    finally:
        bar.close()
    table = out / "sweep.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*names, "seed", *(c for c, _ in COLUMNS)])
        for i, (overrides, _, seed, _) in enumerate(runs):
            summary = results[i]
            writer.writerow([*(overrides[n] for n in names), seed, *(_get(summary, keys) for _, keys in COLUMNS)])
    return table


def _run_on_dask(
    runs: list[tuple[dict[str, Any], Scenario, int, Path]],
    finished: Callable[[int, RunResult], None],
    *,
    jobs: int,
    scheduler: str | None,
) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=jobs,
            threads_per_worker=1,  # a run is one trio loop in one thread: one run per process at a time
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    try:
        with Client(cluster if cluster is not None else scheduler) as client:
            sweep_id = uuid.uuid4().hex[:12]  # keys unique on a shared cluster (Dask merges equal keys)
            futures = {
                client.submit(simulate, scenario, seed, key=f"meshsim-{sweep_id}-{i}", pure=False): i
                for i, (_, scenario, seed, _) in enumerate(runs)
            }
            for future in as_completed(futures):
                finished(futures[future], future.result())
    finally:
        if cluster is not None:
            cluster.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="run", desc="sweep", file=sys.stderr, mininterval=0.5)
