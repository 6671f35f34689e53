"""Flower ClientApp of a hospital site (``client.client_app:app``)."""
