"""`meshsim sweep`: one scenario over a grid of parameter values and seeds, on all cores.

Each grid point and seed is an independent run in a worker process (runs share
nothing, and each is reproducible on its own, so the table does not depend on
how the runs were spread over the workers). Rows come out in grid order, then
seed order.
"""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._scenario import ScenarioError, load_scenario, parse_value

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


def _run_one(path: str, overrides: dict[str, Any], seed: int, out: str | None) -> dict[str, Any]:
    from ._report import write_results
    from ._runner import Simulation

    scenario = load_scenario(path, overrides)
    result = Simulation(scenario, seed).run()
    if out is not None:
        write_results(result, Path(out), plots=False)
    return result.summary


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
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """Run the grid and write `out/sweep.csv` (one row per grid point and seed)."""
    load_scenario(path)  # fail early on a bad file
    names = [name for name, _ in params]
    grid = list(itertools.product(*(values for _, values in params))) or [()]
    jobs_list = []
    for point in grid:
        overrides = dict(zip(names, point, strict=True))
        load_scenario(path, overrides)  # fail early on a bad value
        label = "_".join(f"{n.split('.')[-1]}-{v}" for n, v in overrides.items()) or "base"
        for seed in range(1, seeds + 1):
            jobs_list.append((overrides, seed, str(out / label / f"seed-{seed}")))
    out.mkdir(parents=True, exist_ok=True)
    workers = jobs or os.cpu_count() or 1
    report(f"sweep: {len(jobs_list)} runs ({len(grid)} grid points x {seeds} seeds) on {workers} workers")
    results: dict[int, dict[str, Any]] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_run_one, str(path), overrides, seed, run_out): i
            for i, (overrides, seed, run_out) in enumerate(jobs_list)
        }
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            overrides, seed, _ = jobs_list[i]
            report(f"  [{done}/{len(jobs_list)}] {overrides or 'base'} seed {seed} done")
    table = out / "sweep.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*names, "seed", *(c for c, _ in COLUMNS)])
        for i, (overrides, seed, _) in enumerate(jobs_list):
            summary = results[i]
            writer.writerow([*(overrides[n] for n in names), seed, *(_get(summary, keys) for _, keys in COLUMNS)])
    return table
