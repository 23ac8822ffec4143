"""Writing a run's results: summary.json, timeseries.csv and PNG plots.

`summary.json` holds only what the simulation decides (virtual time, counts),
written with sorted keys and rounded floats, so that the same scenario and seed
give the same bytes in every process. How long the run took on the machine
goes to `run.json` beside it, which is expected to differ.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402

from ._runner import RunResult  # noqa: E402

TIMESERIES_COLUMNS = (
    "t", "nodes_running", "messages", "bytes", "messages_per_s", "bytes_per_s", "lost", "undeliverable",
    "cloud_requests", "cloud_bytes", "events", "sessions", "changes_pending", "receipts", "leader", "leaders",
    "partitioned", "members_live", "members_alive",
)  # fmt: skip


def summary_bytes(summary: dict[str, Any]) -> bytes:
    return (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()


def timeseries_rows(result: RunResult) -> list[dict[str, Any]]:
    rows = []
    prev = None
    for sample in result.samples:
        v = dict(sample.values)
        dt = sample.t - prev.t if prev is not None else 0.0
        v["messages_per_s"] = round((v["messages"] - prev.values["messages"]) / dt, 3) if prev and dt > 0 else 0.0
        v["bytes_per_s"] = round((v["bytes"] - prev.values["bytes"]) / dt, 1) if prev and dt > 0 else 0.0
        v["t"] = round(sample.t, 6)
        rows.append(v)
        prev = sample
    return rows


def write_results(result: RunResult, out: Path, *, plots: bool = True) -> list[Path]:
    """Write everything for one run into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "summary.json"
    path.write_bytes(summary_bytes(result.summary))
    written.append(path)
    rows = timeseries_rows(result)
    path = out / "timeseries.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMESERIES_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in TIMESERIES_COLUMNS})
    written.append(path)
    path = out / "events.log"
    path.write_text("".join(f"{t:10.3f}  {what}\n" for t, what in result.events_log))
    written.append(path)
    path = out / "run.json"
    path.write_text(json.dumps({
        "wall_seconds": round(result.wall_seconds, 3),
        "simulated_seconds": result.summary.get("simulated_s"),
        "wall_seconds_per_node_hour": round(
            result.wall_seconds / (result.summary["nodes"] * (result.summary.get("simulated_s") or 1) / 3600), 3
        ),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }, indent=2, sort_keys=True) + "\n")  # fmt: skip
    written.append(path)
    if plots:
        written += [
            plot_convergence(result, out / "convergence_cdf.png"),
            plot_traffic(result, rows, out / "traffic.png"),
            plot_topology(result, out / "topology.png"),
        ]
    return written


def _title(result: RunResult, what: str) -> str:
    s = result.summary
    return f"{s['scenario']} (seed {s['seed']}, {s['nodes']} nodes): {what}"


def plot_convergence(result: RunResult, path: Path) -> Path:
    times = sorted(result.convergence_times)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if times:
        ys = [(i + 1) / len(times) for i in range(len(times))]
        ax.step(times, ys, where="post", color="tab:blue", label=f"{len(times)} changes")
        conv = result.summary["convergence_s"]
        for key, style in (("p50", "--"), ("p95", ":")):
            if conv.get(key) is not None:
                ax.axvline(conv[key], color="tab:gray", linestyle=style, label=f"{key} = {conv[key]:.3g} s")
        if times[0] > 0 and times[-1] / max(times[0], 1e-9) > 100:
            ax.set_xscale("log")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no change converged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("seconds from acknowledgement until every running node holds the change")
    ax.set_ylabel("fraction of changes")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(_title(result, "convergence time CDF"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_traffic(result: RunResult, rows: list[dict[str, Any]], path: Path) -> Path:
    t = [r["t"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), dpi=110, sharex=True)
    ax1.plot(t, [r["bytes_per_s"] / 1024 for r in rows], color="tab:blue", label="KiB/s (mesh, all nodes)")
    ax1b = ax1.twinx()
    ax1b.plot(t, [r["messages_per_s"] for r in rows], color="tab:orange", alpha=0.7, label="messages/s")
    ax1.set_ylabel("KiB/s")
    ax1b.set_ylabel("messages/s")
    lines = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax1b.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, loc="upper left", fontsize=8)
    ax1.grid(True, alpha=0.3)
    ax2.plot(t, [r["nodes_running"] for r in rows], color="tab:green", label="nodes running")
    ax2.plot(t, [r["changes_pending"] for r in rows], color="tab:red", label="changes not yet everywhere")
    ax2.plot(t, [r["leaders"] for r in rows], color="tab:purple", label="distinct leaders believed")
    ax2.set_xlabel("virtual time (s)")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.grid(True, alpha=0.3)
    # Shade partitions.
    start = None
    for r in rows + [{"t": t[-1] if t else 0, "partitioned": 0}]:
        if r["partitioned"] and start is None:
            start = r["t"]
        elif not r["partitioned"] and start is not None:
            for ax in (ax1, ax2):
                ax.axvspan(start, r["t"], color="tab:gray", alpha=0.15, lw=0)
            start = None
    duration = result.summary.get("simulated_s")
    ax1.set_title(_title(result, "traffic over time (grey: partitioned)"), fontsize=10)
    if duration:
        ax2.set_xlim(0, duration)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_topology(result: RunResult, path: Path) -> Path:
    g = result.graph
    pos = result.positions
    n = g.number_of_nodes()
    size = 300 if n <= 40 else 120 if n <= 250 else 30
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.35, width=0.8)
    others = [v for v in sorted(g.nodes) if v not in result.uplinks and v != result.leader]
    uplinks = [v for v in result.uplinks if v != result.leader]
    nx.draw_networkx_nodes(g, pos, nodelist=others, ax=ax, node_size=size, node_color="tab:blue", label="node")
    if uplinks:
        nx.draw_networkx_nodes(g, pos, nodelist=uplinks, ax=ax, node_size=size * 1.3, node_color="tab:orange",
                               node_shape="s", label="node with uplink")  # fmt: skip
    if result.leader is not None and result.leader in g:
        nx.draw_networkx_nodes(g, pos, nodelist=[result.leader], ax=ax, node_size=size * 2.5, node_color="tab:red",
                               node_shape="*", label=f"leader at the end ({result.leader}"
                               f"{', has an uplink' if result.leader in result.uplinks else ''})")  # fmt: skip
    if n <= 60:
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=7, font_color="white" if n <= 40 else "black")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, markerscale=0.6, frameon=False)
    ax.set_title(_title(result, "topology"), fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
