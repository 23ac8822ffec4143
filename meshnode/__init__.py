"""meshnode: the mesh node that runs beside every charger.

Public API is re-exported here as the node grows; see docs/ for the architecture.
"""

__version__ = "0.1.0"
