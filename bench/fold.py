"""Benchmark: the cost of re-reading a session after each new event (issue 9, "no work done twice").

A node folds a session again after every change (the API's reply, the forwarder's
priority, retention). Before: every re-fold read the document and verified every
event's signature again (issue 9 measured 127k verifications for 19.8k re-reads).
After: each signature is checked once per process (`crdt.EventCache`) and the fold
continues from the previous version (`crdt.SessionFold`).

Both runs read real Automerge documents with `fold_session`, the way the node does;
"before" uses a cache that keeps nothing and folds from the start each time.
Sizes: BENCH_SESSIONS (default 20) sessions of BENCH_EVENTS (default 60) meter
readings. Prints JSON.

    python bench/fold.py [--sim SCENARIO --seconds N]

With --sim, it also runs a simulator scenario (e.g. sim/scenarios/festival.toml) for N
simulated seconds with the real nodes, and reports how many re-folds the nodes did,
how many signature checks they did, and how many the fold before this change would
have done (every event of the session at each re-fold: issue 9's "127k verifications
for 19.8k re-reads"). The count of re-folds wraps `SessionFold.update` in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crdt import (
    EVENT_CACHE,
    EventCache,
    EventSigner,
    Keyring,
    SessionFold,
    add_event,
    fold_session,
    new_session_doc,
)
from tests.conftest import make_signer

SESSIONS = int(os.environ.get("BENCH_SESSIONS", "20"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "60"))


def run(incremental: bool) -> dict[str, float]:
    signer: EventSigner = make_signer("charger-1")
    keyring = Keyring({signer.device_id: signer.public_key})
    cache = EventCache() if incremental else EventCache(max_entries=0)
    refolds = 0
    fold_time = 0.0
    for s in range(SESSIONS):
        sid = f"s{s}"
        doc = new_session_doc(sid, site="x", charger="c", connector=1, id_token="T", tariff={}, created_by="n")
        base = SessionFold(sid, cache=cache) if incremental else None
        kinds = [("authorize", None), ("start", 0)] + [("meter", 10 * (i + 1)) for i in range(EVENTS)]
        for ts, (kind, wh) in enumerate(kinds):
            add_event(doc, signer.sign(kind, sid, ts, meter_wh=wh))
            started = time.perf_counter()
            if incremental:
                _, view = fold_session(doc, keyring, base=base)
            else:
                _, view = fold_session(doc, keyring, base=SessionFold(sid, cache=cache))
            fold_time += time.perf_counter() - started
            refolds += 1
        assert view.energy_wh == 10 * EVENTS and not view.conflicts
    return {
        "refolds": refolds,
        "verifications": cache.verifications,
        "verifications_per_refold": round(cache.verifications / refolds, 2),
        "ms_per_refold": round(1000 * fold_time / refolds, 3),
    }


def simulate(scenario_path: str, seconds: float) -> dict[str, object]:
    from sim import Simulation, load_scenario

    counts = {"refolds": 0, "events_folded": 0}
    update = SessionFold.update

    def counted(self, events, keyring, *, receipt_present=False):  # type: ignore[no-untyped-def]
        counts["refolds"] += 1
        counts["events_folded"] += len(events)
        return update(self, events, keyring, receipt_present=receipt_present)

    SessionFold.update = counted  # type: ignore[method-assign]
    scenario = load_scenario(Path(scenario_path), {"duration": seconds, "drain": 0.0})
    before = EVENT_CACHE.verifications
    started = time.perf_counter()
    result = Simulation(scenario, 1).run()
    wall = time.perf_counter() - started
    SessionFold.update = update  # type: ignore[method-assign]
    return {
        "scenario": scenario_path,
        "simulated_s": result.summary["simulated_s"],
        "wall_s": round(wall, 1),
        "events": result.summary["events"],
        "refolds": counts["refolds"],
        "verifications_before_estimated": counts["events_folded"],
        "verifications_after": EVENT_CACHE.verifications - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim", help="also run this simulator scenario")
    parser.add_argument("--seconds", type=float, default=600.0, help="simulated seconds for --sim")
    args = parser.parse_args()
    before = run(incremental=False)
    after = run(incremental=True)
    out: dict[str, object] = {
        "sessions": SESSIONS,
        "events_per_session": EVENTS + 2,
        "before": before,
        "after": after,
        "verifications_saved": before["verifications"] - after["verifications"],
        "speedup": round(before["ms_per_refold"] / after["ms_per_refold"], 1),
    }
    if args.sim:
        out["sim"] = simulate(args.sim, args.seconds)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
