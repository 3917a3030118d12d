"""Model scoring with drift-aware thresholds, explanations and automatic rollback."""
