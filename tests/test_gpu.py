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


def _site(n: int = 32, resolution: int = 16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8), rng.integers(0, 3, n)


def test_cuda_defaults_are_bf16_autocast_channels_last_and_fused_adam(tiny_config):
    images, labels = _site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert trainer.accel.autocast_dtype == expected and trainer.accel.channels_last
    assert trainer.g_opt.defaults["fused"] and trainer.d_opt.defaults["fused"]
    stats = trainer.train_steps(4)
    assert all(np.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in trainer.G.parameters())


def test_a_cuda_training_step_never_waits_for_the_gpu(tiny_config):
    """No host sync inside a step (the statistics are read once per train_steps call)."""
    images, labels = _site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cuda")
    trainer.train_steps(2)  # warm-up: allocations, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # tiny_config: path length and R1 every 2 steps
            trainer._train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bf16_autocast_networks_track_their_fp32_outputs():
    torch.manual_seed(0)
    G, D = build_networks(ModelConfig(resolution=64))
    G, D = G.cuda(), D.cuda()
    z, c = torch.randn(8, G.z_dim, device="cuda"), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device="cuda")
    img32 = G(z, c, noise_mode="const")
    logits32 = D(img32, c)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        img16 = G(z, c, noise_mode="const")
        logits16 = D(img32, c)
    assert (img16.float() - img32).abs().max() < 0.05 * img32.abs().max()
    assert (logits16.float() - logits32).abs().max() < 0.05 * logits32.abs().max().clamp(min=1)


def test_private_cuda_steps_use_fixed_padded_batches_and_a_working_compiled_function():
    from medstylegan2.config import load_config
    from medstylegan2.privacy import per_sample
    from medstylegan2.privacy.engine import make_privacy_engine

    cfg = load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=32",
                             "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                             "model.mbstd_group_size=0", "train.batch_size=8", "train.r1_interval=2",
                             "privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0"])
    images, labels = _site(64)
    trainer = SiteTrainer(cfg, images, labels, device="cuda", privacy=make_privacy_engine(cfg, 64, 100, 0))
    stats = trainer.train_steps(4)
    assert all(np.isfinite(v) for v in stats.values())
    assert trainer.privacy.pad_to is not None and trainer.privacy.pad_to >= 8
    assert per_sample._COMPILED and not any(fn.failed for fn in per_sample._COMPILED.values())


def test_compiled_training_runs_on_cuda(tiny_config):
    import dataclasses

    images, labels = _site()
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, compile=True))
    trainer = SiteTrainer(cfg, images, labels, device="cuda")
    stats = trainer.train_steps(4)
    assert all(np.isfinite(v) for v in stats.values())
