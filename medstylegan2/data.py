"""Image sets: the in-memory format, loaders for class folders and COVID-QU-Ex, held-out splits.

An image set is uint8 ``[N, 1, H, W]`` (0 black .. 255 white) plus int64 class indices ``[N]`` into
``CLASS_NAMES``. Networks convert to float themselves, so the same arrays feed the GAN, the domain
classifier and the metrics.

Loading from disk decodes every file once per resolution and keeps the result in a ``.npz`` cache
keyed by the file listing (paths, sizes, modification times): COVID-QU-Ex (33,920 PNGs) takes minutes
to decode and a second to read back.

DICOM files (a hospital's archive) sit beside or instead of PNGs: ``medstylegan2.ingest`` decodes
every file, ``medstylegan2.dicom`` does the DICOM part, ``medstylegan2.labels`` reads a label CSV
and the site's label words, and files left out are counted per reason (``medstylegan2.skips``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medstylegan2.config import CLASS_NAMES, DataConfig
from medstylegan2.errors import DataError
# DICOM ingestion (issue 13): site files of any format, labels, counted skips.
from medstylegan2.dicom import PatientHasher, find_dicom_files
from medstylegan2.ingest import SiteOptions, decode_file, group_indices
from medstylegan2.labels import LabelVocabulary, read_label_csv
from medstylegan2.skips import SkipFile, SkipTally

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COVIDQU_SPLITS = ("Train", "Val", "Test")
# Where the split folders sit inside a Kaggle download of COVID-QU-Ex, most likely first.
COVIDQU_NESTINGS = (
    (),
    ("Lung Segmentation Data", "Lung Segmentation Data"),
    ("Lung Segmentation Data",),
    ("Infection Segmentation Data", "Infection Segmentation Data"),
    ("Infection Segmentation Data",),
)
# Bump when the cache layout or decoding changes, so stale caches are never read.
CACHE_VERSION = 2
# Below this many files a progress bar is more noise than help.
PROGRESS_MIN_FILES = 500


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
        """The images at ``indices`` (in that order), with their labels and sources."""
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
# Finding files


def _child_dir(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (an exact match wins), or None."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    matches = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    return matches[0] if matches else None


def _image_files(folder: Path) -> list[Path]:
    """PNG/JPEG files in ``folder`` and DICOM files anywhere below it (archives nest series folders)."""
    images = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(images + find_dicom_files(folder))


def _spread_cap(files: list[Path], max_per_class: int | None) -> list[Path]:
    """At most ``max_per_class`` files, evenly spaced over the sorted list.

    Evenly spaced rather than the first N, so that a cap still reaches files from every split and
    every source hospital that the naming happens to sort together.
    """
    if max_per_class is None or len(files) <= max_per_class:
        return files
    if max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1 (or None for all images), got {max_per_class}")
    keep = np.linspace(0, len(files) - 1, max_per_class).round().astype(int)
    return [files[i] for i in keep]


def _require_root(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data folder not found: {path}")
    if not path.is_dir():
        raise DataError(f"data root must be a folder, got a file: {path}")
    return path.resolve()


def _class_folder_files(root: Path, max_per_class: int | None, vocabulary: LabelVocabulary = LabelVocabulary(),
                        skipped: SkipTally | None = None) -> list[tuple[Path, int]]:
    expected = ", ".join(f"{root / name}/" for name in CLASS_NAMES)
    if find_covidqu_base(root) is not None:
        hint = " (this looks like COVID-QU-Ex: use data.source=covidqu)"
    else:
        hint = ""
    entries: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASS_NAMES):
        # The class name, or any of the site's words for it (data.label_map).
        folders = sorted({f for f in (_child_dir(root, word) for word in vocabulary.words_for(name)) if f})
        if not folders:
            raise DataError(f"class folder missing: {root / name} (expected one folder of images per class: "
                            f"{expected}, or folders named by data.label_map){hint}")
        files = sorted(f for folder in folders for f in _image_files(folder))
        if not files:
            raise DataError(f"no images in class folder {', '.join(map(str, folders))}: expected "
                            f"{'/'.join(IMAGE_SUFFIXES)} or DICOM files")
        entries += [(f, label) for f in _spread_cap(files, max_per_class)]
    for word in vocabulary.skipped_words():
        folder = _child_dir(root, word)
        if folder is not None and skipped is not None:
            for f in _image_files(folder):
                skipped.add("label-skipped", f.relative_to(root).as_posix())
    known = {word.lower() for name in CLASS_NAMES for word in vocabulary.words_for(name)}
    known |= {word.lower() for word in vocabulary.skipped_words()}
    for extra in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() not in known):
        if not extra.startswith("."):
            log.warning("ignoring folder %s: not one of the classes %s", root / extra, ", ".join(CLASS_NAMES))
    return entries


def find_covidqu_base(root: str | Path) -> Path | None:
    """The folder holding COVID-QU-Ex's Train/Val/Test under ``root`` (nested or not), or None."""
    root = Path(root)
    for nesting in COVIDQU_NESTINGS:
        base = root
        for part in nesting:
            base = _child_dir(base, part) if base is not None else None
        if base is not None and all(_child_dir(base, split) is not None for split in COVIDQU_SPLITS):
            return base
    return None


