"""Benchmark: CPU cost of membership per operation, this tree against a baseline revision.

The simulator's profile of a 200-node mesh put membership at 53 % of the run:
``Membership.view`` rebuilt (O(N log N)) several times a second, 32 full,
validated records parsed and merged per exchange. This measures, for a view of
N peers (default 200 and 1,000), the cost of what a node does with membership:

- ``decode_record``: ``MemberRecord.from_wire`` of one gossiped record (all checks);
- ``encode_record``: ``to_wire`` and ``cbor2.dumps`` of one record in a list of 32;
- ``merge_record``: ``merge`` of a batch of 32 records, most with a fresher
  heartbeat (what one exchange brings), per record;
- ``view``, ``live_peers``, ``records_for_gossip``, ``leader``, ``state``: one
  call each, right after such a merge (so a cache, if any, has to cope with
  records that keep changing);
- ``node_second``: one simulated second of a node's life: six exchanges
  (decode and merge 32 records), a tick, an election, two ``live_peers`` and
  one ``records_for_gossip``;
- ``piggyback`` (8 records) and ``digest``: new in this tree, no baseline;
- ``swim_links``: the SWIM detector's reachability (R12), ``measure_reach``: this tree
  (``after``) and, as ``before``, ``--reach-baseline`` (default 7c3434e, reachability
  recomputed in full on every change), each in a random geometric mesh of about ten
  neighbours per node.

The baseline module is read with ``git show REV:meshnode/_membership.py`` (default
6754965, the ``main`` the issue measured) and imported under another name, so both
run in the same process on the same data. Figures are microseconds per operation
(best of ``--repeat`` runs of ``--seconds`` of timed calls; what each call needs, such
as a fresh batch of records with newer heartbeats, is prepared untimed); JSON on stdout.

    python bench/membership.py [--sizes 200 1000] [--baseline 6754965] [--reach-baseline 7c3434e]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshnode import _membership as current


def load_baseline(rev: str, name: str = "_membership_baseline") -> types.ModuleType | None:
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:meshnode/_membership.py"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline {rev}: {exc}", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Our own repository's source at a named revision, run to compare costs.
    exec(compile(source, f"{rev}:meshnode/_membership.py", "exec"), module.__dict__)  # noqa: S102
    return module


def timed(op: Callable[[], object], prepare: Callable[[], object], seconds: float, repeat: int,
          ops_per_call: int = 1) -> float:  # fmt: skip
    """Best microseconds of CPU per operation: `prepare()` untimed, then `op()` timed (process
    time, so that other work on a shared machine does not count), for about `seconds` of wall time."""
    best = float("inf")
    for _ in range(repeat):
        spent, calls = 0.0, 0
        wall = time.perf_counter() + seconds
        while calls < 20 or time.perf_counter() < wall:
            prepare()
            start = time.process_time()
            op()
            spent += time.process_time() - start
            calls += 1
        best = min(best, spent / (calls * ops_per_call))
    return round(best * 1e6, 3)


def measure(mod: types.ModuleType, n: int, seconds: float, repeat: int) -> dict[str, Any]:
    """Every figure on a view of `n` peers whose heartbeats keep advancing, as in a live mesh:
    each exchange brings 32 records, 28 of them newer; six exchanges a (virtual) second."""
    rng = random.Random(n)
    rec = mod.MemberRecord
    ids = [f"node-{i:04d}" for i in range(n)]
    scores = {nid: (rng.choice([0, 0, 0, 60, 85, 95]) if i < n // 10 else 0) for i, nid in enumerate(ids)}
    heartbeat = {nid: 1 for nid in ids}

    def record(nid: str) -> Any:
        host = int(nid[-4:])
        return rec(nid, 1, heartbeat[nid], scores[nid], f"10.0.{host // 250}.{host % 250 + 1}:5683", "3", ids[0])

    m = mod.Membership(rec("self-node", 1, 0, 70, "10.9.9.9:5683", "3", ids[0]))
    now = [0.0]
    m.merge([record(nid) for nid in ids], now[0])
    batch: list[Any] = []
    wires: list[list[dict[str, Any]]] = []

    def fresh_batch() -> None:
        picked = rng.sample(ids, 32)
        for nid in picked[:28]:
            heartbeat[nid] += 1
        batch[:] = [record(nid) for nid in picked]
        now[0] += 1 / 6

    def fresh_wires() -> None:
        wires[:] = []
        for _ in range(6):
            fresh_batch()
            wires.append([r.to_wire() for r in batch])
        now[0] -= 1.0  # node_second moves the clock itself

    def merge_fresh() -> None:
        fresh_batch()
        m.merge(batch, now[0])

    out: dict[str, Any] = {
        "decode_record": timed(lambda: [rec.from_wire(o) for o in wires[0]], fresh_wires, seconds, repeat, 32),
        "encode_record": timed(lambda: cbor2.dumps([r.to_wire() for r in batch]), fresh_batch, seconds, repeat, 32),
        "merge_record": timed(lambda: m.merge(batch, now[0]), fresh_batch, seconds, repeat, 32),
    }
    for name, fn in {
        "view": lambda: m.view(now[0]),
        "live_peers": lambda: m.live_peers(now[0]),
        "records_for_gossip": lambda: m.records_for_gossip(now[0]),
        "leader": lambda: m.leader(now[0], ids[0]),
        "state": lambda: m.state(ids[5], now[0]),
    }.items():
        out[name] = timed(fn, merge_fresh, seconds, repeat)

    def node_second() -> None:
        for wire in wires:
            now[0] += 1 / 6
            m.merge([rec.from_wire(o) for o in wire], now[0])
        m.tick(now[0])
        m.set_leader(m.leader(now[0], m.self_record.leader))
        m.live_peers(now[0])
        m.live_peers(now[0])
        m.records_for_gossip(now[0])

    out["node_second"] = timed(node_second, fresh_wires, seconds, repeat)
    if hasattr(m, "piggyback"):
        out["piggyback"] = timed(lambda: m.piggyback(now[0], 8), merge_fresh, seconds, repeat)
        out["digest"] = timed(lambda: m.digest(now[0]), merge_fresh, seconds, repeat)
    out["live_peers_count"] = len(m.live_peers(now[0]))
    return out


def measure_reach(mod: types.ModuleType, n: int, seconds: float, repeat: int) -> dict[str, Any]:
    """The SWIM detector with links (R12, this tree only): a view of `n` peers in a random
    geometric mesh of about ten neighbours each, every link reported by both ends.

    - ``reach_link_change``: a neighbour's record that drops and regains one link, merged,
      then ``next_deadline`` (which brings reachability up to date, and nothing else);
    - ``reach_far_link_change``: the same for a member drawn at random (most are far away);
    - ``reach_suspect_refute``: a member drawn at random suspected (it stops relaying: what
      only it reached is cut off), ``next_deadline``, then its refutation merged, ``next_deadline``;
    - ``link_change_and_leader``: ``reach_far_link_change`` followed by ``leader`` (the node
      elects after every exchange; a changed record invalidates the cached election);
    - ``idle_exchange``: what an idle exchange costs the detector: decode and merge the
      peer's own (unchanged) record, ``digest``, ``piggyback(32)``, ``leader``.
    """
    rng = random.Random(n)
    rec = mod.MemberRecord
    ids = [f"node-{i:04d}" for i in range(n)]
    pos = {nid: (rng.random(), rng.random()) for nid in ["self-node", *ids]}
    radius = 0.13 * (200 / n) ** 0.5
    adj: dict[str, list[str]] = {nid: [] for nid in pos}
    names = sorted(pos)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if (pos[a][0] - pos[b][0]) ** 2 + (pos[a][1] - pos[b][1]) ** 2 < radius**2:
                adj[a].append(b)
                adj[b].append(a)

    def links(nid: str, drop: str | None = None) -> bytes:
        return b"".join(sorted(mod.neighbour_hash(p) for p in adj[nid] if p != drop))

    def record(nid: str, hb: int, drop: str | None = None, inc: int = 1) -> Any:
        host = int(nid[-4:])
        return rec(nid, inc, hb, 0, f"10.0.{host // 250}.{host % 250 + 1}:5683", "4", None, 0, links(nid, drop))

    m = mod.Membership(rec("self-node", 1, 0, 70, "10.9.9.9:5683", "4"), detector="swim")
    m.set_neighbours(adj["self-node"])
    m.merge([record(nid, 1) for nid in ids], 0.0)
    while m.pending_updates():  # the start-up news is out: an idle view
        m.piggyback(0.5, 64)
    first = adj["self-node"][0] if adj["self-node"] else ids[0]
    hb = [1]
    now = [1.0]

    def change() -> None:
        hb[0] += 1
        now[0] += 0.001
        m.merge([record(first, hb[0], adj[first][-1] if hb[0] % 2 else None)], now[0])
        m.next_deadline()

    hbs = dict.fromkeys(ids, 1)
    incs = dict.fromkeys(ids, 1)

    def far_change() -> None:
        nid = rng.choice(ids)
        if not adj[nid]:
            return
        hbs[nid] += 1
        now[0] += 0.001
        drop = None if hbs[nid] % 2 else adj[nid][hbs[nid] % len(adj[nid])]  # first pick: a link goes
        m.merge([record(nid, hbs[nid], drop, incs[nid])], now[0])
        m.next_deadline()

    def suspect_refute() -> None:
        nid = rng.choice(ids)
        now[0] += 0.001
        m.suspect(nid, now[0])
        m.next_deadline()
        incs[nid] += 1
        hbs[nid] += 1
        m.merge([record(nid, hbs[nid], inc=incs[nid])], now[0])
        m.next_deadline()

    def change_and_leader() -> None:
        far_change()
        m.leader(now[0])

    wire = [record(first, hb[0]).to_wire()]
    return {
        "reach_link_change": timed(change, lambda: None, seconds, repeat),
        "reach_far_link_change": timed(far_change, lambda: None, seconds, repeat),
        "reach_suspect_refute": timed(suspect_refute, lambda: None, seconds, repeat),
        "link_change_and_leader": timed(change_and_leader, lambda: None, seconds, repeat),
        "idle_exchange": timed(
            lambda: (
                m.merge([rec.from_wire(o) for o in wire], now[0]),
                m.digest(now[0]),
                m.piggyback(now[0], 32),
                m.leader(now[0]),
            ),
            lambda: None,
            seconds,
            repeat,
        ),
        "live_peers_count": len(m.live_peers(now[0])),
        "mean_neighbours": round(sum(len(v) for v in adj.values()) / len(adj), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--baseline", default="6754965")
    parser.add_argument("--reach-baseline", default="7c3434e")
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    reach_baseline = load_baseline(args.reach_baseline, "_membership_reach_baseline")
    result: dict[str, Any] = {"unit": "microseconds per operation", "baseline": args.baseline, "sizes": {}}
    for n in args.sizes:
        row: dict[str, Any] = {"after": measure(current, n, args.seconds, args.repeat)}
        row["swim_links"] = {"after": measure_reach(current, n, args.seconds, args.repeat)}
        if reach_baseline is not None:
            before = row["swim_links"]["before"] = measure_reach(reach_baseline, n, args.seconds, args.repeat)
            after = row["swim_links"]["after"]
            row["swim_links"]["speedup"] = {
                key: round(before[key] / after[key], 1) for key in before if key.startswith(("reach", "idle", "link"))
            }
        if baseline is not None:
            row["before"] = measure(baseline, n, args.seconds, args.repeat)
            row["speedup"] = {
                key: round(row["before"][key] / row["after"][key], 1)
                for key in row["before"]
                if key != "live_peers_count" and row["after"].get(key, 0) > 0
            }
        result["sizes"][str(n)] = row
        print(f"N={n} done", file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
