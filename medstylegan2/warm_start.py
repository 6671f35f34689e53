"""Warm start from another run's networks, and the D-step count the DP accountant plans for.

``load_init_weights`` is ``train.init_checkpoint`` (``train-local --init CKPT``): G, G_ema and D of a
checkpoint (e.g. pretrained on public data) replace a trainer's fresh ones before training. The
federation's server applies it once to the initial global weights; sites then receive them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medstylegan2.config import RunConfig
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import NETWORK_NAMES, SiteTrainer

log = logging.getLogger(__name__)


def load_init_weights(trainer: SiteTrainer, path: str | Path) -> None:
    """G, G_ema and D weights of the checkpoint at ``path`` into ``trainer``.

    The model constants (fixed noise images) stay the ones built from the run's seed, so every
    party of a federation still builds identical constants; optimizers and counters start fresh.
    A checkpoint of another model size is a ``CheckpointError`` naming the key.
    """
    state = read_checkpoint(path)
    weights = {}
    for name in NETWORK_NAMES:
        own = trainer.network(name).state_dict()
        weights[name] = {k: (own[k] if k.rsplit(".", 1)[-1] == "noise_const" and k in own else v)
                         for k, v in state[name].items()}
    trainer.set_weights(weights)
    log.info("warm start: G, G_ema and D from %s", path)


def planned_d_steps(cfg: RunConfig, g_steps: int) -> int:
    """D updates (each a DP-SGD step under privacy) that ``g_steps`` trainer steps take."""
    return g_steps * cfg.train.d_steps_per_g
