"""Image sets: the in-memory format, loaders for class folders and COVID-QU-Ex, held-out splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medstylegan2.config import CLASS_NAMES

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """uint8 images [N, 1, H, W] (0 black .. 255 white) and int64 class indices [N]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise TypeError(f"images must be a uint8 numpy array, got {getattr(self.images, 'dtype', type(self.images))}")
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must have shape [N, 1, H, W], got {list(self.images.shape)}")
        self.labels = np.asarray(self.labels)
        if self.labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got {self.labels.dtype}")
        self.labels = self.labels.astype(np.int64)


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image, mode="L").save(path)
