"""Frechet distance, KID and precision/recall, computed by torch-fidelity.

Features come from a torch-fidelity feature extractor built through its registry
(``torch_fidelity.utils.create_feature_extractor``): the project's domain classifier
(``features.DOMAIN_EXTRACTOR``) or torch-fidelity's ``inception-v3-compat`` with locally resolved weights.
The metrics are torch-fidelity's own functions (``fid_features_to_statistics`` / ``fid_statistics_to_metric``,
``kid_features_to_metric``, ``prc_features_to_metric``), the ones ``torch_fidelity.calculate_metrics`` calls.
We call them one level below ``calculate_metrics`` for one reason: features of every image are extracted once
and then sliced per class, instead of once per class and once more for the pooled set. ``calculate_metrics_dirs``
goes through ``calculate_metrics`` itself; the tests check both paths give the same numbers.

Grayscale images are replicated to three channels (torch-fidelity's uint8 [N, 3, H, W] input convention);
the Inception extractor resizes to 299 x 299 itself.

Conventions (torch-fidelity's): input 1 is generated, input 2 is real. Precision = fraction of generated
samples inside the real manifold, recall = fraction of real samples inside the generated manifold. KID uses
``kid_subsets`` subsets of ``min(kid_subset_size, n_fake, n_real)`` samples, so small per-class sets work; when
that is all of both sets (equal sizes), every subset is the same and one is computed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medstylegan2.errors import DataError
from medstylegan2.metrics.features import (DOMAIN_EXTRACTOR, DOMAIN_FEATURE, Weights, register_domain_extractor,
                                           resolve_inception_weights)

log = logging.getLogger(__name__)

INCEPTION_EXTRACTOR = "inception-v3-compat"


@dataclass(frozen=True)
class FeatureSpace:
    """A torch-fidelity feature extractor, its feature layer and the weights file it loads."""

    extractor: str
    layer: str
    weights_path: Path
    label: str

    @staticmethod
    def domain(classifier_path: str | Path) -> "FeatureSpace":
        register_domain_extractor()
        return FeatureSpace(DOMAIN_EXTRACTOR, DOMAIN_FEATURE, Path(classifier_path),
                            f"domain X-ray classifier ({Path(classifier_path).name})")

    @staticmethod
    def inception(weights_dir: str | Path | None = None, *, use_fid_helper: bool = True) -> "FeatureSpace":
        weights: Weights = resolve_inception_weights(weights_dir, use_fid_helper=use_fid_helper)
        return FeatureSpace(INCEPTION_EXTRACTOR, "2048", weights.path, weights.label)


class GrayAsRGB(Dataset):
    """uint8 [N, 1, H, W] numpy images served as torch-fidelity expects them: uint8 [3, H, W] tensors."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 1, H, W], got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


# Features of recently seen image sets (the real held-out set recurs every round of a federated run).
_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 8


def _cache_key(images: np.ndarray, space: FeatureSpace) -> tuple:
    digest = hashlib.sha1(np.ascontiguousarray(images).view(np.uint8)).hexdigest()
    stat = space.weights_path.stat()
    return (space.extractor, space.layer, str(space.weights_path), stat.st_mtime_ns, stat.st_size,
            images.shape, digest)


# Extractors built recently (loading Inception's 95 MB of weights costs about a second each time).
_EXTRACTORS: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_EXTRACTORS_SIZE = 2


def clear_feature_cache() -> None:
    _CACHE.clear()
    _EXTRACTORS.clear()


def _extractor(space: FeatureSpace, cuda: bool) -> torch.nn.Module:
    from torch_fidelity.utils import create_feature_extractor

    stat = space.weights_path.stat()
    key = (space.extractor, space.layer, str(space.weights_path), stat.st_mtime_ns, stat.st_size, cuda)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = create_feature_extractor(space.extractor, [space.layer], cuda=cuda, verbose=False,
                                                    feature_extractor_weights_path=str(space.weights_path))
        while len(_EXTRACTORS) > _EXTRACTORS_SIZE:
            _EXTRACTORS.popitem(last=False)
    _EXTRACTORS.move_to_end(key)
    return _EXTRACTORS[key]