def _covidqu_files(base: Path, splits: Sequence[str], max_per_class: int | None) -> list[tuple[Path, int]]:
    per_class: list[list[Path]] = [[] for _ in CLASS_NAMES]
    for split in splits:
        split_dir = _child_dir(base, split)
        if split_dir is None:
            raise DataError(f"COVID-QU-Ex split folder missing: {base / split} (expected {', '.join(COVIDQU_SPLITS)})")
        for label, name in enumerate(CLASS_NAMES):
            class_dir = _child_dir(split_dir, name)
            if class_dir is None:
                raise DataError(f"COVID-QU-Ex class folder missing: {split_dir / name} (expected "
                                f"{split_dir}/{{{','.join(CLASS_NAMES)}}}/images/*.png)")
            # X-rays live in images/; the lung and infection masks beside them are not inputs.
            image_dir = _child_dir(class_dir, "images") or class_dir
            files = _image_files(image_dir)
            if not files:
                raise DataError(f"no images in {image_dir}: expected {'/'.join(IMAGE_SUFFIXES)} files "
                                f"(COVID-QU-Ex keeps them in <split>/<class>/images/)")
            per_class[label] += files
    return [(f, label) for label, files in enumerate(per_class) for f in _spread_cap(files, max_per_class)]


# ----------------------------------------------------------------------------------------------
# Decoding, with a cache


def decode_image(path: str | Path, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution] grayscale; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as img:
        gray = img.convert("L")
        if gray.size != (resolution, resolution):
            # Box filtering averages every source pixel into the result: no aliasing when shrinking.
            gray = gray.resize((resolution, resolution), Image.Resampling.BOX if min(gray.size) >= resolution
                               else Image.Resampling.LANCZOS)
        return np.asarray(gray, dtype=np.uint8)


def _listing_key(*, kind: str, root: Path, splits: Sequence[str], resolution: int, max_per_class: int | None,
                 entries: list[tuple[Path, int]], options: SiteOptions) -> str:
    listing = []
    for path, label in entries:
        st = path.stat()
        listing.append([path.relative_to(root).as_posix(), label, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "root": str(root), "splits": list(splits),
                       "resolution": resolution, "max_per_class": max_per_class, "files": listing,
                       "options": options.decoding_key()})
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path) -> ImageSet | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            skipped = SkipTally.from_strings([str(s) for s in z["skipped"]])
            images = ImageSet(images=z["images"], labels=z["labels"],
                              class_names=tuple(str(c) for c in z["class_names"]),
                              sources=[str(s) for s in z["sources"]],
                              groups=z["groups"] if bool(z["has_groups"]) else None)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable cache %s (%s); decoding the images again", path, exc)
        return None
    log.info("loaded %d images from cache %s", len(images), path)
    if skipped:
        log.warning("when this cache was built, %d file(s) were skipped:", skipped.total())
        skipped.log_summary(str(path.name), log)
    return images


def _write_cache(path: Path, images: ImageSet, skipped: SkipTally) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a crash or a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            # groups: per-patient numbers (no PatientID, no hash); the cache stays on the site's disk.
            np.savez(fh, images=images.images, labels=images.labels, class_names=np.array(images.class_names),
                     sources=np.array(images.sources or [], dtype=str),
                     skipped=np.array(skipped.to_strings(), dtype=str),
                     has_groups=np.array(images.groups is not None),
                     groups=images.groups if images.groups is not None else np.zeros(0, np.int64))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("cached %d images at %s", len(images), path)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing a load over
        return None
    return tqdm(total=total, desc=desc, unit="img", disable=total <= PROGRESS_MIN_FILES, leave=False)


