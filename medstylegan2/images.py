"""Image sets in memory, and image files: the format every part of the project shares.

An image set is uint8 ``[N, 1, H, W]`` (0 black .. 255 white) plus int64 class indices ``[N]`` into
``CLASS_NAMES`` (``ImageSet``). Networks convert to float themselves, so the same arrays feed the
GAN, the domain classifier and the metrics. This module also writes them as PNG folders and
decodes image files (any PIL format, converted to 8-bit grayscale at one resolution); finding the
files of a data set and caching them is ``medstylegan2.data``'s job.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medstylegan2.config import CLASS_NAMES

log = logging.getLogger(__name__)

# Below this many files a progress bar is more noise than help.
PROGRESS_MIN_FILES = 500


# ----------------------------------------------------------------------------------------------
# The in-memory format


@dataclass
class ImageSet:
    """uint8 images [N, 1, H, W] (0 black .. 255 white) and int64 class indices [N].

    ``sources`` optionally names where each image came from (a path relative to the data root, or a
    phantom seed), which is what makes a held-out split auditable.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    sources: list[str] | None = None

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

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``indices`` (in that order), with their labels and sources."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        sources = [self.sources[i] for i in idx.tolist()] if self.sources is not None else None
        return ImageSet(images=self.images[idx], labels=self.labels[idx], class_names=self.class_names,
                        sources=sources)

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
        return ImageSet(images=np.concatenate([s.images for s in sets]),
                        labels=np.concatenate([s.labels for s in sets]), class_names=names, sources=sources)


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


def decode_image(path: str | Path, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution] grayscale; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        gray = img.convert("L")
        if gray.size != (resolution, resolution):
            # Box filtering averages every source pixel into the result: no aliasing when shrinking.
            gray = gray.resize((resolution, resolution), Image.Resampling.BOX if min(gray.size) >= resolution
                               else Image.Resampling.LANCZOS)
        return np.asarray(gray, dtype=np.uint8)


def _decode_or_reason(path: Path, resolution: int) -> np.ndarray | str:
    try:
        return decode_image(path, resolution)
    # PIL reports broken files through several exception types depending on the codec.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing a load over
        return None
    return tqdm(total=total, desc=desc, unit="img", disable=total <= PROGRESS_MIN_FILES, leave=False)


def decode_all(entries: list[tuple[Path, int]], *, root: Path, resolution: int,
               desc: str) -> tuple[ImageSet, list[str]]:
    """Decode ``(file, label)`` entries; unreadable files are skipped with a warning naming each.

    Returns the image set (``sources`` relative to ``root``) and the skipped files' relative paths.
    """
    images = np.empty((len(entries), 1, resolution, resolution), dtype=np.uint8)
    keep = np.zeros(len(entries), dtype=bool)
    skipped: list[str] = []
    bar = _progress(len(entries), desc)
    # PIL releases the GIL while decoding, so a few threads overlap file reads and inflation.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda e: _decode_or_reason(e[0], resolution), entries)
        for i, ((path, _), result) in enumerate(zip(entries, results)):
            if isinstance(result, str):
                log.warning("skipping unreadable image %s: %s", path, result)
                skipped.append(path.relative_to(root).as_posix())
            else:
                images[i, 0] = result
                keep[i] = True
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d under %s", len(skipped), len(entries), root)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    sources = [path.relative_to(root).as_posix() for path, _ in entries]
    if keep.all():  # the usual case: no second copy of what may be gigabytes of pixels
        return ImageSet(images=images, labels=labels, sources=sources), skipped
    kept = np.flatnonzero(keep)
    return ImageSet(images=images[kept], labels=labels[kept], sources=[sources[i] for i in kept.tolist()]), skipped
