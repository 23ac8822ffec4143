"""Durability at the system-call level: every acknowledged write was synced to disk first.

The SIGKILL test in test_store.py cannot see a missing fsync: a killed process's writes stay in
the page cache and the next open reads them back. Here a writing child (tests/durability_child.py)
runs under `strace -f`, which records, in order, the child's writes to the store's files, its
fsync/fdatasync calls on them, and the `req`/`ack` lines it writes to its stdout pipe around each
`await store.write(...)`. The claim "a write returns only once its rows are on disk" means: for
every event, after its `req` line, some write to a store file was followed by a successful sync of
that same file, and that sync returned before the `ack` line was written. With
`PRAGMA synchronous=OFF` (no syncs at all) or `NORMAL` (WAL commits not synced) the check fails.

Needs strace (Debian package `strace`; the Makefile installs it with the other test packages).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace")

# `PID syscall(fd</path>, ...` ; `PID <... syscall resumed>...) = RESULT`
_CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((\d+)<([^>]*)>(.*)$")
_RESUMED = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+<\.\.\. (\w+) resumed>.*\)\s+=\s+(-?\d+)")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)")
_LINE = re.compile(r'"(req|ack) (\S+)\\n"')


@dataclass
class Call:
    name: str
    path: str
    start: int  # index of the trace line where the call was entered
    end: int | None = None  # index of the line where it returned (None: never returned)
    result: int | None = None
    text: str = ""


def parse(trace: str) -> list[Call]:
    """The traced calls with their entry and return positions (strace -f interleaves threads)."""
    calls: list[Call] = []
    open_calls: dict[tuple[str, str], Call] = {}
    for i, line in enumerate(trace.splitlines()):
        if m := _RESUMED.match(line):
            call = open_calls.pop((m.group(1), m.group(2)), None)
            if call is not None:
                call.end, call.result = i, int(m.group(3))
            continue
        if not (m := _CALL.match(line)):
            continue
        pid, name, _fd, path, rest = m.groups()
        call = Call(name, path, i, text=rest)
        calls.append(call)
        if rest.endswith("<unfinished ...>"):
            open_calls[(pid, name)] = call
        elif r := _RESULT.search(rest):
            call.end, call.result = i, int(r.group(1))
    return calls


def unsynced_acks(trace: str, db_path: Path) -> tuple[list[str], int]:
    """Event ids whose ack was not preceded by (req, write to a store file, sync of it).

    Returns (those ids, number of acks seen)."""
    store_files = {str(db_path), f"{db_path}-wal", f"{db_path}-journal"}
    calls = parse(trace)
    writes = [
        c
        for c in calls
        if c.name in ("write", "pwrite64", "pwritev", "pwritev2")
        and c.path in store_files
        and c.end is not None
        and (c.result or 0) > 0
    ]
    syncs = [
        c
        for c in calls
        if c.name in ("fsync", "fdatasync") and c.path in store_files and c.result == 0 and c.end is not None
    ]
    req_end: dict[str, int] = {}
    bad, acks = [], 0
    for c in calls:
        if not c.path.startswith("pipe:") or not (m := _LINE.search(c.text)):
            continue
        kind, event_id = m.groups()
        if kind == "req":
            assert c.end is not None
            req_end[event_id] = c.end
            continue
        acks += 1
        after = req_end[event_id]
        synced = any(
            w.end > after and any(s.path == w.path and s.start > w.end and s.end < c.start for s in syncs)
            for w in writes
            if w.end < c.start
        )
        if not synced:
            bad.append(event_id)
    return bad, acks


def run_child(tmp_path: Path, *, key: bytes | None, writers: int = 4, events: int = 10) -> tuple[str, Path]:
    db = tmp_path / "store.db"
    trace_path = tmp_path / "strace.txt"
    args = [
        STRACE,
        "-f",
        "-qq",
        "-y",
        "-s",
        "160",
        "-e",
        "signal=none",
        "-e",
        "trace=fsync,fdatasync,write,pwrite64,pwritev,pwritev2",
        "-o",
        str(trace_path),
        sys.executable,
        "-m",
        "tests.durability_child",
        str(db),
        str(writers),
        str(events),
    ]
    if key is not None:
        args.append(key.hex())
    proc = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "ready" and lines[-1] == "done", proc.stdout[-500:]
    assert sum(1 for line in lines if line.startswith("ack ")) == writers * (events + 1)
    return trace_path.read_text(), db


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_every_acknowledged_write_was_synced_first(tmp_path, key):
    assert STRACE is not None, "strace is needed (apt-get install strace)"
    writers, events = 4, 10
    trace, db = run_child(tmp_path, key=key, writers=writers, events=events)
    bad, acks = unsynced_acks(trace, db)
    assert acks == writers * (events + 1), "the trace lost some ack lines"
    assert bad == [], f"{len(bad)} of {acks} acks were written before their rows were synced: {bad[:5]}"


SAMPLE = """\
100 write(1<pipe:[7]>, "req e1\\n", 7) = 7
101 pwrite64(5</d/store.db-wal>, "abc", 3, 0 <unfinished ...>
101 <... pwrite64 resumed>) = 3
101 fdatasync(5</d/store.db-wal>) = 0
100 write(1<pipe:[7]>, "ack e1\\n", 7) = 7
100 write(1<pipe:[7]>, "req e2\\n", 7) = 7
101 pwrite64(5</d/store.db-wal>, "abc", 3, 3) = 3
100 write(1<pipe:[7]>, "ack e2\\n", 7) = 7
101 fdatasync(5</d/store.db-wal>) = 0
"""


def test_the_check_tells_a_synced_ack_from_an_unsynced_one():
    """The parser itself: e1 was synced before its ack, e2's sync came after its ack."""
    bad, acks = unsynced_acks(SAMPLE, Path("/d/store.db"))
    assert (bad, acks) == (["e2"], 2)
    # A sync that began before the write does not count, nor one of another file.
    other = SAMPLE.replace(
        '101 fdatasync(5</d/store.db-wal>) = 0\n100 write(1<pipe:[7]>, "ack e1',
        '101 fdatasync(6</d/other>) = 0\n100 write(1<pipe:[7]>, "ack e1',
    )
    assert unsynced_acks(other, Path("/d/store.db")) == (["e1", "e2"], 2)
