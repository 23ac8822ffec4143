"""A simulator sweep, serial vs a local Dask cluster: a 3x3 grid x 3 seeds (JSON on stdout).

    python bench/sweep.py [--workers 2] [--duration 120]

Both runs must produce the same sweep.csv (checked here too); the figure is the wall time of each
and the speed-up. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim._sweep import parse_params, sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="local cluster workers")
    parser.add_argument("--duration", type=int, default=120, help="simulated seconds of each run (plus 60 s drain)")
    args = parser.parse_args()
    params = parse_params(
        [
            f"duration={args.duration}",
            "drain=60",
            "workload.sessions_per_hour=300",
            "topology.nodes=4,6,8",
            "network.loss=0,0.1,0.3",
        ]
    )
    scenario = ROOT / "sim" / "scenarios" / "line10.toml"
    figures: dict[str, object] = {"grid": "topology.nodes=4,6,8 x network.loss=0,0.1,0.3", "seeds": 3}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("serial", "dask"):
            started = time.perf_counter()
            table = sweep(
                scenario,
                params,
                3,
                Path(tmp) / mode,
                serial=mode == "serial",
                jobs=args.workers,
            )
            figures[f"{mode}_wall_s"] = round(time.perf_counter() - started, 1)
            tables[mode] = table.read_text()
    figures["workers"] = args.workers
    figures["speedup"] = round(figures["serial_wall_s"] / figures["dask_wall_s"], 2)  # type: ignore[operator]
    figures["identical"] = tables["serial"] == tables["dask"]
    print(json.dumps(figures, indent=2))
    return 0 if figures["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