def decode_workers() -> int:
    """Threads that decode files: PIL, numpy and the DICOM codecs release the GIL while they work."""
    return max(1, min(8, os.cpu_count() or 1))


def _decode_all(entries: list[tuple[Path, int]], *, root: Path, resolution: int, desc: str,
                options: SiteOptions) -> tuple[ImageSet, SkipTally]:
    images = np.empty((len(entries), 1, resolution, resolution), dtype=np.uint8)
    keep = np.zeros(len(entries), dtype=bool)
    patient_keys: list[str | None] = [None] * len(entries)
    skipped = SkipTally()
    hasher = PatientHasher(options.patient_salt_file)  # the salt file is read (or made) only if needed
    bar = _progress(len(entries), desc)
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        results = pool.map(lambda e: decode_file(e[0], resolution, options, hasher), entries)
        for i, ((path, _), result) in enumerate(zip(entries, results)):
            if isinstance(result, SkipFile):
                if result.code == "unreadable":
                    log.warning("skipping unreadable image %s: %s", path, result.detail)
                else:
                    log.debug("skipping %s: %s", path, result)
                skipped.add(result.code, path.relative_to(root).as_posix())
            else:
                images[i, 0] = result.pixels
                patient_keys[i] = result.patient_key
                keep[i] = True
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if skipped:
        log.warning("skipped %d of %d file(s) under %s:", skipped.total(), len(entries), root)
        skipped.log_summary(str(root), log)
    labels = np.array([label for _, label in entries], dtype=np.int64)
    sources = [path.relative_to(root).as_posix() for path, _ in entries]
    kept = np.flatnonzero(keep)
    # The salted keys become group numbers here and are dropped: no hash is stored or returned.
    groups = group_indices([patient_keys[i] for i in kept.tolist()])
    if keep.all():  # the usual case: no second copy of what may be gigabytes of pixels
        return ImageSet(images=images, labels=labels, sources=sources, groups=groups), skipped
    return ImageSet(images=images[kept], labels=labels[kept], sources=[sources[i] for i in kept.tolist()],
                    groups=groups), skipped


def _load_entries(entries: list[tuple[Path, int]], *, kind: str, root: Path, splits: Sequence[str],
                  resolution: int, max_per_class: int | None, cache_dir: str | Path | None,
                  options: SiteOptions) -> ImageSet:
    if resolution < 1:
        raise DataError(f"resolution must be >= 1 pixel, got {resolution}")
    cache_path = None
    if cache_dir is not None:
        key = _listing_key(kind=kind, root=root, splits=splits, resolution=resolution,
                           max_per_class=max_per_class, entries=entries, options=options)
        # One cache per (root, kind, resolution) is kept: the prefix names it, the suffix says
        # which listing it was built from.
        prefix = f"{kind}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}-{resolution}px-"
        cache_path = Path(cache_dir).expanduser() / f"{prefix}{key[:20]}.npz"
        if cache_path.is_file():
            cached = _read_cache(cache_path)
            if cached is not None:
                return cached
    images, skipped = _decode_all(entries, root=root, resolution=resolution, desc=f"decoding {kind} {resolution}px",
                                  options=options)
    _check_every_class_read(images, entries, root)
    if cache_path is not None:
        _write_cache(cache_path, images, skipped)
        for stale in cache_path.parent.glob(f"{prefix}*.npz"):
            if stale != cache_path:
                log.info("removing stale cache %s (the files under %s changed)", stale, root)
                stale.unlink(missing_ok=True)
    return images


def _check_every_class_read(images: ImageSet, entries: list[tuple[Path, int]], root: Path) -> None:
    counts = images.class_counts()
    for label, name in enumerate(CLASS_NAMES):
        if counts[label] == 0:
            folders = sorted({str(path.parent) for path, k in entries if k == label})
            if not folders:
                raise DataError(f"no image of class '{name}' under {root}: the labels CSV names none (every class "
                                f"needs images; check data.labels_csv and data.label_map)")
            raise DataError(f"none of the images of class '{name}' could be used (under {', '.join(folders)}): "
                            f"all were unreadable or filtered out; see the warnings above")


