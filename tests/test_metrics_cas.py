"""Classification accuracy score on planted sets, its place in the evaluator record, metrics.jsonl and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medstylegan2.classifier import evaluate_classifier, predict, save_classifier, train_classifier
from medstylegan2.config import MetricsConfig
from medstylegan2.metrics.cas import classification_accuracy_score
from medstylegan2.metrics.evaluate import evaluate_images, metrics_for_evaluation
from medstylegan2.metrics.plots import measured_panels, read_rounds
from medstylegan2.phantoms import generate_phantoms

CLASSES = ("Normal", "COVID-19", "Non-COVID")


@pytest.fixture(scope="module")
def planted():
    """A small real-trained classifier, real held-out phantoms, and another real draw to pass as "generated"."""
    train = generate_phantoms(40, 32, seed=0)
    heldout = generate_phantoms(100, 32, seed=1)
    generated = generate_phantoms(100, 32, seed=2)
    model = train_classifier(train.images, train.labels, steps=100, batch_size=32, seed=0)
    real_accuracy = evaluate_classifier(model, heldout.images, heldout.labels)["accuracy"]
    assert real_accuracy > 0.6, "the planted-set tests need a classifier well above chance"
    return model, train, heldout, generated, real_accuracy


def test_real_images_passed_as_generated_score_about_the_classifiers_real_accuracy(planted):
    model, _, _, generated, real_accuracy = planted
    cas = classification_accuracy_score(model, generated.images, generated.labels, CLASSES)
    assert cas["overall"] == pytest.approx(real_accuracy, abs=0.06)


def test_shuffled_conditioning_labels_score_about_one_third(planted):
    model, _, _, generated, real_accuracy = planted
    shuffled = np.random.default_rng(0).permutation(generated.labels)
    cas = classification_accuracy_score(model, generated.images, shuffled, CLASSES)
    assert cas["overall"] == pytest.approx(1 / 3, abs=0.1)
    assert cas["overall"] < real_accuracy - 0.2


def test_per_class_cas_is_the_recall_of_each_conditioning_class_and_the_confusion_sums_to_n(planted):
    model, _, _, generated, _ = planted
    # Conditioned on COVID-19 but showing a Normal chest: the COVID-19 row must collapse, Normal must not.
    normal = generated.images[generated.labels == 0]
    images = np.concatenate([normal, normal, generated.images[generated.labels == 2]])
    labels = np.repeat([0, 1, 2], [len(normal), len(normal), int((generated.labels == 2).sum())])
    cas = classification_accuracy_score(model, images, labels, CLASSES)

    preds = predict(model, images)
    for k, name in enumerate(CLASSES):
        assert cas["per_class"][name] == pytest.approx(float((preds[labels == k] == k).mean()))
    assert cas["per_class"]["Normal"] > 0.8 and cas["per_class"]["COVID-19"] < 0.15
    confusion = np.array(cas["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == len(labels) == cas["n"]
    assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=3).tolist()  # rows: conditioning class
    assert cas["overall"] == pytest.approx(np.trace(confusion) / len(labels))


def test_a_class_without_generated_images_has_no_cas_rather_than_zero(planted):
    model, _, _, generated, _ = planted
    keep = generated.labels != 1
    cas = classification_accuracy_score(model, generated.images[keep], generated.labels[keep], CLASSES)
    assert cas["per_class"]["COVID-19"] is None and cas["per_class"]["Normal"] is not None


def test_the_evaluator_records_cas_and_tstr_relative_in_json_jsonl_and_the_plot(planted, tmp_path):
    model, train, heldout, generated, real_accuracy = planted
    clf = save_classifier(model, tmp_path / "domain_classifier.pt")
    cfg = MetricsConfig(metrics=["cas"], final_metrics=["utility"], classifier_steps=20)
    first = evaluate_images(generated, heldout, train=train, cfg=cfg, round_num=1, run_dir=tmp_path,
                            classifier_path=clf)
    last = evaluate_images(generated, heldout, train=train, cfg=cfg, round_num=2, run_dir=tmp_path,
                           classifier_path=clf, final=True)
    assert first["metrics_requested"] == ["cas"] and last["metrics_requested"] == ["cas", "utility"]
    assert first["errors"] == {} and last["errors"] == {}
    assert "tstr_relative" not in first["overall"]

    expected = classification_accuracy_score(model, generated.images, generated.labels, CLASSES)
    assert last["overall"]["cas"] == pytest.approx(expected["overall"])
    assert {name: last["per_class"][name]["cas"] for name in CLASSES} == pytest.approx(expected["per_class"])
    assert last["cas_confusion"] == expected["confusion"]
    assert last["domain_classifier"]["heldout_accuracy"] == pytest.approx(real_accuracy)
    overall = last["overall"]
    assert overall["tstr_relative"] == pytest.approx(overall["utility_accuracy_synthetic"]
                                                     / overall["utility_accuracy_real"])
    assert overall["utility_accuracy_real"] == pytest.approx(real_accuracy)  # the same real-trained classifier

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["overall"]["cas"] == pytest.approx(expected["overall"])
    assert lines[-1]["overall"]["tstr_relative"] == pytest.approx(overall["tstr_relative"])
    assert lines[-1]["per_class"]["Non-COVID"]["cas"] == pytest.approx(expected["per_class"]["Non-COVID"])
    assert lines[-1]["cas_confusion"] == expected["confusion"]
    assert (tmp_path / "metrics.png").is_file()
    assert [key for _, key in measured_panels(read_rounds(tmp_path))] == ["cas", "tstr_relative"]


def test_final_metrics_join_only_the_final_evaluation():
    cfg = MetricsConfig(metrics=["fd_domain", "cas"], final_metrics=["fid", "cas", "lpips"])
    assert metrics_for_evaluation(cfg, final=False) == ["fd_domain", "cas"]
    assert metrics_for_evaluation(cfg, final=True) == ["fd_domain", "cas", "fid", "lpips"]
    assert metrics_for_evaluation(MetricsConfig(metrics=[]), final=True) == []


def test_the_study_scores_an_arm_with_the_evaluators_cas(planted, tiny_config, tmp_path):
    """One CAS implementation: a study arm's CAS is ``classification_accuracy_score`` on that arm's images."""
    from medstylegan2.classifier import load_classifier
    from medstylegan2.sampling import generate_per_class, load_generator
    from medstylegan2.study.evaluate import evaluate_checkpoint
    from medstylegan2.trainer import SiteTrainer

    res = tiny_config.model.resolution
    train, heldout = generate_phantoms(8, res, seed=0), generate_phantoms(4, res, seed=1)
    ckpt = SiteTrainer(tiny_config, train.images, train.labels, device="cpu").save_checkpoint(tmp_path / "arm.pt")
    clf = tmp_path / "domain_classifier.pt"
    result = evaluate_checkpoint(ckpt, train=train, heldout=heldout, classifier_path=clf, n_per_class=6,
                                 classifier_steps=5, out_dir=tmp_path / "eval")
    G, _ = load_generator(ckpt)
    fake = generate_per_class(G, 6, seed=0)
    expected = classification_accuracy_score(load_classifier(clf), fake.images, fake.labels, CLASSES)
    assert result["errors"] == {}
    assert result["cas"] == pytest.approx(expected["overall"])
    assert result["cas_per_class"] == pytest.approx(expected["per_class"])
    assert isinstance(result["tstr_relative"], float)


def test_fid_uses_the_first_fid_n_per_class_images_of_each_class(planted, tmp_path, monkeypatch):
    """``metrics.fid_n_per_class`` caps what goes through Inception (the slow network); the domain classifier
    stands in for Inception here so that the test needs no Inception weights."""
    from medstylegan2.metrics.fidelity import FeatureSpace, extract_features, fidelity_from_features, first_per_class

    model, train, heldout, generated, _ = planted
    clf = save_classifier(model, tmp_path / "domain_classifier.pt")
    monkeypatch.setattr(FeatureSpace, "inception", staticmethod(lambda *a, **k: FeatureSpace.domain(clf)))
    cfg = MetricsConfig(metrics=["fid"], fid_n_per_class=30)
    record = evaluate_images(generated, heldout, train=train, cfg=cfg, out_dir=tmp_path / "out", classifier_path=clf)
    assert record["errors"] == {}
    assert record["images_per_class"]["inception"] == {"generated": {c: 30 for c in CLASSES},
                                                       "real": {c: 30 for c in CLASSES}}
    space = FeatureSpace.domain(clf)
    for k, name in enumerate(CLASSES):
        fake = generated.images[generated.labels == k][:30]
        real = heldout.images[heldout.labels == k][:30]
        expected = fidelity_from_features(extract_features(fake, space), extract_features(real, space), kid=False,
                                          prc=False)["fd"]
        assert record["per_class"][name]["fid"] == pytest.approx(expected, rel=1e-4)
    labels = np.array([2, 0, 0, 1, 0, 2])
    assert first_per_class(labels, 3, 1).tolist() == [0, 1, 3]
    assert first_per_class(labels, 3, None).tolist() == list(range(6))
