"""Node-to-node sync under the field's limits: both sides of an exchange byte-capped alike."""

from __future__ import annotations

import trio

from .test_sync import _Pair, _sessions


async def test_sync_requests_are_capped_like_the_answers(tmp_path, autojump_clock, monkeypatch):
    """A request is as many lock-step CoAP blocks as it has bytes, like an answer:
    the requesting side stops at the answer's cap (SYNC_REPLY_BYTES) too, not at
    the 256 KiB of MAX_BATCH_BYTES (issue 10: a request of a whole batch's
    histories overran its deadline on a loaded site, every time)."""
    import meshnode._node as node_module

    cap = 3000
    monkeypatch.setattr(node_module, "SYNC_REPLY_BYTES", cap)
    assert node_module.MAX_BATCH_BYTES > 8 * cap  # only the answer's cap is lowered
    async with trio.open_nursery() as nursery:
        pair = _Pair(tmp_path, nursery)
        a, b = await pair.start("n1"), await pair.start("n2")
        mine = await _sessions(a, node_module.SYNC_BATCH_DOCS)  # one batch, all on a
        await a._sync_docs("n2", pair.address("n2"), mine)
        for d in mine:
            assert d in b.replica.docs, d
            assert sorted(a.replica.docs[d].get_heads()) == sorted(b.replica.docs[d].get_heads())
        requests = [s for r, s in pair.net.sizes if not r]
        largest = max(len(a.replica.docs[d].save()) for d in mine)
        assert sum(requests) > 2 * cap  # the batch needed more than one capped request
        assert max(requests) < cap + largest + 512  # and none went past the cap by more than one message
        nursery.cancel_scope.cancel()
