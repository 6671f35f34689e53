"""Under DP, D's real term on public Normal images (train.public_real_weight): it reads public
images only, labelled Normal, outside the clip and the noise; the accountant sees the same steps;
weight 0 changes nothing; and it does teach D what a public real image looks like."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.config import ConfigError, load_config
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.public_term import PUBLIC_LABEL, public_images_of, public_normal_images
from medstylegan2.trainer import SiteTrainer, images_to_float

SMALL = ["model.resolution=16", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16",
         "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16", "model.mbstd_group_size=0",
         "model.d_class_head=true", "train.batch_size=4", "train.r1_interval=2", "privacy.enabled=true",
         "privacy.noise_multiplier=1.0", "privacy.noise_seed=0", "data.public_normals=6",
         "data.public_seed=99"]


def private_set():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3


def dp_trainer(weight: float, *, public: bool = True) -> tuple[SiteTrainer, DPEngine]:
    cfg = load_config(None, SMALL + [f"train.public_real_weight={weight}"])
    images, labels = private_set()
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    public_images = public_normal_images(6, 16, 99) if public else None
    return SiteTrainer(cfg, images, labels, device="cpu", seed=0, privacy=engine, public_images=public_images), engine


def trained(weight: float, steps: int, *, public: bool = True) -> tuple[SiteTrainer, DPEngine, dict[str, float]]:
    # Built and trained in one go: a trainer seeds the process' RNG when it is built.
    trainer, engine = dp_trainer(weight, public=public)
    return trainer, engine, trainer.train_steps(steps)


def weights(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v for net, state in trainer.get_weights().items() for k, v in state.items()}


def test_the_public_set_is_the_normal_phantoms_of_its_own_seed():
    cfg = load_config(None, SMALL + ["train.public_real_weight=1.0"])
    images = public_images_of(cfg)
    assert images.shape == (6, 1, 16, 16) and images.dtype == np.uint8
    assert not images.flags.writeable  # one array shared by every trainer of a process
    assert public_images_of(load_config(None, SMALL)) is None  # weight 0: nothing rendered


def test_weight_zero_changes_nothing():
    with_set, _, _ = trained(0.0, 3)
    without, _, _ = trained(0.0, 3, public=False)
    for name, value in weights(without).items():
        assert torch.equal(weights(with_set)[name], value), name


def test_the_term_reads_only_public_normal_images_and_takes_no_dp_step():
    """Under DP the private real loss is the engine's (per-sample, clipped, noised); every call of
    the trainer's own real loss is the public term's, and each image it reads is a public one."""
    trainer, engine = dp_trainer(1.0)
    public = images_to_float(np.array(public_normal_images(6, 16, 99))).flatten(1)
    private = images_to_float(private_set()[0]).flatten(1)
    seen: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    real_loss = trainer.loss.discriminator_real

    def recording(images, labels, r1_weight):
        seen.append((images.detach().flatten(1).clone(), labels.clone(), r1_weight))
        return real_loss(images, labels, r1_weight)

    trainer.loss.discriminator_real = recording
    stats = trainer.train_steps(4)
    _, reference_engine, _ = trained(0.0, 4)
    assert len(seen) == 4 and np.isfinite(stats["loss_d_public"])
    for images, labels, _ in seen:
        assert (labels == PUBLIC_LABEL).all()
        assert (torch.cdist(images, public).min(dim=1).values == 0).all()  # every row is a public image
        assert (torch.cdist(images, private).min(dim=1).values > 0).all()
    assert sorted({r1 > 0 for _, _, r1 in seen}) == [False, True]  # lazy R1 on public images too
    # The accountant sees D's private steps only: the same with the term as without.
    assert engine.spent_steps == reference_engine.spent_steps == 4
    assert engine.epsilon() == pytest.approx(reference_engine.epsilon())


def test_the_term_teaches_d_that_public_normal_images_are_real():
    trainer, _, _ = trained(4.0, 12)
    reference, _, _ = trained(0.0, 12)
    public = images_to_float(np.array(public_normal_images(6, 16, 99)))
    labels = torch.full((len(public),), PUBLIC_LABEL)
    with torch.no_grad():
        lifted, before = trainer.D(public, labels).flatten(), reference.D(public, labels).flatten()
    assert (lifted > before).all() and (lifted - before).mean() > 0.05


def test_without_dp_the_term_is_off():
    cfg = load_config(None, [k for k in SMALL if not k.startswith("privacy.")] + ["train.public_real_weight=1.0"])
    images, labels = private_set()
    trainer = SiteTrainer(cfg, images, labels, device="cpu", seed=0, public_images=public_normal_images(6, 16, 99))
    assert "loss_d_public" not in trainer.train_steps(2)


def test_a_public_seed_equal_to_the_private_seed_is_refused():
    with pytest.raises(ConfigError, match="data.public_seed"):
        load_config(None, SMALL + ["train.public_real_weight=1.0", "data.seed=99"])
    with pytest.raises(ConfigError, match="train.public_real_weight"):
        load_config(None, SMALL + ["train.public_real_weight=-1.0"])