# ----------------------------------------------------------------------------------------------
# Loaders


def load_folder(root: str | Path, resolution: int, *, max_per_class: int | None = None,
                cache_dir: str | Path | None = None, options: SiteOptions | None = None) -> ImageSet:
    """Images from ``root/<class name>/*.{png,jpg,jpeg}`` (and DICOM files at any depth below), one
    folder per class in CLASS_NAMES, or the files a labels CSV names (``options``).

    Class folders match case-insensitively, or by the site's words for them (``options``). Files
    are sorted by name; ``max_per_class`` keeps an evenly spaced subset of each class.
    """
    options = options or SiteOptions()
    base, entries, skipped = list_site_files(root, options, max_per_class=max_per_class)
    skipped.log_summary(str(base), log)
    kind = "csv" if options.labels_csv else "folder"
    return _load_entries(entries, kind=kind, root=base, splits=(), resolution=resolution,
                         max_per_class=max_per_class, cache_dir=cache_dir, options=options)


def list_site_files(root: str | Path, options: SiteOptions, *, max_per_class: int | None = None,
                    covidqu: bool = False) -> tuple[Path, list[tuple[Path, int]], SkipTally]:
    """(resolved root, [(file, class index)], files left out while listing) of a class folder, a
    folder labelled by a CSV, or (``covidqu``) a COVID-QU-Ex root with all its splits."""
    base = _require_root(root)
    skipped = SkipTally()
    if options.labels_csv:
        entries, skipped = read_label_csv(options.labels_csv, base, options.vocabulary)
        capped = [(f, k) for k in range(len(CLASS_NAMES))
                  for f in _spread_cap([f for f, label in entries if label == k], max_per_class)]
        return base, capped, skipped
    covidqu_base = find_covidqu_base(base) if covidqu else None
    if covidqu_base is not None:
        return covidqu_base, _covidqu_files(covidqu_base, COVIDQU_SPLITS, max_per_class), skipped
    return base, _class_folder_files(base, max_per_class, options.vocabulary, skipped), skipped


def load_covidqu(root: str | Path, resolution: int, *, splits: Sequence[str] = ("Train", "Val"),
                 max_per_class: int | None = None, cache_dir: str | Path | None = None,
                 options: SiteOptions | None = None) -> ImageSet:
    """COVID-QU-Ex X-rays of the given splits, from the Kaggle layout.

    ``root`` may be the folder holding ``Train/Val/Test`` or any folder above it in the download
    (``Lung Segmentation Data/Lung Segmentation Data/`` or the Infection Segmentation variant).
    Lung and infection masks are ignored. ``sources`` are paths relative to the split folders' parent.
    """
    top = _require_root(root)
    base = find_covidqu_base(top)
    if base is None:
        raise DataError(f"{top} is not a COVID-QU-Ex folder: expected {top}/{{Train,Val,Test}}/"
                        f"{{{','.join(CLASS_NAMES)}}}/images/*.png, or the same under "
                        f"'Lung Segmentation Data/Lung Segmentation Data/'")
    wanted = tuple(splits)
    unknown = [s for s in wanted if s.lower() not in {k.lower() for k in COVIDQU_SPLITS}]
    if unknown or not wanted:
        raise DataError(f"COVID-QU-Ex splits must be among {', '.join(COVIDQU_SPLITS)}, got {list(wanted)}")
    entries = _covidqu_files(base, wanted, max_per_class)
    return _load_entries(entries, kind="covidqu-" + "+".join(s.lower() for s in wanted), root=base, splits=wanted,
                         resolution=resolution, max_per_class=max_per_class, cache_dir=cache_dir,
                         options=options or SiteOptions())


# ----------------------------------------------------------------------------------------------
# Held-out split and the one entry point for training code


def split_heldout(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, heldout): ``fraction`` of every class held out at random, deterministic for a seed.

    Stratified, so class proportions match; every class keeps at least one training image and, when
    it has two or more and ``fraction > 0``, gives at least one to the held-out set. Both keep the
    original order of the images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    held: list[np.ndarray] = []
    for k in range(len(images.class_names)):
        members = np.flatnonzero(images.labels == k)
        n = len(members)
        if n == 0:
            continue
        n_held = int(round(fraction * n))
        if fraction > 0 and n >= 2:
            n_held = max(n_held, 1)
        n_held = min(n_held, n - 1)
        # One stream per class: adding images to one class does not reshuffle the others.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        held.append(rng.choice(members, size=n_held, replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    is_held = np.zeros(len(images), dtype=bool)
    is_held[held_idx] = True
    return images.subset(np.flatnonzero(~is_held)), images.subset(held_idx)


