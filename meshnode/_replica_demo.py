"""The in-process replica demo: three replicas record sessions and converge by sync.

It exercises the whole data model end to end with no network: each replica
starts sessions on its own charger and signs their events; random pairs exchange
Automerge sync messages (some lost and sent again); at the end every replica
prints the same sessions, folded from the same events.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import nacl.signing

from crdt import EventSigner, Keyring, Replica, add_event, fold_session, new_session_doc


def run_replica_demo(
    *, replicas: int = 3, sessions: int = 4, seed: int = 1, out: Callable[[str], None] = print
) -> bool:
    """Run the demo; returns True when every replica ended with identical sessions."""
    rng = random.Random(seed)
    names = [f"node-{i + 1}" for i in range(replicas)]
    signers = {n: EventSigner(n, nacl.signing.SigningKey(n.encode().ljust(32, b"\0"))) for n in names}
    keyring = Keyring({n: s.public_key for n, s in signers.items()})
    nodes = {n: Replica() for n in names}
    clock = int(time.time() * 1000)

    out(f"{replicas} replicas, {sessions} sessions each, seed {seed}")
    plans = []
    for n in names:
        for k in range(sessions):
            sid = f"{n}-s{k + 1}"
            nodes[n].add(
                sid,
                new_session_doc(
                    sid,
                    site="demo-field",
                    charger=f"{n}-charger",
                    connector=1 + k % 2,
                    id_token=f"TOKEN-{rng.randrange(1000, 9999)}",
                    tariff={},
                    created_by=n,
                ),
            )
            plans.append((n, sid))

    lost = 0
    for round_no in range(8):
        for n, sid in plans:
            signer, doc = signers[n], nodes[n].docs[sid]
            clock += rng.randrange(500, 2000)
            if round_no == 0:
                add_event(doc, signer.sign("authorize", sid, clock))
                add_event(doc, signer.sign("start", sid, clock + 1, meter_wh=rng.randrange(0, 50_000)))
            elif round_no < 7:
                last = fold_session(doc, keyring)[1].last_meter_wh or 0
                add_event(doc, signer.sign("meter", sid, clock, meter_wh=last + rng.randrange(100, 2500)))
            else:
                last = fold_session(doc, keyring)[1].last_meter_wh or 0
                add_event(doc, signer.sign("stop", sid, clock, meter_wh=last + rng.randrange(0, 500)))
        for _ in range(replicas):
            a, b = rng.sample(names, 2)
            for sid in sorted(set(nodes[a].docs) | set(nodes[b].docs)):
                msg = nodes[a].generate(b, sid)
                if msg is None:
                    continue
                if rng.random() < 0.2:
                    lost += 1  # lost on the way: the sender starts that sync afresh
                    nodes[a].book.reset(b, sid)
                    continue
                nodes[b].receive(a, sid, msg)

    rounds = 0
    while True:  # anti-entropy until nothing moves
        moved = False
        for a in names:
            for b in names:
                if a == b:
                    continue
                for sid in sorted(set(nodes[a].docs) | set(nodes[b].docs)):
                    msg = nodes[a].generate(b, sid)
                    if msg is not None:
                        nodes[b].receive(a, sid, msg)
                        moved = True
        rounds += 1
        if not moved:
            break
    out(f"{lost} sync messages lost on the way; converged after {rounds} anti-entropy rounds\n")

    tables = {}
    for n in names:
        rows = []
        for sid in sorted(nodes[n].docs):
            data, view = fold_session(nodes[n].docs[sid], keyring)
            rows.append(
                (sid, data.charger, data.id_token, view.state, view.energy_wh, len(view.applied), len(view.conflicts))
            )
        tables[n] = rows
    out(
        f"{'session':<14} {'charger':<16} {'id token':<11} {'state':<10} {'energy Wh':>9} {'events':>6} {'conflicts':>9}"
    )
    for row in tables[names[0]]:
        out(f"{row[0]:<14} {row[1]:<16} {row[2]:<11} {row[3]:<10} {row[4]:>9} {row[5]:>6} {row[6]:>9}")
    same = all(tables[n] == tables[names[0]] for n in names)
    heads_same = all(
        nodes[n].docs[sid].get_heads() == nodes[names[0]].docs[sid].get_heads() for n in names for sid in nodes[n].docs
    )
    out(f"\nall {replicas} replicas identical (heads and folded state): {'yes' if same and heads_same else 'NO'}")
    return same and heads_same
