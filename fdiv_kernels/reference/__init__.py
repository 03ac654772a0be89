"""Literal baselines and reference formulas (not for training)."""
