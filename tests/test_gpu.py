"""CUDA checks: skipped (never faked) when no GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.config import ModelConfig
from medstylegan2.networks import build_networks
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import SiteTrainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_generator_and_discriminator_agree_between_cpu_and_cuda():
    torch.manual_seed(0)
    G, D = build_networks(ModelConfig(resolution=64))
    z, c = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 0])
    img_cpu = G(z, c, noise_mode="const")
    logits_cpu = D(img_cpu, c)
    G.cuda(), D.cuda()
    img_gpu = G(z.cuda(), c.cuda(), noise_mode="const")
    assert torch.allclose(img_gpu.cpu(), img_cpu, atol=1e-3)
    assert torch.allclose(D(img_gpu, c.cuda()).cpu(), logits_cpu, atol=1e-3)


def test_site_trainer_trains_on_cuda_and_checkpoints_load_on_cpu(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (32, 1, 16, 16), dtype=np.uint8), rng.integers(0, 3, 32)
    trainer = SiteTrainer(tiny_config, images, labels, device="cuda")
    stats = trainer.train_steps(4)
    assert all(np.isfinite(v) for v in stats.values())
    assert next(trainer.G.parameters()).is_cuda
    state = read_checkpoint(trainer.save_checkpoint(tmp_path / "gpu.pt"))
    cpu_trainer = SiteTrainer(tiny_config, images, labels, device="cpu")
    cpu_trainer.set_weights(state)
