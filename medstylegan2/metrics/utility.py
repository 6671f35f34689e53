"""Downstream utility: train the small X-ray classifier on synthetic images only, test it on real ones.

The same ``XrayClassifier`` recipe (steps, batch size, seed, augmentation) is trained once on the generated
images and once on the real training split; both are scored on the real held-out set. When the domain
classifier of the run (trained on the real training split with the same recipe) is passed as
``real_model``, it serves as the real baseline instead of training a second copy.
"""

from __future__ import annotations

import numpy as np

from medstylegan2.classifier import XrayClassifier, evaluate_classifier, train_classifier


def downstream_utility(fake_images: np.ndarray, fake_labels: np.ndarray, heldout_images: np.ndarray,
                       heldout_labels: np.ndarray, *, train_images: np.ndarray | None = None,
                       train_labels: np.ndarray | None = None, real_model: XrayClassifier | None = None,
                       steps: int = 300, batch_size: int = 64, seed: int = 0, device: str = "cpu",
                       num_classes: int = 3) -> dict:
    """``{"trained_on_synthetic": scores, "trained_on_real": scores | None, "relative_accuracy", ...}``."""
    synth_model = train_classifier(fake_images, fake_labels, steps=steps, batch_size=batch_size, seed=seed,
                                   device=device, num_classes=num_classes, resolution=heldout_images.shape[-1])
    out: dict = {
        "protocol": "train on synthetic, test on real held-out (TSTR) vs train on real, test on real",
        "steps": steps,
        "n_synthetic": int(len(fake_images)),
        "n_heldout": int(len(heldout_images)),
        "trained_on_synthetic": evaluate_classifier(synth_model, heldout_images, heldout_labels),
        "trained_on_real": None,
    }
    if real_model is None and train_images is not None and len(train_images):
        real_model = train_classifier(train_images, train_labels, steps=steps, batch_size=batch_size, seed=seed,
                                      device=device, num_classes=num_classes)
    if real_model is not None:
        real = evaluate_classifier(real_model, heldout_images, heldout_labels)
        out["trained_on_real"] = real
        synth = out["trained_on_synthetic"]
        out["relative_accuracy"] = synth["accuracy"] / real["accuracy"] if real["accuracy"] > 0 else None
        out["relative_macro_f1"] = synth["macro_f1"] / real["macro_f1"] if real["macro_f1"] > 0 else None
    return out
