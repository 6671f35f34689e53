"""Shared fixtures: tiny configurations so the whole suite runs on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_config():
    """A 16-px model small enough for many forward/backward passes in a test."""
    from medstylegan2.config import load_config

    return load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=32",
                              "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                              "train.batch_size=4", "train.r1_interval=2", "train.pl_interval=2",
                              "data.phantoms_per_class=12"])


@pytest.fixture
def one_thread():
    """One torch thread for the test: sites that run one after another in this process get one
    thread each, as the simulation engines give them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
