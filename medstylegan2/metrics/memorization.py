"""Memorization audit: how close does each generated image come to a training image?

For every generated image we find its nearest training image (over all classes) in two spaces:

- pixel space: RMS difference of the images scaled to [0, 1] (L2 distance / sqrt(pixels)), so 0.01 is about
  2.5 grey levels on average, whatever the resolution;
- domain feature space: Euclidean distance between the domain classifier's features.

The reference for "too close" is what real data does: the nearest-training-image distances of the real
held-out images (real images that were never trained on). ``threshold_percentile`` (default 5) of those
distances is the threshold; the audit reports the fraction of generated images closer than it, overall and
per generated class. A generator that copies training images drives that fraction far above 5%; one that
does not stays near or below it. ``near_copies`` counts generated images within ``COPY_RMS`` (pixel) of a
training image, i.e. practically identical.
"""

from __future__ import annotations

import numpy as np
import torch

from medstylegan2.classifier import XrayClassifier, extract_features

COPY_RMS = 2.0 / 255.0
PERCENTILES = (1, 5, 25, 50, 75)


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index.

    The search uses the fast matrix-product form of ``torch.cdist``; the distance to the row found is then
    recomputed directly, so an exact copy reports 0 rather than rounding noise.
    """
    ref = torch.as_tensor(reference, dtype=torch.float32)
    dists, idx = [], []
    for s in range(0, len(query), chunk):
        q = torch.as_tensor(query[s:s + chunk], dtype=torch.float32)
        i = torch.cdist(q, ref).argmin(dim=1)
        dists.append((q.double() - ref[i].double()).norm(dim=1))
        idx.append(i)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def summarize(d: np.ndarray) -> dict[str, float]:
    out = {"min": float(d.min()), "mean": float(d.mean())}
    for p, v in zip(PERCENTILES, np.percentile(d, PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out


def _space_report(fake_d: np.ndarray, heldout_d: np.ndarray | None, fake_labels: np.ndarray,
                  class_names: tuple[str, ...], threshold_percentile: float) -> dict:
    report: dict = {"fake_to_train": summarize(fake_d)}
    if heldout_d is None or len(heldout_d) == 0:
        report["threshold"] = None
        report["fraction_below"] = None
        return report
    threshold = float(np.percentile(heldout_d, threshold_percentile))
    report["heldout_to_train"] = summarize(heldout_d)
    report["threshold"] = threshold
    report["fraction_below"] = float((fake_d < threshold).mean())
    report["per_class_fraction_below"] = {
        name: (float((fake_d[fake_labels == k] < threshold).mean()) if (fake_labels == k).any() else None)
        for k, name in enumerate(class_names)}
    return report


def memorization_audit(fake_images: np.ndarray, fake_labels: np.ndarray, train_images: np.ndarray,
                       train_labels: np.ndarray, heldout_images: np.ndarray | None,
                       class_names: tuple[str, ...], *, domain_model: XrayClassifier | None = None,
                       threshold_percentile: float = 5.0, n_pairs: int = 8) -> dict:
    """Nearest-training-image distances of generated images in pixel and domain space (see module docstring).

    Returns a JSON-ready dict; ``closest_pairs`` lists the ``n_pairs`` generated/training pairs closest in
    pixel space (indices into the arrays given here), for ``plots.save_memorization_pairs``.
    """
    if fake_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"generated images {fake_images.shape[1:]} and training images {train_images.shape[1:]} "
                         "differ in size")
    train_px = pixel_vectors(train_images)
    scale = 1.0 / np.sqrt(train_px.shape[1])
    fake_px_d, fake_px_i = nearest(pixel_vectors(fake_images), train_px)
    fake_px_d *= scale
    held_px_d = None
    if heldout_images is not None and len(heldout_images):
        held_px_d = nearest(pixel_vectors(heldout_images), train_px)[0] * scale
    out = {
        "rule": (f"fraction of generated images whose nearest training image is closer than the "
                 f"{threshold_percentile:g}th percentile of the real held-out images' nearest-training-image "
                 f"distances"),
        "threshold_percentile": threshold_percentile,
        "n_generated": int(len(fake_images)),
        "n_train": int(len(train_images)),
        "n_heldout": int(0 if heldout_images is None else len(heldout_images)),
        "pixel": _space_report(fake_px_d, held_px_d, fake_labels, class_names, threshold_percentile),
    }
    out["pixel"]["near_copies"] = int((fake_px_d < COPY_RMS).sum())
    fake_dom_d = fake_dom_i = None
    if domain_model is not None:
        train_f = extract_features(domain_model, train_images)
        fake_dom_d, fake_dom_i = nearest(extract_features(domain_model, fake_images), train_f)
        held_dom_d = None
        if heldout_images is not None and len(heldout_images):
            held_dom_d = nearest(extract_features(domain_model, heldout_images), train_f)[0]
        out["domain"] = _space_report(fake_dom_d, held_dom_d, fake_labels, class_names, threshold_percentile)
    order = np.argsort(fake_px_d, kind="stable")[:n_pairs]
    out["closest_pairs"] = [{
        "generated_index": int(g),
        "generated_class": class_names[int(fake_labels[g])],
        "train_index": int(fake_px_i[g]),
        "train_class": class_names[int(train_labels[fake_px_i[g]])],
        "pixel_distance": float(fake_px_d[g]),
        "domain_distance": None if fake_dom_d is None else float(fake_dom_d[g]),
        "domain_nearest_train_index": None if fake_dom_i is None else int(fake_dom_i[g]),
    } for g in order]
    return out