def extract_features(images: np.ndarray, space: FeatureSpace, *, device: str = "cpu", batch_size: int = 64,
                     use_cache: bool = True) -> torch.Tensor:
    """float32 [N, D] features of uint8 images [N, 1, H, W] through torch-fidelity's extractor for ``space``."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if len(images) == 0:
        raise DataError("no images to extract features from")
    key = _cache_key(images, space) if use_cache else None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cuda = str(device).startswith("cuda")
    feats = get_featuresdict_from_dataset(GrayAsRGB(images), _extractor(space, cuda), batch_size=batch_size,
                                          cuda=cuda, save_cpu_ram=True, verbose=False)[space.layer]
    feats = feats.to(torch.float32)
    if key is not None:
        _CACHE[key] = feats
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return feats


def fidelity_from_features(fake: torch.Tensor, real: torch.Tensor, *, fid: bool = True, kid: bool = True,
                           prc: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                           prc_neighborhood: int = 3, seed: int = 2020) -> dict[str, Any]:
    """torch-fidelity's FID / KID / precision-recall of generated ``fake`` vs ``real`` features.

    Returns a subset of ``{"fd", "kid", "kid_std", "precision", "recall", "f_score"}``; a metric that the sample
    sizes do not allow (KID needs 2 per set, PR needs more than ``prc_neighborhood``) is returned as ``None``.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric, KEY_METRIC_FID
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                           prc_features_to_metric)

    fake = fake.to(torch.float32).cpu()
    real = real.to(torch.float32).cpu()
    n_fake, n_real = len(fake), len(real)
    out: dict[str, Any] = {}
    if fid:
        if min(n_fake, n_real) < 2:
            out["fd"] = None
        else:
            stats_fake, stats_real = fid_features_to_statistics(fake), fid_features_to_statistics(real)
            out["fd"] = float(fid_statistics_to_metric(stats_fake, stats_real, False)[KEY_METRIC_FID])
    if kid:
        size = min(kid_subset_size, n_fake, n_real)
        if size < 2:
            out["kid"] = out["kid_std"] = None
        else:
            # When a subset is all of both sets, every subset gives the same value: one is exact and 100x cheaper.
            subsets = 1 if size == n_fake == n_real else kid_subsets
            m = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                       verbose=False)
            out["kid"], out["kid_std"] = float(m[KEY_METRIC_KID_MEAN]), float(m[KEY_METRIC_KID_STD])
            out["kid_subset_size"] = size
    if prc:
        if min(n_fake, n_real) <= prc_neighborhood:
            out["precision"] = out["recall"] = out["f_score"] = None
        else:
            m = prc_features_to_metric(fake, real, prc_neighborhood=prc_neighborhood, verbose=False)
            out["precision"] = float(m[KEY_METRIC_PRECISION])
            out["recall"] = float(m[KEY_METRIC_RECALL])
            out["f_score"] = float(m[KEY_METRIC_F_SCORE])
    return out


def first_per_class(labels: np.ndarray, num_classes: int, n: int | None) -> np.ndarray:
    """Indices of the first ``n`` images of each class, in their order (``None``: every index)."""
    if n is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for k in range(num_classes):
        keep[np.flatnonzero(labels == k)[:n]] = True
    return np.flatnonzero(keep)


def fidelity_per_class(fake_images: np.ndarray, fake_labels: np.ndarray, real_images: np.ndarray,
                       real_labels: np.ndarray, space: FeatureSpace, class_names: tuple[str, ...], *,
                       fid: bool = True, kid: bool = True, prc: bool = True, device: str = "cpu",
                       batch_size: int = 64, kid_subset_size: int = 1000, kid_subsets: int = 100,
                       seed: int = 2020) -> dict[str, Any]:
    """``{"overall": {...}, "per_class": {name: {...}}}``; each image's features are extracted once."""
    f_fake = extract_features(fake_images, space, device=device, batch_size=batch_size)
    f_real = extract_features(real_images, space, device=device, batch_size=batch_size)
    kwargs = dict(fid=fid, kid=kid, prc=prc, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    per_class = {}
    for k, name in enumerate(class_names):
        a = f_fake[torch.from_numpy(fake_labels == k)]
        b = f_real[torch.from_numpy(real_labels == k)]
        if len(a) == 0 or len(b) == 0:
            per_class[name] = {"skipped": f"{len(a)} generated and {len(b)} real images of this class"}
            continue
        per_class[name] = fidelity_from_features(a, b, **kwargs)
    return {"overall": fidelity_from_features(f_fake, f_real, **kwargs), "per_class": per_class}


def calculate_metrics_dirs(fake_dir: str | Path, real_dir: str | Path, space: FeatureSpace, *, device: str = "cpu",
                           batch_size: int = 64, kid_subset_size: int = 1000, seed: int = 2020,
                           fid: bool = True, kid: bool = True, prc: bool = True,
                           save_cpu_ram: bool = False) -> dict[str, Any]:
    """``torch_fidelity.calculate_metrics`` on two image folders (searched recursively), with ``space``'s extractor.

    ``save_cpu_ram=True`` makes torch-fidelity read images in the main process instead of 4 worker processes.
    """
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), samples_find_deep=True, cuda=str(device).startswith("cuda"),
        batch_size=batch_size, fid=fid, kid=kid, prc=prc, feature_extractor=space.extractor,
        feature_layer_fid=space.layer, feature_layer_kid=space.layer, feature_layer_prc=space.layer,
        feature_extractor_weights_path=str(space.weights_path), kid_subset_size=kid_subset_size, rng_seed=seed,
        save_cpu_ram=save_cpu_ram, cache=False, verbose=False)
