"""The evaluation every arm of the study gets: CAS, TSTR-relative, FD-domain and LPIPS, from the
same number of generated images and one shared real-trained domain classifier."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


def classification_accuracy_score(classifier, images: np.ndarray, labels: np.ndarray,
                                  class_names: Sequence[str]) -> dict[str, Any]:
    """CAS (Ravuri & Vinyals 2019): a real-trained classifier's accuracy on generated images vs their
    conditioning labels, overall and per class."""
    from medstylegan2.classifier import evaluate_classifier

    scores = evaluate_classifier(classifier, images, labels)
    return {"cas": scores["accuracy"],
            "cas_per_class": {name: scores["per_class_recall"][k] for k, name in enumerate(class_names)}}


def evaluate_checkpoint(checkpoint: str | Path, *, train, heldout, classifier_path: str | Path, n_per_class: int,
                        classifier_steps: int, out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Every study figure for one checkpoint's G_ema: CAS, TSTR-relative, FD-domain, LPIPS.

    ``classifier_path``: the real-trained domain classifier shared by all arms (FD-domain's feature
    space, CAS's judge and TSTR's real baseline). The evaluator's ``cas`` metric is used when the
    evaluator has one; else CAS is computed here with the same classifier.
    """
    from medstylegan2.classifier import load_classifier
    from medstylegan2.config import MetricsConfig
    from medstylegan2.metrics import METRIC_NAMES
    from medstylegan2.metrics.evaluate import evaluate_images
    from medstylegan2.sampling import generate_per_class, load_generator

    G, _ = load_generator(checkpoint)
    fake = generate_per_class(G, n_per_class, seed=seed)
    fake.class_names = tuple(heldout.class_names)
    evaluator_has_cas = "cas" in METRIC_NAMES
    names = ["fd_domain", "lpips", "utility"] + (["cas"] if evaluator_has_cas else [])
    cfg = MetricsConfig(n_per_class=n_per_class, metrics=names, classifier_steps=classifier_steps)
    record = evaluate_images(fake, heldout, train=train, cfg=cfg, out_dir=out_dir, classifier_path=classifier_path,
                             seed=seed)
    overall = record["overall"]
    if record.get("errors"):
        log.warning("evaluation of %s: %s", checkpoint, record["errors"])
    if evaluator_has_cas and overall.get("cas") is not None:
        cas = {"cas": overall["cas"],
               "cas_per_class": {n: record["per_class"][n].get("cas") for n in heldout.class_names}}
    else:
        cas = classification_accuracy_score(load_classifier(classifier_path), fake.images, fake.labels,
                                            heldout.class_names)
    synth = overall.get("utility_accuracy_synthetic")
    real = overall.get("utility_accuracy_real")
    return {
        **cas,
        "tstr_relative": synth / real if synth is not None and real else None,
        "fd_domain": overall.get("fd_domain"),
        "fd_domain_per_class": {n: record["per_class"][n].get("fd_domain") for n in heldout.class_names},
        "lpips_diversity": overall.get("lpips_diversity"),
        "lpips_to_nearest_real": overall.get("lpips_to_nearest_real"),
        "n_per_class": n_per_class,
        "errors": record.get("errors", {}),
    }


