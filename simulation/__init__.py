"""Federated simulation: N virtual hospitals over partitioned data on Flower's simulation engine."""
