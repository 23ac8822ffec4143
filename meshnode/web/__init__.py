"""The node's operator page: a live view of the mesh, its sessions, conflicts and chargers.

`page_routes(node)` gives the routes the node's HTTP API mounts (`meshnode/_api.py`):
the page at `GET /`, its assets, and the `/v1/page/...` data routes (JSON and
server-sent events). See `_page.py` for the costs and bounds, docs/operator.md for
what an operator sees.
"""

from ._page import MAX_CLIENTS, REFRESH, LiveFeed, node_snapshot, page_routes, should_send, snapshot_digest

__all__ = ["MAX_CLIENTS", "REFRESH", "LiveFeed", "node_snapshot", "page_routes", "should_send", "snapshot_digest"]
