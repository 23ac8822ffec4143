"""Uplink probe, forwarder to the cloud, and the reference reconciliation service."""
