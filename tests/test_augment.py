"""Differentiable augmentation of D's inputs (train.augment): each transform keeps the image's shape,
draws its parameters per image, lets G's gradient through, and is applied to every image D judges -
reals (DP or not), fakes in D's loss and in G's. Unknown names are a config error naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.augment import AUGMENTATIONS, CUTOUT_SHARE, cutout, identity, make_augment, translation
from medstylegan2.config import load_config
from medstylegan2.config_checks import AUGMENTATION_NAMES
from medstylegan2.errors import ConfigError
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.trainer import SiteTrainer


def test_the_config_check_knows_exactly_the_registry():
    assert tuple(AUGMENTATIONS) == AUGMENTATION_NAMES


def test_no_transform_is_the_identity():
    assert make_augment([]) is identity


def test_an_unknown_transform_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.augment"):
        load_config(None, ["train.augment=[translation, flip]"])
    with pytest.raises(ValueError, match="flip"):
        make_augment(["flip"])


def test_translation_moves_each_image_by_its_own_whole_pixel_shift():
    torch.manual_seed(0)
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0  # one bright pixel per image
    out = translation(x)
    assert out.shape == x.shape
    positions = [tuple(int(v) for v in (img[0] == 1.0).nonzero()[0]) for img in out]
    assert all(abs(r - 8) <= 2 and abs(c - 8) <= 2 for r, c in positions)  # an eighth of 16: up to 2
    assert len(set(positions)) > 5  # drawn per image, not once per batch
    assert all(int((img[0] == 1.0).sum()) == 1 for img in out)  # moved, not blurred or duplicated


def test_cutout_blanks_one_square_of_half_the_side_per_image():
    torch.manual_seed(0)
    x = torch.ones(32, 1, 16, 16)
    out = cutout(x)
    side = int(16 * CUTOUT_SHARE)
    assert torch.all((out == 0).sum(dim=(1, 2, 3)) == side * side)
    assert len({tuple(img.flatten().tolist()) for img in out}) > 5


@pytest.mark.parametrize("names", [["color"], ["translation"], ["cutout"], ["color", "translation", "cutout"]])
def test_gradients_flow_back_through_every_transform(names):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16, requires_grad=True)
    make_augment(names)(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def tiny(*extra: str):
    return load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=16",
                              "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                              "model.mbstd_group_size=0", "train.batch_size=4", "train.r1_interval=1",
                              "train.augment=[color, translation, cutout]", *extra])


def counting_augment(trainer: SiteTrainer) -> list[int]:
    """Replace the trainer's augmentation by one that records the batch size of each call."""
    calls: list[int] = []
    inner = trainer.loss.augment

    def counted(x):
        calls.append(x.shape[0])
        return inner(x)

    trainer.loss.augment = counted
    return calls


def test_every_image_d_judges_is_augmented_without_dp():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3
    trainer = SiteTrainer(tiny(), images, labels, device="cpu")
    calls = counting_augment(trainer)
    stats = trainer.train_steps(1)
    assert np.isfinite(stats["loss_d_real"]) and np.isfinite(stats["loss_g"])
    assert len(calls) == 3  # G's fakes, D's fakes, D's reals (R1 on the augmented reals)


@pytest.mark.parametrize("clip_fakes", [False, True])
def test_a_dp_site_augments_its_private_reals_and_its_fakes(clip_fakes):
    cfg = tiny("privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0",
               f"train.dp_clip_fakes={str(clip_fakes).lower()}")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    calls = counting_augment(trainer)
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_d_fake"]) and engine.spent_steps == 2
    assert len(calls) == 6  # per step: G's fakes, the Poisson batch of reals, D's fakes


def test_a_study_digest_is_unchanged_by_the_key_at_its_default_and_changed_when_it_is_set():
    # Arms finished before train.augment existed stay reusable; an arm that augments is another arm.
    from medstylegan2.study.config import digest_view

    plain = load_config(None, []).to_dict()
    augmented = load_config(None, ["train.augment=[cutout]"]).to_dict()
    assert "augment" in plain["train"] and "augment" not in digest_view(plain)["train"]
    assert digest_view(augmented)["train"]["augment"] == ["cutout"]
    assert "augment" in plain["train"]  # the view is a copy
