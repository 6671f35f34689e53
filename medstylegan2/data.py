"""Data sets: loaders for class folders and COVID-QU-Ex, the decoded-image cache, held-out splits.

Every loader returns ``medstylegan2.images.ImageSet``s (uint8 ``[N, 1, H, W]`` + class indices).

Loading from disk decodes every file once per resolution and keeps the result in a ``.npz`` cache
keyed by the file listing (paths, sizes, modification times): COVID-QU-Ex (33,920 PNGs) takes minutes
to decode and a second to read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medstylegan2.config import CLASS_NAMES, DataConfig
from medstylegan2.errors import DataError
from medstylegan2.images import ImageSet, decode_all
from medstylegan2.phantoms import generate_phantoms
from medstylegan2.runfolder import atomic_write

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
CACHE_VERSION = 1


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
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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


def _class_folder_files(root: Path, max_per_class: int | None) -> list[tuple[Path, int]]:
    expected = ", ".join(f"{root / name}/" for name in CLASS_NAMES)
    if find_covidqu_base(root) is not None:
        hint = " (this looks like COVID-QU-Ex: use data.source=covidqu)"
    else:
        hint = ""
    entries: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASS_NAMES):
        folder = _child_dir(root, name)
        if folder is None:
            raise DataError(f"class folder missing: {root / name} (expected one folder of images per class: "
                            f"{expected}){hint}")
        files = _image_files(folder)
        if not files:
            raise DataError(f"no images in class folder {folder}: expected {'/'.join(IMAGE_SUFFIXES)} files")
        entries += [(f, label) for f in _spread_cap(files, max_per_class)]
    known = {name.lower() for name in CLASS_NAMES}
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
# The decoded-image cache


def _listing_key(*, kind: str, root: Path, splits: Sequence[str], resolution: int, max_per_class: int | None,
                 entries: list[tuple[Path, int]]) -> str:
    listing = []
    for path, label in entries:
        st = path.stat()
        listing.append([path.relative_to(root).as_posix(), label, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "root": str(root), "splits": list(splits),
                       "resolution": resolution, "max_per_class": max_per_class, "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path) -> ImageSet | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            skipped = [str(s) for s in z["skipped"]]
            images = ImageSet(images=z["images"], labels=z["labels"],
                              class_names=tuple(str(c) for c in z["class_names"]),
                              sources=[str(s) for s in z["sources"]])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable cache %s (%s); decoding the images again", path, exc)
        return None
    log.info("loaded %d images from cache %s", len(images), path)
    if skipped:
        log.warning("skipped %d unreadable image(s) when this cache was built: %s", len(skipped),
                    ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return images


def _write_cache(path: Path, images: ImageSet, skipped: list[str]) -> None:
    # Atomic: a crash or a concurrent reader never sees half a file.
    atomic_write(path, lambda fh: np.savez(
        fh, images=images.images, labels=images.labels, class_names=np.array(images.class_names),
        sources=np.array(images.sources or [], dtype=str), skipped=np.array(skipped, dtype=str)))
    log.info("cached %d images at %s", len(images), path)


def _load_entries(entries: list[tuple[Path, int]], *, kind: str, root: Path, splits: Sequence[str],
                  resolution: int, max_per_class: int | None, cache_dir: str | Path | None) -> ImageSet:
    if resolution < 1:
        raise DataError(f"resolution must be >= 1 pixel, got {resolution}")
    cache_path = None
    if cache_dir is not None:
        key = _listing_key(kind=kind, root=root, splits=splits, resolution=resolution,
                           max_per_class=max_per_class, entries=entries)
        # One cache per (root, kind, resolution) is kept: the prefix names it, the suffix says
        # which listing it was built from.
        prefix = f"{kind}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}-{resolution}px-"
        cache_path = Path(cache_dir).expanduser() / f"{prefix}{key[:20]}.npz"
        if cache_path.is_file():
            cached = _read_cache(cache_path)
            if cached is not None:
                return cached
    images, skipped = decode_all(entries, root=root, resolution=resolution, desc=f"decoding {kind} {resolution}px")
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
            raise DataError(f"none of the images of class '{name}' could be read (under {', '.join(folders)}); "
                            f"see the warnings above for each file")


# ----------------------------------------------------------------------------------------------
# Loaders


def load_folder(root: str | Path, resolution: int, *, max_per_class: int | None = None,
                cache_dir: str | Path | None = None) -> ImageSet:
    """Images from ``root/<class name>/*.{png,jpg,jpeg}``, one folder per class in CLASS_NAMES.

    Class folders match case-insensitively. Files are sorted by name; ``max_per_class`` keeps an
    evenly spaced subset of each class.
    """
    base = _require_root(root)
    entries = _class_folder_files(base, max_per_class)
    return _load_entries(entries, kind="folder", root=base, splits=(), resolution=resolution,
                         max_per_class=max_per_class, cache_dir=cache_dir)


def load_covidqu(root: str | Path, resolution: int, *, splits: Sequence[str] = ("Train", "Val"),
                 max_per_class: int | None = None, cache_dir: str | Path | None = None) -> ImageSet:
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
                         resolution=resolution, max_per_class=max_per_class, cache_dir=cache_dir)


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
        everything = generate_phantoms(cfg.phantoms_per_class, resolution, seed=cfg.seed)
        return split_heldout(everything, cfg.heldout_fraction, cfg.seed)
    if cfg.root is None:
        raise DataError(f"data.root is required when data.source is '{cfg.source}'")
    if cfg.source == "folder":
        everything = load_folder(cfg.root, resolution, max_per_class=cfg.max_per_class, cache_dir=cfg.cache_dir)
        return split_heldout(everything, cfg.heldout_fraction, cfg.seed)
    if cfg.source == "covidqu":
        train = load_covidqu(cfg.root, resolution, splits=("Train", "Val"), max_per_class=cfg.max_per_class,
                             cache_dir=cfg.cache_dir)
        heldout = load_covidqu(cfg.root, resolution, splits=("Test",), max_per_class=cfg.max_per_class,
                               cache_dir=cfg.cache_dir)
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
            raise DataError(f"--data {text}: no such folder; give 'phantoms', a folder of <class>/*.png "
                            f"({', '.join(CLASS_NAMES)}), or a COVID-QU-Ex root")
        source = "covidqu" if looks_like_covidqu(path) else "folder"
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
