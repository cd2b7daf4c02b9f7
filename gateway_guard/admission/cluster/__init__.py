"""The Redis-backed gate: one cap shared by every guard replica in front of an upstream (see docs/cluster.md)."""
