"""Changes a peer lacks, as one-way Automerge messages (no I/O, no clock).

A push carries, per document, the changes after the heads we believe the peer
holds, wrapped as an Automerge sync message with no `need` and no `have`
(automerge `sync.rs` layout: type 0x42, heads, need, have, changes). The
receiver applies it with the same checked path as any sync message
(`crdt.Replica.receive`), on a sync state used for that one message: changes
whose dependencies are missing wait in the document's queue, as in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from crdt import Replica


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def change_message(heads: Sequence[bytes], changes: Iterable[bytes]) -> bytes:
    """An Automerge sync message that carries `changes` and announces `heads`."""
    parts = [b"\x42", _uleb(len(heads)), *sorted(heads), _uleb(0), _uleb(0)]
    body = list(changes)
    parts.append(_uleb(len(body)))
    for change in body:
        parts.append(_uleb(len(change)))
        parts.append(change)
    return b"".join(parts)


def build_push(
    replica: Replica,
    doc_ids: Iterable[str],
    known: Callable[[str], tuple[bytes, ...]],
    byte_cap: int,
) -> tuple[dict[str, tuple[tuple[bytes, ...], bytes]], list[str]]:
    """The push payload for one peer: per document, (our heads, change message).

    Args:
        replica: our documents.
        doc_ids: documents to push, in order.
        known: heads the peer holds per document (empty when unknown).
        byte_cap: stop adding documents past this many bytes of messages; the
            first document always goes, whatever its size.

    Returns:
        The entries, and the documents left for a later push.
    """
    out: dict[str, tuple[tuple[bytes, ...], bytes]] = {}
    left: list[str] = []
    size = 0
    for doc_id in doc_ids:
        doc = replica.docs.get(doc_id)
        if doc is None:
            continue
        heads = tuple(sorted(doc.get_heads()))
        base = list(known(doc_id))
        if tuple(sorted(base)) == heads:
            continue  # it has all of it
        if out and size >= byte_cap:
            left.append(doc_id)
            continue
        try:
            changes = [c.bytes for c in doc.get_changes(base)]
        except Exception:  # heads we no longer hold: send the whole history
            changes = [c.bytes for c in doc.get_changes([])]
        if not changes:
            continue
        msg = change_message(heads, changes)
        out[doc_id] = (heads, msg)
        size += len(msg) + 40 * len(heads) + len(doc_id)
    return out, left


__all__ = ["build_push", "change_message"]