def load_dataset(cfg: DataConfig, resolution: int) -> tuple[ImageSet, ImageSet]:
    """(train, heldout) for a data config. The held-out images never appear in the training set.

    - ``phantoms``: ``cfg.phantoms_per_class`` per class from seed ``cfg.seed``, then a stratified
      ``cfg.heldout_fraction`` split;
    - ``folder``: ``load_folder(cfg.root)``, then the same split;
    - ``covidqu``: Train + Val for training, the data set's own Test split held out
      (``cfg.heldout_fraction`` does not apply).
    """
    if cfg.source == "phantoms":
        from medstylegan2.phantoms import generate_phantoms  # phantoms imports this module

        everything = generate_phantoms(cfg.phantoms_per_class, resolution, seed=cfg.seed)
        return split_heldout(everything, cfg.heldout_fraction, cfg.seed)
    if cfg.root is None:
        raise DataError(f"data.root is required when data.source is '{cfg.source}'")
    options = SiteOptions.from_config(cfg)
    if cfg.source == "folder":
        everything = load_folder(cfg.root, resolution, max_per_class=cfg.max_per_class, cache_dir=cfg.cache_dir,
                                 options=options)
        return split_heldout(everything, cfg.heldout_fraction, cfg.seed)
    if cfg.source == "covidqu":
        train = load_covidqu(cfg.root, resolution, splits=("Train", "Val"), max_per_class=cfg.max_per_class,
                             cache_dir=cfg.cache_dir, options=options)
        heldout = load_covidqu(cfg.root, resolution, splits=("Test",), max_per_class=cfg.max_per_class,
                               cache_dir=cfg.cache_dir, options=options)
        _check_disjoint(train, heldout)
        return train, heldout
    raise DataError(f"unknown data.source {cfg.source!r}; use phantoms, folder or covidqu")


def _check_disjoint(train: ImageSet, heldout: ImageSet) -> None:
    shared = set(train.sources or []) & set(heldout.sources or [])
    if shared:
        raise DataError(f"{len(shared)} image(s) appear in both training and held-out data, e.g. {sorted(shared)[0]}")


def looks_like_covidqu(path: str | Path) -> bool:
    return Path(path).is_dir() and find_covidqu_base(Path(path)) is not None


def resolve_data_argument(text: str, resolution: int, *, base: DataConfig | None = None,
                          **overrides: object) -> tuple[ImageSet, ImageSet]:
    """(train, heldout) for a ``--data`` argument: ``phantoms``, a COVID-QU-Ex root, or a class folder.

    Builds a DataConfig from ``base`` (defaults if None) with ``overrides`` (any DataConfig field,
    e.g. ``cache_dir``, ``seed``, ``heldout_fraction``, ``phantoms_per_class``, ``max_per_class``)
    and hands it to ``load_dataset``.
    """
    cfg = dataclasses.replace(base or DataConfig(), **_known_fields(overrides))
    if text.strip().lower() == "phantoms":
        cfg = dataclasses.replace(cfg, source="phantoms", root=None)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"--data {text}: no such folder; give 'phantoms', a folder of <class>/*.png or "
                            f"DICOM files ({', '.join(CLASS_NAMES)}), or a COVID-QU-Ex root")
        # A labels CSV means the folder itself is the root, whatever it looks like.
        source = "covidqu" if looks_like_covidqu(path) and not cfg.labels_csv else "folder"
        cfg = dataclasses.replace(cfg, source=source, root=str(path))
    log.info("data: %s (source=%s)", text, cfg.source)
    return load_dataset(cfg, resolution)


def _known_fields(overrides: dict[str, object]) -> dict[str, object]:
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown data option(s) {', '.join(unknown)}; DataConfig has {', '.join(sorted(names))}")
    return overrides



def class_summary(images: ImageSet) -> str:
    """``"Normal 240, COVID-19 240, Non-COVID 240"``: for log lines and CLI output."""
    return ", ".join(f"{name} {count}" for name, count in zip(images.class_names, images.class_counts()))
