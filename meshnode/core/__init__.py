"""The replication engine's core, sans-IO (STYLE rules 1-5).

`Replicator` decides whom to greet, whom to push what and when, and when to run
anti-entropy; `NeighbourTable` holds verified peers with TTL and backoff;
`build_push` computes what a peer lacks. The trio layer in `meshnode.Node` only
moves bytes and sleeps until `Replicator.next_deadline()`.
"""

from .changes import build_push, change_message
from .messages import Action, SendHello, SendPush, StartExchange, SyncDocs, Tick
from .neighbours import Hellos, Neighbour, NeighbourTable
from .replicator import Replicator

__all__ = [
    "Action",
    "Hellos",
    "Neighbour",
    "NeighbourTable",
    "Replicator",
    "SendHello",
    "SendPush",
    "StartExchange",
    "SyncDocs",
    "Tick",
    "build_push",
    "change_message",
]
