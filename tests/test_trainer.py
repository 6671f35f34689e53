"""The site trainer: steps, EMA, exact resume from a checkpoint, weights that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.errors import CheckpointError
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import SiteTrainer


def random_site(n: int = 24, resolution: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8), rng.integers(0, 3, n)


def test_training_steps_give_finite_losses_and_count_images(tiny_config):
    images, labels = random_site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cpu")
    stats = trainer.train_steps(3)
    for key in ("loss_g", "loss_d_fake", "loss_d_real", "loss_pl", "images_per_second"):
        assert np.isfinite(stats[key]), key
    assert trainer.step == 3
    assert trainer.cur_nimg == 3 * tiny_config.train.batch_size


def test_ema_generator_trails_the_generator(tiny_config):
    images, labels = random_site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cpu")
    before = [p.clone() for p in trainer.G_ema.parameters()]
    trainer.train_steps(2)
    moved = sum((a - b).abs().sum().item() for a, b in zip(trainer.G_ema.parameters(), before))
    gap = sum((a - b).abs().sum().item() for a, b in zip(trainer.G_ema.parameters(), trainer.G.parameters()))
    assert moved > 0 and gap > 0


def test_resume_from_checkpoint_continues_exactly_like_an_uninterrupted_run(tiny_config, tmp_path):
    images, labels = random_site()
    uninterrupted = SiteTrainer(tiny_config, images, labels, device="cpu")
    uninterrupted.train_steps(3)
    expected_next = uninterrupted.train_step()
    expected_weights = uninterrupted.get_weights()

    first = SiteTrainer(tiny_config, images, labels, device="cpu")
    first.train_steps(3)
    path = first.save_checkpoint(tmp_path / "ckpt.pt")
    torch.manual_seed(12345)  # the resumed process starts from an unrelated RNG state
    resumed = SiteTrainer(tiny_config, images, labels, device="cpu", seed=99)
    resumed.load_state_dict(read_checkpoint(path))
    got_next = resumed.train_step()

    assert got_next == expected_next
    for net in ("G", "G_ema", "D"):
        for key, value in expected_weights[net].items():
            assert torch.equal(resumed.get_weights()[net][key], value), f"{net}.{key}"


def test_dcgan_baseline_trains_through_the_same_trainer(tiny_config):
    tiny_config.model.arch = "dcgan"
    images, labels = random_site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cpu")
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_g"]) and "loss_pl" not in stats


def test_weights_of_another_model_size_are_rejected_naming_the_key(tiny_config):
    images, labels = random_site()
    trainer = SiteTrainer(tiny_config, images, labels, device="cpu")
    weights = trainer.get_weights()
    key = next(iter(weights["D"]))
    weights["D"][key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=f"D.{key}: shape"):
        trainer.set_weights(weights)
