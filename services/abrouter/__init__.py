"""Deterministic, audited A/B assignment: GrowthBook-compatible hashing, exposure log, audits and analysis."""
