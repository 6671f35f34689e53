"""Per-class image statistics released once under DP (privacy/class_moments.py), and G's loss on them."""

import math

import numpy as np
import pytest
import torch

from medstylegan2.errors import CheckpointError, PrivacyError
from medstylegan2.privacy.class_moments import (SENSITIVITY, ClassMoments, coarse_pictures, moments_loss,
                                                release_class_moments)


def two_classes(n=200, seed=0):
    """Class 0: dark images with a bright left half, varying in brightness; class 1: uniform mid-grey."""
    rng = np.random.default_rng(seed)
    images = np.full((2 * n, 1, 16, 16), 128, dtype=np.uint8)
    images[:n, :, :, :8] = rng.integers(150, 250, size=(n, 1, 1, 1))
    images[:n, :, :, 8:] = 20
    labels = np.repeat([0, 1], n)
    return images, labels


def as_float(images):
    return torch.as_tensor(images).float() / 127.5 - 1.0


def test_without_noise_the_release_is_each_classs_exact_mean_picture_and_spread():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    for c in range(2):
        u = coarse_pictures(as_float(images[labels == c]), 4)
        assert torch.allclose(m.means[c], u.mean(0), atol=1e-5)
        assert m.spreads[c] == pytest.approx(float(u.var(0, unbiased=False).mean().sqrt()), abs=1e-5)
    assert m.spreads[1] == pytest.approx(0.0, abs=1e-6) and m.spreads[0] > 0.1
    assert m.usable.tolist() == [True, True]


def noiseless_sums(images, labels, num_classes, grid, groups=None):
    """The release's sums, rebuilt from what it reports (no noise: nothing clamps)."""
    m = release_class_moments(images, labels, num_classes=num_classes, grid=grid, noise_multiplier=None,
                              groups=groups)
    counts = m.counts.double()
    mean_square = (m.spreads.double() ** 2 + m.means.double().pow(2).mean(1)) * counts
    return torch.cat([(m.means.double() / grid * counts[:, None]).flatten(), mean_square, counts])


def test_one_image_moves_the_noiseless_sums_by_at_most_the_sensitivity():
    """The bound the Gaussian mechanism's noise is scaled to, checked on extreme images."""
    rng = np.random.default_rng(1)
    images = rng.choice(np.array([0, 255], dtype=np.uint8), size=(64, 1, 8, 8))
    images[0] = 255
    labels = rng.integers(0, 3, size=64)
    full = noiseless_sums(images, labels, 3, 4)
    for drop in range(5):
        keep = np.arange(64) != drop
        assert float((full - noiseless_sums(images[keep], labels[keep], 3, 4)).norm()) <= SENSITIVITY + 1e-6
    assert float((full - noiseless_sums(images[1:], labels[1:], 3, 4)).norm()) == pytest.approx(SENSITIVITY)


def test_a_patients_images_are_one_unit_clipped_together():
    """Ten bright images of one patient move the release no more than one image could; counted
    as ten separate units they would move it ten times as far."""
    images, labels = two_classes(n=50)
    patient = np.full((10, 1, 16, 16), 255, dtype=np.uint8)
    with_patient = (np.concatenate([images, patient]), np.concatenate([labels, np.zeros(10, dtype=np.int64)]))
    groups = np.concatenate([np.arange(100), np.full(10, 100)])
    moved = noiseless_sums(*with_patient, 2, 4, groups=groups) - noiseless_sums(images, labels, 2, 4,
                                                                                 groups=np.arange(100))
    assert float(moved.norm()) <= SENSITIVITY + 1e-6
    as_images = noiseless_sums(*with_patient, 2, 4) - noiseless_sums(images, labels, 2, 4)
    assert float(as_images.norm()) == pytest.approx(10 * SENSITIVITY, rel=1e-6)


def test_noise_has_the_gaussian_mechanisms_scale():
    images, labels = two_classes(n=2000)
    sigma = 5.0
    draws = torch.stack([release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=sigma,
                                               seed=s).means[0] for s in range(40)])
    exact = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None).means[0]
    # mean picture = grid * noisy sum / count: per-cell noise about grid * sigma * sqrt(3) / n
    expected = 4 * sigma * SENSITIVITY / 2000
    assert float((draws - exact).std()) == pytest.approx(expected, rel=0.25)
    assert float((draws - exact).mean().abs()) < expected


def test_a_class_too_small_for_its_noise_is_marked_unusable():
    images, labels = two_classes(n=20)
    m = release_class_moments(images, labels, num_classes=3, grid=4, noise_multiplier=50.0, seed=0)
    assert m.usable.tolist() == [False, False, False]  # 20 images under noise of std 87 per count
    assert moments_loss(torch.zeros(8, 1, 16, 16), torch.arange(8) % 3, m) == 0


def test_bad_input_names_the_problem():
    images, labels = two_classes(n=4)
    with pytest.raises(PrivacyError, match="one label per image"):
        release_class_moments(images, labels[:3], num_classes=2, grid=4, noise_multiplier=None)
    with pytest.raises(PrivacyError, match="labels must lie in 0..1"):
        release_class_moments(images, labels + 1, num_classes=2, grid=4, noise_multiplier=None)
    with pytest.raises(PrivacyError, match="noise multiplier must be > 0"):
        release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=math.nan)


def test_the_loss_is_zero_on_the_real_images_and_pushes_collapsed_fakes_apart():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    real = as_float(images)
    assert float(moments_loss(real, torch.as_tensor(labels), m)) == pytest.approx(0.0, abs=1e-6)
    # A class with one fake in the batch has no spread to compare: it is left out, not scored.
    lone = torch.cat([real[labels == 0], torch.ones(1, 1, 16, 16)])
    lone_labels = torch.cat([torch.zeros(int((labels == 0).sum()), dtype=torch.long), torch.ones(1, dtype=torch.long)])
    assert float(moments_loss(lone, lone_labels, m)) == pytest.approx(0.0, abs=1e-6)
    # Every class-0 fake the same image: right mean picture, no spread.
    collapsed = real[labels == 0].mean(0, keepdim=True).repeat(50, 1, 1, 1) + 0.01 * torch.randn(50, 1, 16, 16)
    collapsed.requires_grad_(True)
    loss = moments_loss(collapsed, torch.zeros(50, dtype=torch.long), m)
    assert float(loss.detach()) > 0.5 * float(m.spreads[0]) ** 2
    loss.backward()
    spread_before = float(coarse_pictures(collapsed.detach(), 4).std(0).mean())
    stepped = collapsed.detach() - 20.0 * collapsed.grad
    assert float(coarse_pictures(stepped, 4).std(0).mean()) > spread_before


def test_the_release_round_trips_and_a_malformed_state_is_named():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    back = ClassMoments.from_state(m.to_state(), "site-0 guide file")
    assert torch.equal(back.means, m.means) and torch.equal(back.usable, m.usable)
    broken = m.to_state() | {"means": torch.zeros(2, 5)}
    with pytest.raises(CheckpointError, match="site-0 guide file: the class-moments release is malformed"):
        ClassMoments.from_state(broken, "site-0 guide file")
