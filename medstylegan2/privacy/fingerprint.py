"""The fingerprint of a site's data set: which images (and, per patient, which grouping) a ledger entry covers."""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np


def dataset_fingerprint(images: np.ndarray, labels: Sequence[int] | np.ndarray,
                        groups: Optional[Sequence[Any] | np.ndarray] = None) -> str:
    """SHA-256 of the data set, independent of the order of its images and of how patients are numbered.

    Each image contributes the hash of its pixels (and shape) and its label. With ``groups`` (the
    patient of each image) the fingerprint also covers the grouping: which images belong together.
    """
    images = np.ascontiguousarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    shape = "x".join(str(d) for d in images.shape[1:])
    records = [f"{hashlib.sha256(image.tobytes()).hexdigest()}:{int(label)}" for image, label in zip(images, labels)]
    h = hashlib.sha256(f"medstylegan2-dataset-v1 {images.dtype} {shape}\n".encode())
    if groups is None:
        h.update(b"unit=image\n")
        h.update("\n".join(sorted(records)).encode())
        return h.hexdigest()
    groups = list(groups)
    if len(groups) != len(records):
        raise ValueError(f"{len(groups)} patient ids for {len(records)} images")
    members: dict[Any, list[str]] = {}
    for record, group in zip(records, groups):
        members.setdefault(group, []).append(record)
    patients = sorted(hashlib.sha256("\n".join(sorted(rs)).encode()).hexdigest() for rs in members.values())
    h.update(b"unit=patient\n")
    h.update("\n".join(patients).encode())
    return h.hexdigest()
