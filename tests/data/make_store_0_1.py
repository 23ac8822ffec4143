"""How tests/data/store-0.1-*.sqlite were made, with the DocStore of meshnode 0.1:

    git show 6754965:crdt/_store.py > /tmp/old_store.py
    python tests/data/make_store_0_1.py /tmp/old_store.py tests/data

Two sessions: "s/one" compacted, then one more event; "s-two" archived; meta
incarnation 7. Plain, and encrypted with key bytes(range(32)).
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nacl.signing  # noqa: E402

import crdt  # noqa: E402,F401 - the old module imports crdt._errors
from crdt import EventSigner, Replica, add_event, new_session_doc  # noqa: E402

spec = importlib.util.spec_from_file_location("crdt._old_store", sys.argv[1])
assert spec is not None and spec.loader is not None
old = importlib.util.module_from_spec(spec)
sys.modules["crdt._old_store"] = old
spec.loader.exec_module(old)

signer = EventSigner("charger-1", nacl.signing.SigningKey(b"charger-1".ljust(32, b"\0")))
for name, key in (("plain", None), ("encrypted", bytes(range(32)))):
    store = old.DocStore(Path(sys.argv[2]) / f"store-0.1-{name}.sqlite", key=key)
    r = Replica()
    for doc_id in ("s/one", "s-two"):
        doc = new_session_doc(doc_id, site="x", charger="c", connector=1, id_token="t", tariff={}, created_by="n")
        store.write_batch([(doc_id, r.add(doc_id, doc))])
        for i in range(3):
            heads = r.docs[doc_id].get_heads()
            add_event(r.docs[doc_id], signer.sign("meter", doc_id, i + 1, meter_wh=100 + i))
            store.write_batch([(doc_id, r.changes_since(doc_id, heads))])
    store.compact("s/one", r.docs["s/one"])
    heads = r.docs["s/one"].get_heads()
    add_event(r.docs["s/one"], signer.sign("stop", "s/one", 4, meter_wh=200))
    store.write_batch([("s/one", r.changes_since("s/one", heads))])
    store.compact("s-two", r.docs["s-two"], archive=True)
    store.set_meta("incarnation", (7).to_bytes(8, "big"))
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store._db.execute("PRAGMA journal_mode=DELETE")
    store.close()
