"""`meshsim`: run simulation scenarios of many real nodes on a simulated network, reproducibly.

    meshsim run SCENARIO --seed N --out DIR [--set NAME=VALUE ...] [--no-plots]
    meshsim sweep SCENARIO --param NAME=V1,V2,... [--param ...] --seeds K --out DIR [--jobs J | --scheduler tcp://HOST:8786 | --serial]

See docs/sim.md for the scenario format and what each output means.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from meshnode import __version__

from ._scenario import ScenarioError, load_scenario, parse_value


class VirtualTimeFilter(logging.Filter):
    """Stamps every log record with the virtual time it happened at (``%(vt)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        import trio

        try:
            record.vt = f"{trio.current_time():10.3f}"
        except RuntimeError:
            record.vt = " " * 10
        return True


def setup_logging(level: str, path: Path | None) -> None:
    handler: logging.Handler = logging.FileHandler(path, mode="w") if path else logging.StreamHandler()
    handler.addFilter(VirtualTimeFilter())
    handler.setFormatter(logging.Formatter("%(vt)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshsim",
        description="Simulate many meshnode nodes on a simulated network, reproducibly.",
    )
    parser.add_argument("--version", action="version", version=f"meshsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run one scenario with one seed and write results and plots")
    run.add_argument("scenario", help="scenario file (TOML), e.g. sim/scenarios/festival.toml")
    run.add_argument("--seed", type=int, default=1, help="the run's seed (default 1)")
    run.add_argument("--out", type=Path, required=True, help="directory for summary.json, timeseries.csv, plots")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a scenario key by dotted name, e.g. --set network.loss=0.2 (repeatable)",
    )
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    run.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="level of DIR/sim.log (virtual-time stamped; default warning)",
    )
    sweep = sub.add_parser("sweep", help="run a scenario over a grid of parameter values and seeds, on a Dask cluster")
    sweep.add_argument("scenario")
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="a dotted scenario key and its values (repeatable: the grid is their product)",
    )
    sweep.add_argument("--seeds", type=int, default=3, help="seeds 1..K for every grid point (default 3)")
    sweep.add_argument("--out", type=Path, required=True, help="directory for sweep.csv and per-run summaries")
    sweep.add_argument(
        "--jobs", type=int, default=None, help="worker processes of the local Dask cluster (default: all cores)"
    )
    sweep.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster, e.g. tcp://HOST:8786 (default: a local cluster; docs/sim.md)",
    )
    sweep.add_argument(
        "--serial", action="store_true", help="run here, one run after another, without Dask (the reference)"
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every 10 % otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def __call__(self, t: float, duration: float, values: dict[str, Any]) -> None:
        fraction = t / duration if duration else 1.0
        phase = "" if t <= duration else " (draining)"
        line = (
            f"{self.label}: t={t:,.0f}/{duration:,.0f} s{phase}  nodes {values['nodes_running']}  "
            f"events {values['events']}  pending {values['changes_pending']}  receipts {values['receipts']}  "
            f"leader {values['leader'] or '-'}  wall {time.perf_counter() - self.started:,.1f} s"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
            sys.stderr.flush()
        else:
            decile = min(10, int(fraction * 10))
            if decile > self._last_decile or t > duration:
                self._last_decile = decile if t <= duration else 99
                print(line, file=sys.stderr)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ScenarioError(f"--set {pair!r}: expected NAME=VALUE")
        out[name.strip()] = parse_value(value.strip())
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from ._report import write_results
    from ._runner import Simulation

    scenario = load_scenario(args.scenario, _overrides(args.overrides))
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log_level, args.out / "sim.log")
    progress = None if args.quiet else Progress(f"{scenario.name} seed {args.seed}")
    result = Simulation(scenario, args.seed, progress=progress).run()
    if progress is not None:
        progress.done()
    files = write_results(result, args.out, plots=not args.no_plots)
    s = result.summary
    conv, rec = s["convergence_s"], s["receipt_latency_s"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}"

    print(f"{s['scenario']} seed {s['seed']}: {s['nodes']} nodes, {s['simulated_s']:.0f} s simulated "
          f"in {result.wall_seconds:.1f} s wall")  # fmt: skip
    print(f"  events {s['events']}  lost {s['events_lost']}  not in cloud {s['events_not_in_cloud']}  "
          f"sessions {s['sessions']}  billed twice {s['sessions_billed_twice']}")  # fmt: skip
    print(f"  convergence p50 {fmt(conv['p50'])} s  p95 {fmt(conv['p95'])} s  max {fmt(conv['max'])} s  "
          f"(not converged: {conv['not_converged']})")  # fmt: skip
    print(f"  receipt latency p50 {fmt(rec['p50'])} s  p95 {fmt(rec['p95'])} s  "
          f"messages/event {fmt(s['messages_per_event'])}  bytes/node/s {fmt(s['bytes_per_node_per_s'])}  "
          f"leader changes {s['leader_changes']}")  # fmt: skip
    print("  wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ._sweep import parse_params, sweep

    if args.seeds < 1:
        raise ScenarioError("--seeds must be at least 1")
    if args.jobs is not None and args.jobs < 1:
        raise ScenarioError("--jobs must be at least 1")
    if args.serial and args.scheduler:
        raise ScenarioError("--serial and --scheduler exclude each other")
    table = sweep(
        args.scenario,
        parse_params(args.param),
        args.seeds,
        args.out,
        jobs=args.jobs,
        scheduler=args.scheduler,
        serial=args.serial,
        progress=not args.no_progress,
    )
    print(table.read_text(), end="")
    print(f"wrote {table}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return cmd_run(args) if args.command == "run" else cmd_sweep(args)
    except ScenarioError as exc:
        print(f"meshsim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
