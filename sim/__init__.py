"""Deterministic simulator that runs the node's real code on a simulated network."""
