"""Evaluation protocols (kNN, cached-feature probes) and representation analysis."""
