"""Data sets: loaders for class folders and COVID-QU-Ex, held-out splits.

Every loader returns ``medstylegan2.images.ImageSet``s (uint8 ``[N, 1, H, W]`` + class indices).

Loading from disk decodes every file once per resolution and keeps the result in a ``.npz`` cache
(``medstylegan2.image_cache``) keyed by the file listing (paths, sizes, modification times).

DICOM files (a hospital's archive) sit beside or instead of PNGs: ``medstylegan2.ingest`` decodes
every file, ``medstylegan2.dicom`` does the DICOM part, ``medstylegan2.labels`` reads a label CSV
and the site's label words, and files left out are counted per reason (``medstylegan2.skips``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medstylegan2 import phantoms
from medstylegan2.config import CLASS_NAMES, DataConfig
from medstylegan2.dicom import find_dicom_files
from medstylegan2.errors import DataError
from medstylegan2.image_cache import KEY_CHARS, cache_file, read_cache, write_cache
from medstylegan2.images import ImageSet
from medstylegan2.ingest import SiteOptions, decode_all
from medstylegan2.labels import LabelVocabulary, read_label_csv
from medstylegan2.patient_ids import with_patient_ids
from medstylegan2.skips import SkipTally

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
# Decoding, through the cache


def _load_entries(entries: list[tuple[Path, int]], *, kind: str, root: Path, splits: Sequence[str],
                  resolution: int, max_per_class: int | None, cache_dir: str | Path | None,
                  options: SiteOptions) -> ImageSet:
    if resolution < 1:
        raise DataError(f"resolution must be >= 1 pixel, got {resolution}")
    cache_path = None
    if cache_dir is not None:
        cache_path = cache_file(cache_dir, kind=kind, root=root, splits=splits, resolution=resolution,
                                max_per_class=max_per_class, entries=entries, options=options)
        cached = read_cache(cache_path) if cache_path.is_file() else None
        if cached is not None:
            log.info("loaded %d images from cache %s", len(cached), cache_path)
            return cached
    images, skipped = decode_all(entries, root=root, resolution=resolution, desc=f"decoding {kind} {resolution}px",
                                 options=options)
    _check_every_class_read(images, entries, root)
    if cache_path is not None:
        write_cache(cache_path, images, skipped, root=root)
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

    When the images carry patients (``groups``) whole patients are held out instead: no patient is
    on both sides (the audit's non-members and the evaluator's held-out set stay unseen patients).

    Stratified, so class proportions match; every class keeps at least one training image and, when
    it has two or more and ``fraction > 0``, gives at least one to the held-out set. Both keep the
    original order of the images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if images.groups is not None and fraction > 0:
        return _split_by_patient(images, fraction, seed)
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


def _split_by_patient(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Whole patients (seeded order) held out while they fit in ``fraction`` of the images (at least one)."""
    patients, sizes = np.unique(images.groups, return_counts=True)
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,))).permutation(len(patients))
    target, count, held = fraction * len(images), 0, []
    for i in order:
        if count + sizes[i] <= target:
            held.append(patients[i])
            count += int(sizes[i])
    if not held and len(patients) >= 2:  # the smallest patient, so that something is held out
        held.append(patients[int(np.argmin(sizes))])
    is_held = np.isin(images.groups, np.asarray(held, dtype=images.groups.dtype))
    return images.subset(np.flatnonzero(~is_held)), images.subset(np.flatnonzero(is_held))


def _phantoms_cached(per_class: int, resolution: int, seed: int, cache_dir: str | None) -> ImageSet:
    """``generate_phantoms`` through the ``.npz`` cache: every process of a federated run (server and
    each site) needs the same phantoms, and thousands take tens of seconds to render. The key holds
    the generator's source, so a changed generator never reads an old cache."""
    if not cache_dir:
        return phantoms.generate_phantoms(per_class, resolution, seed=seed)
    blob = Path(phantoms.__file__).read_bytes() + f"{per_class}:{resolution}:{seed}".encode()
    key = hashlib.sha256(blob).hexdigest()[:KEY_CHARS]
    path = Path(cache_dir).expanduser() / f"phantoms-{resolution}px-{per_class}-seed{seed}-{key}.npz"
    cached = read_cache(path) if path.is_file() else None
    if cached is not None:
        return cached
    images = phantoms.generate_phantoms(per_class, resolution, seed=seed)
    try:
        write_cache(path, images, SkipTally(), root=Path("phantoms"))
    except OSError as exc:  # a read-only cache folder only costs the rendering time
        log.warning("could not cache phantoms at %s (%s)", path, exc)
    return images


def load_dataset(cfg: DataConfig, resolution: int) -> tuple[ImageSet, ImageSet]:
    """(train, heldout) for a data config. The held-out images never appear in the training set.

    - ``phantoms``: ``cfg.phantoms_per_class`` per class from seed ``cfg.seed``, then a stratified
      ``cfg.heldout_fraction`` split;
    - ``folder``: ``load_folder(cfg.root)``, then the same split (by patient with ``cfg.patient_csv``);
    - ``covidqu``: Train + Val for training, the data set's own Test split held out
      (``cfg.heldout_fraction`` does not apply).
    """
    if cfg.source == "phantoms":
        return split_heldout(_phantoms_cached(cfg.phantoms_per_class, resolution, cfg.seed, cfg.cache_dir),
                             cfg.heldout_fraction, cfg.seed)
    if cfg.root is None:
        raise DataError(f"data.root is required when data.source is '{cfg.source}'")
    options = SiteOptions.from_config(cfg)
    if cfg.source == "folder":
        everything = load_folder(cfg.root, resolution, max_per_class=cfg.max_per_class, cache_dir=cfg.cache_dir,
                                 options=options)
        return split_heldout(with_patient_ids(everything, cfg.patient_csv), cfg.heldout_fraction, cfg.seed)
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
