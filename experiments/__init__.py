"""Experiment binaries and their ml_collections configs (`python -m experiments.train`)."""
