"""LPIPS figures (lpips / ST-LPIPS from local files): diversity and distance to the nearest real image."""

from __future__ import annotations

import numpy as np
import pytest

from medstylegan2.errors import MissingWeightsError
from medstylegan2.metrics.lpips_metrics import (load_lpips, lpips_diversity, lpips_figures, pixel_nearest,
                                                sample_pairs)
from medstylegan2.phantoms import generate_phantoms


@pytest.fixture(scope="module")
def lpips_model():
    try:
        return load_lpips("alex")
    except MissingWeightsError as exc:  # neither official AlexNet nor stlpips-pytorch available
        pytest.skip(f"no LPIPS backbone can be loaded: {exc}")


@pytest.fixture(scope="module")
def phantoms():
    return generate_phantoms(12, 32, seed=0)


def test_lpips_diversity_of_identical_images_is_zero(lpips_model, phantoms):
    same = np.repeat(phantoms.images[:1], 8, axis=0)
    d = lpips_diversity(lpips_model, same)
    assert d["mean"] == 0.0 and d["pairs"] == 28


def test_lpips_diversity_of_distinct_images_is_positive_and_bounded(lpips_model, phantoms):
    d = lpips_diversity(lpips_model, phantoms.images[phantoms.labels == 0], max_pairs=20, seed=1)
    assert d["pairs"] == 20
    assert 0.0 < d["mean"] < 1.0


def test_feature_path_equals_the_library_forward(lpips_model, phantoms):
    x = phantoms.images
    i, j = sample_pairs(len(x), 15, seed=2)
    f = lpips_model.features(x)
    np.testing.assert_allclose(lpips_model.distance_from_features(f, i, f, j), lpips_model.distance(x[i], x[j]),
                               rtol=1e-5, atol=1e-7)


def test_lpips_to_nearest_real_is_zero_when_every_generated_image_is_real(lpips_model, phantoms):
    real = phantoms.images
    fake = real[[3, 7, 11]]
    res = lpips_figures(lpips_model, fake, real, max_pairs=3, candidates=2)
    assert res["to_nearest_real"]["mean"] == 0.0
    other = generate_phantoms(2, 32, seed=9).images
    assert lpips_figures(lpips_model, other, real, max_pairs=1)["to_nearest_real"]["mean"] > 0.0
    assert res["label"] in ("LPIPS (alex)", "ST-LPIPS (alex)")


def test_sample_pairs_are_distinct_bounded_and_seeded():
    i, j = sample_pairs(5, 100, seed=0)
    assert len(i) == 10 and (i < j).all()
    i, j = sample_pairs(50, 30, seed=0)
    assert len(i) == 30 and (i != j).all()
    assert np.array_equal(i, sample_pairs(50, 30, seed=0)[0])
    assert len(sample_pairs(1, 10, seed=0)[0]) == 0


def test_pixel_nearest_finds_the_identical_image():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    d, idx = pixel_nearest(ref[[4, 9]], ref, k=2)
    assert list(idx[:, 0]) == [4, 9]
    assert np.allclose(d[:, 0], 0.0, atol=1e-3) and (d[:, 1] > 0.1).all()
