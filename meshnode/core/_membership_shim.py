"""A stand-in for the membership API agreed with `meshnode._membership` (piggyback, digest).

Delete once `Membership` has `piggyback(now, limit)` and `digest(now)` of its own:
the node then uses `Membership` directly. Until then this subclass adds them,
memberlist-style: a record whose visible part changed is queued and sent on at
most ``3 * ceil(log10(N + 1))`` outgoing messages; our own record goes on every one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

from .._membership import MemberRecord, Membership, PeerState


class PiggybackMembership(Membership):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._queue: dict[str, int] = {}

    def _limit(self) -> int:
        return 3 * max(1, math.ceil(math.log10(len(self._peers) + 2)))

    def merge(self, records: Iterable[MemberRecord], now: float) -> list[str]:
        changed = super().merge(records, now)
        for nid in changed:
            if nid != self.node_id:
                self._queue[nid] = self._limit()
        return changed

    def piggyback(self, now: float, limit: int) -> tuple[MemberRecord, ...]:
        out = [self.self_record]
        for nid in sorted(self._queue, key=lambda n: (-self._queue[n], n)):
            if len(out) >= limit:
                break
            entry = self._peers.get(nid)
            if entry is None or self.state(nid, now) is PeerState.DEAD:
                del self._queue[nid]
                continue
            out.append(entry.record)
            self._queue[nid] -= 1
            if self._queue[nid] <= 0:
                del self._queue[nid]
        return tuple(out)

    def digest(self, now: float) -> bytes:
        h = hashlib.sha256()
        for r in self.records_for_gossip(now):
            h.update(f"{r.node_id}\0{r.incarnation}\0{r.address}\0{r.version}\0{r.leader}\0{r.uplink_score}\n".encode())
        return h.digest()[:8]


__all__ = ["PiggybackMembership"]
