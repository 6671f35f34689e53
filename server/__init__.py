"""Flower ServerApp and the federated GAN strategy (``server.server_app:app``)."""
