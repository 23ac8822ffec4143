"""meshnode: the mesh node that runs beside every charger.

The public API: the `Node` and its configuration, and the seams it is built
from (transport, discovery, membership), each with a real and an in-memory
implementation. See docs/ for the architecture and the wire protocol.
"""

__version__ = "0.1.0"

from ._discovery import (
    Discovery,
    DiscoveryEvent,
    MemoryDiscoveryHub,
    PeerGone,
    PeerSeen,
    StaticDiscovery,
    parse_peer_address,
)
from ._membership import MemberRecord, Membership, PeerState, choose_gossip_targets, elect_leader
from ._node import LocalRequestError, Node, NodeConfig, NodeError
from ._transport import (
    BadRequest,
    MemoryNetwork,
    MemoryTransport,
    PeerUnreachable,
    RemoteRefused,
    RequestTimeout,
    Transport,
    TransportError,
)

__all__ = [
    "BadRequest", "Discovery", "DiscoveryEvent", "LocalRequestError", "MemberRecord", "Membership",
    "MemoryDiscoveryHub", "MemoryNetwork", "MemoryTransport", "Node", "NodeConfig", "NodeError",
    "PeerGone", "PeerSeen", "PeerState", "PeerUnreachable", "RemoteRefused", "RequestTimeout",
    "StaticDiscovery", "Transport", "TransportError", "__version__", "choose_gossip_targets",
    "elect_leader", "parse_peer_address",
]
