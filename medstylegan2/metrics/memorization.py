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
THRESHOLD_PERCENTILE = 5.0
# Training images converted to float at a time by ``pixel_nearest`` (bounds its memory).
TRAIN_CHUNK = 4096


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


def pixel_nearest(query_images: np.ndarray, train_images: np.ndarray, *, train_chunk: int = TRAIN_CHUNK
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The audit's pixel-space distance: RMS difference in [0, 1] units from each query image to its nearest
    training image, and that image's index.

    The training set is converted to float ``train_chunk`` images at a time, so a large training set costs
    its uint8 size plus one chunk; a tie goes to the lower index, as in one ``nearest`` call.
    """
    query = pixel_vectors(query_images)
    best_d = np.full(len(query), np.inf)
    best_i = np.zeros(len(query), dtype=np.int64)
    for start in range(0, len(train_images), train_chunk):
        d, i = nearest(query, pixel_vectors(train_images[start:start + train_chunk]))
        closer = d < best_d
        best_d[closer], best_i[closer] = d[closer], i[closer] + start
    return best_d / np.sqrt(query.shape[1]), best_i


def memorization_threshold(heldout_distances: np.ndarray, percentile: float = THRESHOLD_PERCENTILE) -> float:
    """The audit's "too close" threshold: this percentile of the real held-out images' distances to their
    nearest training image. A generated image is flagged when its own distance is below it (strictly)."""
    return float(np.percentile(heldout_distances, percentile))


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
    threshold = memorization_threshold(heldout_d, threshold_percentile)
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
                       threshold_percentile: float = THRESHOLD_PERCENTILE, n_pairs: int = 8) -> dict:
    """Nearest-training-image distances of generated images in pixel and domain space (see module docstring).

    Returns a JSON-ready dict; ``closest_pairs`` lists the ``n_pairs`` generated/training pairs closest in
    pixel space (indices into the arrays given here), for ``plots.save_memorization_pairs``.
    """
    if fake_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"generated images {fake_images.shape[1:]} and training images {train_images.shape[1:]} "
                         "differ in size")
    fake_px_d, fake_px_i = pixel_nearest(fake_images, train_images)
    held_px_d = None
    if heldout_images is not None and len(heldout_images):
        held_px_d = pixel_nearest(heldout_images, train_images)[0]
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
