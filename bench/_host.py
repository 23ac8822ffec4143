"""What a benchmark ran beside: cores, load, CPU pressure, the autogroup and its nice.

Shared by the benchmarks whose figures are wall-clock times (bench/mesh.py, bench/field.py):
on a shared machine those depend on the load, so their JSON says what the run competed with.
The kernel groups CPU time by session (autogroup); `nice` only orders the processes inside one
group, so `own_autogroup` gives a run a group of its own with a chosen weight.
"""

from __future__ import annotations

import os
from typing import Any


def cpu_pressure_total() -> int | None:
    """Microseconds some runnable task waited for a CPU, since boot (PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline()
    except OSError:
        return None
    return int(some.rpartition("total=")[2])


def host_snapshot() -> dict[str, Any]:
    """The load and CPU pressure now: take one before and one after the measured phase."""
    return {"load_average": [round(x, 2) for x in os.getloadavg()], "cpu_pressure_us": cpu_pressure_total()}


def host_report(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the measured phase competed with: cores, load, CPU pressure, our autogroup and nice."""
    out: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average_before": before["load_average"],
        "load_average_after": after["load_average"],
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }
    if before["cpu_pressure_us"] is not None and after["cpu_pressure_us"] is not None and seconds > 0:
        waited = (after["cpu_pressure_us"] - before["cpu_pressure_us"]) / 1e6
        out["cpu_pressure_some_pct"] = round(100 * waited / seconds, 1)
    try:
        with open("/proc/self/autogroup") as f:
            out["autogroup"] = f.read().strip()
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            out["autogroup_enabled"] = f.read().strip() == "1"
    except OSError:
        pass
    return out


def own_autogroup(nice: int, script: str) -> None:
    """Make this process a session (hence an autogroup) of its own and set the group's nice."""
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()
        except PermissionError:
            raise SystemExit(
                "--autogroup-nice: this process leads a process group and cannot start a session; "
                f"start it with setsid (setsid python {script} ...)"
            ) from None
    with open("/proc/self/autogroup", "w") as f:
        f.write(f"{nice}\n")
