"""Versioned parameter server: staleness decided by versions, a native aggregation loop, checkpoints."""
