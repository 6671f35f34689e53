"""FD / KID / precision-recall through torch-fidelity in the domain classifier's feature space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.classifier import save_classifier, train_classifier
from medstylegan2.errors import MissingWeightsError
from medstylegan2.metrics.features import DOMAIN_EXTRACTOR, register_domain_extractor
from medstylegan2.metrics.fidelity import (FeatureSpace, calculate_metrics_dirs, extract_features,
                                           fidelity_from_features, fidelity_per_class)
from medstylegan2.phantoms import generate_phantoms

NOISE_LEVELS = (0, 8, 24, 48, 96)


@pytest.fixture(scope="module")
def sets():
    return generate_phantoms(40, 32, seed=0), generate_phantoms(40, 32, seed=1)


@pytest.fixture(scope="module")
def domain_space(sets, tmp_path_factory):
    train, _ = sets
    model = train_classifier(train.images, train.labels, steps=120, batch_size=32, seed=0)
    path = save_classifier(model, tmp_path_factory.mktemp("clf") / "domain_classifier.pt")
    return FeatureSpace.domain(path)


def _noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    if sigma == 0:
        return images
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0.0, sigma, images.shape), 0, 255).astype(np.uint8)


def test_domain_extractor_is_registered_in_torch_fidelity(domain_space):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    assert register_domain_extractor() == DOMAIN_EXTRACTOR  # idempotent
    assert DOMAIN_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY
    fe = create_feature_extractor(DOMAIN_EXTRACTOR, ["domain"], cuda=False, verbose=False,
                                  feature_extractor_weights_path=str(domain_space.weights_path))
    (feats,) = fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (2, 128)
    with pytest.raises(MissingWeightsError, match="domain classifier"):
        create_feature_extractor(DOMAIN_EXTRACTOR, ["domain"], cuda=False, verbose=False)


def test_fd_and_kid_of_a_set_against_itself_are_about_zero(sets, domain_space):
    _, heldout = sets
    f = extract_features(heldout.images, domain_space)
    m = fidelity_from_features(f, f)
    noisy = fidelity_from_features(extract_features(_noisy(heldout.images, 96), domain_space), f)
    assert abs(m["fd"]) < 1e-6 * noisy["fd"]
    # KID's unbiased estimator gives a set against itself -2 (mean k(x,x) - mean k(x,y)) / n: ~0, not exactly 0
    assert m["kid"] <= 0 and abs(m["kid"]) < 0.2 * noisy["kid"]
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_fd_and_kid_grow_monotonically_as_gaussian_noise_is_added(sets, domain_space):
    _, heldout = sets
    real = extract_features(heldout.images, domain_space)
    fds, kids = [], []
    for sigma in NOISE_LEVELS:
        m = fidelity_from_features(extract_features(_noisy(heldout.images, sigma), domain_space), real, prc=False)
        fds.append(m["fd"])
        kids.append(m["kid"])
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_precision_and_recall_lie_in_the_unit_interval_per_class_and_overall(sets, domain_space):
    train, heldout = sets
    fake = _noisy(train.images, 40, seed=3)
    res = fidelity_per_class(fake, train.labels, heldout.images, heldout.labels, domain_space, train.class_names)
    figures = [res["overall"]] + list(res["per_class"].values())
    assert len(figures) == 4
    for fig in figures:
        for key in ("precision", "recall", "f_score"):
            assert 0.0 <= fig[key] <= 1.0
        assert fig["fd"] > 0


def test_sizes_too_small_for_a_metric_give_none(domain_space):
    one = generate_phantoms(1, 32, seed=5)
    f = extract_features(one.images, domain_space)
    m = fidelity_from_features(f[:1], f[:1])
    assert m["fd"] is None and m["kid"] is None and m["precision"] is None


def test_figures_equal_torch_fidelity_calculate_metrics_on_image_folders(sets, domain_space, tmp_path):
    from medstylegan2.images import write_image_folder

    train, heldout = sets
    fake_dir = write_image_folder(train, tmp_path / "fake")
    real_dir = write_image_folder(heldout, tmp_path / "real")
    # KID subsets of the whole sets: the order in which images are listed cannot matter
    n = len(train.images)
    direct = calculate_metrics_dirs(fake_dir, real_dir, domain_space, kid_subset_size=n, save_cpu_ram=True)
    ours = fidelity_from_features(extract_features(train.images, domain_space, use_cache=False),
                                  extract_features(heldout.images, domain_space, use_cache=False),
                                  kid_subset_size=n)
    assert ours["fd"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-4, abs=1e-6)
    assert ours["precision"] == pytest.approx(direct["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(direct["recall"], abs=1e-6)
    assert ours["kid"] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-3, abs=1e-7)
