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
from ._node import Node, NodeConfig, NodeError
from ._security import Certificate, Identity, SealedTransport, Sealer, Site, issue_certificate
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
from .services import Conflict, InvalidCommand, NotAuthorised, NotFound, ServiceError

__all__ = [
    "BadRequest",
    "Certificate",
    "Conflict",
    "Discovery",
    "DiscoveryEvent",
    "Identity",
    "InvalidCommand",
    "MemberRecord",
    "Membership",
    "MemoryDiscoveryHub",
    "MemoryNetwork",
    "MemoryTransport",
    "Node",
    "NodeConfig",
    "NodeError",
    "NotAuthorised",
    "NotFound",
    "PeerGone",
    "PeerSeen",
    "PeerState",
    "PeerUnreachable",
    "RemoteRefused",
    "RequestTimeout",
    "SealedTransport",
    "Sealer",
    "ServiceError",
    "Site",
    "StaticDiscovery",
    "Transport",
    "TransportError",
    "__version__",
    "choose_gossip_targets",
    "elect_leader",
    "issue_certificate",
    "parse_peer_address",
]
