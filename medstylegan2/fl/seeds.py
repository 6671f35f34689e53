"""Seeds of a federated run that every party derives alike: per (run seed, round, site)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def site_seed(seed: int, round_num: int, site: str) -> int:
    """A 63-bit seed that depends only on (run seed, round, site), stable across processes."""
    digest = hashlib.sha256(f"{seed}:{round_num}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def seed_round(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
