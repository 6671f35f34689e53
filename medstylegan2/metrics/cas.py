"""Classification accuracy score (CAS; Ravuri & Vinyals 2019): does a generated image carry its class?

A classifier trained on real images only (the run's domain classifier, ``medstylegan2.classifier``)
labels every generated image; CAS is its accuracy against the labels the generator was conditioned on.
Per class it is the recall of that class: the fraction of images generated as class k that the
classifier also calls k. The confusion matrix (rows: conditioning class, columns: predicted class)
shows where the others went. The classifier's own accuracy on real held-out images is the ceiling: a
generator whose images are as recognisable as real ones scores about that, one whose images carry no
class signal scores about chance (1 / number of classes for balanced conditioning).

In: uint8 images [N, 1, H, W] with int conditioning labels [N]. Out: a plain dict (see
``classification_accuracy_score``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medstylegan2.classifier import XrayClassifier, evaluate_classifier


def classification_accuracy_score(classifier: XrayClassifier, images: np.ndarray, labels: np.ndarray,
                                  class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``{"overall": accuracy, "per_class": {name: recall or None}, "confusion": [[int]], "n": int}``.

    ``per_class[name]`` is ``None`` for a class with no generated image (nothing to recall).
    """
    if classifier.num_classes != len(class_names):
        raise ValueError(f"the classifier has {classifier.num_classes} classes, the images {len(class_names)} "
                         f"({', '.join(class_names)})")
    scores = evaluate_classifier(classifier, images, labels)
    return {
        "overall": scores["accuracy"],
        "per_class": dict(zip(class_names, scores["per_class_recall"])),
        "confusion": scores["confusion"],
        "n": int(len(labels)),
    }
