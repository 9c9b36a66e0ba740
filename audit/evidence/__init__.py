"""Dataset-level evidence: statistics per class × region kind × method, and the verdicts."""
