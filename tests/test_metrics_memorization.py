"""Memorization audit: nearest training image in pixel and domain space, against the real-to-real baseline."""

from __future__ import annotations

import numpy as np
import pytest

from medstylegan2.classifier import train_classifier
from medstylegan2.metrics.memorization import COPY_RMS, memorization_audit, nearest
from medstylegan2.metrics.plots import save_memorization_pairs
from medstylegan2.phantoms import generate_phantoms


@pytest.fixture(scope="module")
def data():
    train = generate_phantoms(20, 32, seed=0)
    heldout = generate_phantoms(10, 32, seed=1)
    fresh = generate_phantoms(10, 32, seed=2)
    model = train_classifier(train.images, train.labels, steps=40, batch_size=32, seed=0)
    return train, heldout, fresh, model


def test_audit_finds_a_planted_copy_of_a_training_image(data, tmp_path):
    train, heldout, fresh, model = data
    fake_images, fake_labels = fresh.images.copy(), fresh.labels.copy()
    planted_at, source = 13, 42
    fake_images[planted_at] = train.images[source]
    fake_labels[planted_at] = train.labels[source]
    res = memorization_audit(fake_images, fake_labels, train.images, train.labels, heldout.images,
                             train.class_names, domain_model=model)
    top = res["closest_pairs"][0]
    assert top["generated_index"] == planted_at and top["train_index"] == source
    assert top["pixel_distance"] == 0.0 and top["domain_distance"] == pytest.approx(0.0, abs=1e-5)
    assert res["pixel"]["near_copies"] == 1
    assert res["pixel"]["fake_to_train"]["min"] == 0.0
    assert res["pixel"]["fraction_below"] >= 1 / len(fake_images)
    assert len(res["closest_pairs"]) == 8
    png = save_memorization_pairs(fake_images, train.images, res["closest_pairs"], tmp_path / "pairs.png")
    assert png.stat().st_size > 1000


def test_copies_score_far_above_fresh_samples(data):
    train, heldout, fresh, model = data
    copies = memorization_audit(train.images[::2], train.labels[::2], train.images, train.labels, heldout.images,
                                train.class_names, domain_model=model)
    new = memorization_audit(fresh.images, fresh.labels, train.images, train.labels, heldout.images,
                             train.class_names, domain_model=model)
    assert copies["pixel"]["fraction_below"] == 1.0 and copies["domain"]["fraction_below"] == 1.0
    assert new["pixel"]["fraction_below"] <= 0.3 and new["pixel"]["near_copies"] == 0
    summary = new["pixel"]["fake_to_train"]
    assert summary["min"] <= summary["p5"] <= summary["p50"] <= summary["p75"]
    assert set(new["pixel"]["per_class_fraction_below"]) == set(train.class_names)
    assert new["pixel"]["threshold"] == pytest.approx(np.percentile(
        [r for r in nearest(heldout.images.reshape(30, -1) / 255.0, train.images.reshape(60, -1) / 255.0)[0]], 5)
        / np.sqrt(32 * 32))


def test_exact_copy_distance_is_zero_despite_fast_search():
    rng = np.random.default_rng(0)
    ref = rng.random((300, 4096)).astype(np.float32) * 50
    d, i = nearest(ref[[7, 123]], ref)
    assert list(i) == [7, 123] and list(d) == [0.0, 0.0]
    assert COPY_RMS > 0


def test_pixel_nearest_over_training_chunks_matches_one_search():
    from medstylegan2.metrics.memorization import pixel_nearest, pixel_vectors

    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8)
    query = np.concatenate([train[[3, 41]], rng.integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)])
    d_chunked, i_chunked = pixel_nearest(query, train, train_chunk=7)
    d_one, i_one = nearest(pixel_vectors(query), pixel_vectors(train))
    assert list(i_chunked) == list(i_one) and i_chunked[:2].tolist() == [3, 41]
    np.testing.assert_allclose(d_chunked, d_one / 8.0)
    assert d_chunked[0] == 0.0 and d_chunked[1] == 0.0
