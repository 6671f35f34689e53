"""Image sets in memory, and image files: the format every part of the project shares.

An image set is uint8 ``[N, 1, H, W]`` (0 black .. 255 white) plus int64 class indices ``[N]`` into
``CLASS_NAMES`` (``ImageSet``). Networks convert to float themselves, so the same arrays feed the
GAN, the domain classifier and the metrics. This module also writes them as PNG folders and
decodes image files (any PIL format, converted to 8-bit grayscale at one resolution); decoding a
site's files of every format (DICOM included) is ``medstylegan2.ingest``'s job, finding the files
of a data set and caching them ``medstylegan2.data``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medstylegan2.config import CLASS_NAMES


# ----------------------------------------------------------------------------------------------
# The in-memory format


@dataclass
class ImageSet:
    """uint8 images [N, 1, H, W] (0 black .. 255 white) and int64 class indices [N].

    ``sources`` optionally names where each image came from (a path relative to the data root, or a
    phantom seed), which is what makes a held-out split auditable.

    ``groups`` optionally says which images belong to one patient: int64 [N], equal numbers = one
    patient (numbered from the site-salted hash of the DICOM PatientID; an image without a
    PatientID is a group of its own). It is the unit a patient-level privacy engine samples, and,
    like the images, never leaves the site. Numbers are only comparable within one load.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    sources: list[str] | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            got = getattr(self.images, "dtype", type(self.images).__name__)
            raise TypeError(f"images must be a uint8 numpy array [N, 1, H, W], got {got}")
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must have shape [N, 1, H, W] (grayscale), got {list(self.images.shape)}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise ValueError(f"labels must have shape [{len(self.images)}], got {list(labels.shape)}")
        if len(labels) and labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        self.class_names = tuple(self.class_names)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must be in [0, {len(self.class_names)}) ({', '.join(self.class_names)}), "
                             f"got range [{self.labels.min()}, {self.labels.max()}]")
        if self.sources is not None:
            self.sources = list(self.sources)
            if len(self.sources) != len(self.images):
                raise ValueError(f"sources must name every image: {len(self.sources)} names for "
                                 f"{len(self.images)} images")
        if self.groups is not None:
            self.groups = np.asarray(self.groups)
            if self.groups.shape != (len(self.images),) or (len(self.groups) and self.groups.dtype.kind not in "iu"):
                raise ValueError(f"groups must be integers of shape [{len(self.images)}], got "
                                 f"{self.groups.dtype} {list(self.groups.shape)}")
            self.groups = self.groups.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``indices`` (in that order), with their labels, sources and groups."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        sources = [self.sources[i] for i in idx.tolist()] if self.sources is not None else None
        groups = self.groups[idx] if self.groups is not None else None
        return ImageSet(images=self.images[idx], labels=self.labels[idx], class_names=self.class_names,
                        sources=sources, groups=groups)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.class_names)).tolist()

    def of_class(self, k: int) -> "ImageSet":
        return self.subset(np.flatnonzero(self.labels == k))

    @staticmethod
    def concatenate(sets: Sequence["ImageSet"]) -> "ImageSet":
        """One set holding every image of ``sets`` in order; they must share size and class names."""
        if not sets:
            raise ValueError("concatenate needs at least one ImageSet")
        names = sets[0].class_names
        if any(s.class_names != names for s in sets):
            raise ValueError("cannot concatenate image sets with different class names")
        if len({s.images.shape[2:] for s in sets}) > 1:
            raise ValueError(f"cannot concatenate image sets of different sizes: "
                             f"{sorted({s.images.shape[2:] for s in sets})}")
        sources = None
        if all(s.sources is not None for s in sets):
            sources = [name for s in sets for name in s.sources]
        groups = None
        if all(s.groups is not None for s in sets):
            groups = np.concatenate([s.groups for s in sets])
        return ImageSet(images=np.concatenate([s.images for s in sets]),
                        labels=np.concatenate([s.labels for s in sets]), class_names=names, sources=sources,
                        groups=groups)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 [H, W] array as an 8-bit grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(path)


def write_image_folder(images: ImageSet, out_dir: str | Path) -> Path:
    """Write ``out_dir/<class name>/<index within class:06d>.png``; readable again by ``load_folder``."""
    out = Path(out_dir)
    for k, name in enumerate(images.class_names):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images.images[images.labels == k]):
            save_png(image[0], folder / f"{i:06d}.png")
    return out


# ----------------------------------------------------------------------------------------------
# Decoding


# Smaller than this on a side, an image holds too little to be a chest X-ray at any resolution.
MIN_SIDE = 16
# Pixel modes other than 8-bit grayscale that are converted, and how a log line names them.
CONVERSIONS = {"colour": "colour image(s) converted to grayscale (luminance)",
               "high-bit-depth": "16-bit or float image(s) rescaled to 8 bits (their own min..max)"}


def decode_image(path: str | Path, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution] grayscale; raises OSError/ValueError for unreadable files."""
    return decode_image_noting(path, resolution)[0]


def decode_image_noting(path: str | Path, resolution: int) -> tuple[np.ndarray, str | None]:
    """``decode_image`` and which conversion it made (a key of ``CONVERSIONS``, or None).

    Colour (RGB, RGBA, palette) becomes luminance; 16-bit and float images are rescaled from their
    own range to 0..255 (PIL's own 8-bit conversion would clip everything above 255 to white). An
    image under ``MIN_SIDE`` pixels on a side is ``SkipFile("too-small")``; one past PIL's
    decompression-bomb limit ``SkipFile("too-large")``.
    """
    from medstylegan2.skips import SkipFile

    try:
        with Image.open(path) as img:
            if min(img.size) < MIN_SIDE:
                raise SkipFile("too-small", f"{img.size[0]}x{img.size[1]} pixels")
            conversion = None
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                values = np.asarray(img, dtype=np.float64)
                low, high = float(values.min()), float(values.max())
                scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
                gray = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
                conversion = "high-bit-depth"
            elif img.mode != "L":
                conversion = None if img.mode in ("1", "LA", "La") else "colour"
                gray = img.convert("L")
            else:
                gray = img.copy()
    except Image.DecompressionBombError as exc:
        raise SkipFile("too-large", str(exc)) from exc
    if gray.size != (resolution, resolution):
        # Box filtering averages every source pixel into the result: no aliasing when shrinking.
        gray = gray.resize((resolution, resolution), Image.Resampling.BOX if min(gray.size) >= resolution
                           else Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8), conversion
