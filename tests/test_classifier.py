"""The domain X-ray classifier: API, determinism, learning a separable toy problem, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.classifier import (XrayClassifier, classification_scores, evaluate_classifier, extract_features,
                                     load_classifier, save_classifier, train_classifier)
from medstylegan2.errors import CheckpointError


def _toy_set(per_class: int = 30, res: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose class is a bright horizontal band at one of three heights."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    images = rng.integers(0, 90, size=(len(labels), 1, res, res)).astype(np.uint8)
    band = res // 6
    for i, k in enumerate(labels):
        top = band + 2 * k * band
        images[i, 0, top:top + band, res // 8: -res // 8] += 140
    return images, labels


def test_features_and_logits_have_the_documented_shapes():
    model = XrayClassifier(num_classes=3, resolution=64, width=32, feature_dim=128)
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    assert model.features(x).shape == (5, 128)
    assert model(x).shape == (5, 3)
    # another input size is resized, not rejected
    assert model.features(torch.zeros(2, 1, 32, 32)).shape == (2, 128)
    assert 60_000 < sum(p.numel() for p in model.parameters()) < 150_000


def test_training_is_deterministic_for_a_seed_and_differs_across_seeds():
    images, labels = _toy_set(per_class=10)
    a = train_classifier(images, labels, steps=5, batch_size=16, seed=3)
    b = train_classifier(images, labels, steps=5, batch_size=16, seed=3)
    c = train_classifier(images, labels, steps=5, batch_size=16, seed=4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_classifier_learns_a_separable_problem_and_generalises():
    images, labels = _toy_set(per_class=30, seed=0)
    test_images, test_labels = _toy_set(per_class=20, seed=1)
    model = train_classifier(images, labels, steps=120, batch_size=32, seed=0)
    scores = evaluate_classifier(model, test_images, test_labels)
    assert scores["accuracy"] >= 0.9
    assert scores["macro_f1"] >= 0.9
    assert len(scores["per_class_recall"]) == 3


def test_scores_macro_f1_and_recall_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    s = classification_scores(labels, preds, 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["per_class_recall"] == [0.5, 1.0, 0.5]
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    # a class absent from the labels has no recall and is left out of the macro average
    s = classification_scores(np.array([0, 1]), np.array([0, 1]), 3)
    assert s["per_class_recall"] == [1.0, 1.0, None] and s["macro_f1"] == 1.0


def test_save_load_roundtrip_gives_identical_features(tmp_path):
    images, labels = _toy_set(per_class=5)
    model = train_classifier(images, labels, steps=3, batch_size=8)
    path = save_classifier(model, tmp_path / "sub" / "clf.pt", meta={"trained_on": "toy"})
    loaded = load_classifier(path)
    assert loaded.config() == model.config()
    np.testing.assert_array_equal(extract_features(model, images), extract_features(loaded, images))


def test_load_classifier_reports_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "absent.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a medstylegan2"):
        load_classifier(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_classifier(tmp_path / "garbage.pt")
