"""Baselines the network is measured against, written as run directories like any training run."""
