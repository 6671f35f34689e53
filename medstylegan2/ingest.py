"""One file of a site's archive -> what training needs, whatever the format; a site's own data settings.

``decode_file`` is the single decoder behind the loaders and ``inspect-data``: PNG/JPEG through
the image decoder (``medstylegan2.images``), DICOM through ``medstylegan2.dicom``. It returns
``Decoded`` (uint8 pixels, the salted patient key or None, the DICOM facts or None) or the
``SkipFile`` that says why a file is left out. ``decode_all`` decodes a whole listing in a few
threads into an ``ImageSet``, counting what it leaves out; ``group_indices`` turns the patient keys
of a load into the per-image grouping key that ``ImageSet.groups`` carries (numbers, so the hashes
themselves are never stored).

``site_data_config`` is where a federated site takes its archive settings from its own node
config instead of the server's run config: label vocabulary, label CSV, view filter, salt file and
cache folder are the hospital's business, and a server must not be able to point them elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml
from PIL import Image

from medstylegan2.config import ConfigError, DataConfig, check_label_map
from medstylegan2.dicom import DicomFacts, is_dicom_file, read_dicom
from medstylegan2.images import CONVERSIONS, ImageSet, decode_image_noting
from medstylegan2.labels import LabelVocabulary
from medstylegan2.patient_key import PatientHasher
from medstylegan2.skips import SkipFile, SkipTally

log = logging.getLogger(__name__)

# Node config keys a SuperNode may set for its archive (``--node-config "labels-csv=... "``).
NODE_LABELS_CSV = "labels-csv"
NODE_LABEL_MAP = "label-map"
NODE_FRONTAL_ONLY = "frontal-only"
NODE_SALT_FILE = "salt-file"
NODE_CACHE_DIR = "cache-dir"
SALT_FILE_NAME = "patient-id.salt"
CACHE_DIR_NAME = "data-cache"
# Below this many files a progress bar is more noise than help.
PROGRESS_MIN_FILES = 500


@dataclass(frozen=True)
class SiteOptions:
    """How a site's files are labelled, filtered and keyed (from ``DataConfig``)."""

    vocabulary: LabelVocabulary = LabelVocabulary()
    labels_csv: str | None = None
    frontal_only: bool = True
    patient_salt_file: str | None = None

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "SiteOptions":
        return cls(vocabulary=LabelVocabulary.of(cfg.label_map), labels_csv=cfg.labels_csv,
                   frontal_only=cfg.frontal_only, patient_salt_file=cfg.patient_salt_file)

    def decoding_key(self) -> dict[str, Any]:
        """What changes decoded pixels or which files are kept (for the cache key): no salt, no paths."""
        return {"frontal_only": self.frontal_only}


@dataclass
class Decoded:
    pixels: np.ndarray               # uint8 [R, R]
    patient_key: str | None = None   # salted PatientID hash; stays in memory, never stored
    facts: DicomFacts | None = None  # None for PNG/JPEG
    converted: str | None = None     # a key of images.CONVERSIONS (colour, 16-bit made 8-bit)


def decode_file(path: Path, resolution: int, options: SiteOptions, hasher: PatientHasher | None) -> Decoded | SkipFile:
    """Decode one file, or the reason it is left out (returned, not raised: handy in a thread pool)."""
    try:
        if is_dicom_file(path):
            image = read_dicom(path, resolution, frontal_only=options.frontal_only, hasher=hasher)
            return Decoded(pixels=image.pixels, patient_key=image.patient_key, facts=image.facts)
        pixels, converted = decode_image_noting(path, resolution)
        return Decoded(pixels=pixels, converted=converted)
    except SkipFile as skip:
        return skip
    # PIL reports broken files through several exception types depending on the codec.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return SkipFile("unreadable", f"{type(exc).__name__}: {exc}")


def group_indices(keys: Sequence[str | None]) -> np.ndarray | None:
    """Per-image group numbers: equal keys share one, images without a key get one each.

    None when no image has a key (no patient information at all). Numbers follow the sorted keys,
    so they are reproducible for one salt and reveal nothing about the PatientIDs.
    """
    if all(key is None for key in keys):
        return None
    known = sorted({key for key in keys if key is not None})
    number = {key: i for i, key in enumerate(known)}
    groups = np.empty(len(keys), dtype=np.int64)
    next_single = len(known)
    for i, key in enumerate(keys):
        if key is None:
            groups[i], next_single = next_single, next_single + 1
        else:
            groups[i] = number[key]
    return groups


def decode_workers() -> int:
    """Threads that decode files: PIL, numpy and the DICOM codecs release the GIL while they work."""
    return max(1, min(8, os.cpu_count() or 1))


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth failing a load over
        return None
    return tqdm(total=total, desc=desc, unit="img", disable=total <= PROGRESS_MIN_FILES, leave=False)


def decode_all(entries: list[tuple[Path, int]], *, root: Path, resolution: int, desc: str,
               options: SiteOptions) -> tuple[ImageSet, SkipTally]:
    """Decode ``(file, label)`` entries; files left out are counted per reason (unreadable ones warned
    about by name). Returns the image set (``sources`` relative to ``root``, ``groups`` when any
    file had a PatientID) and the skipped files."""
    images = np.empty((len(entries), 1, resolution, resolution), dtype=np.uint8)
    keep = np.zeros(len(entries), dtype=bool)
    patient_keys: list[str | None] = [None] * len(entries)
    skipped = SkipTally()
    converted: dict[str, list[str]] = {}
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
                if result.converted:
                    converted.setdefault(result.converted, []).append(path.relative_to(root).as_posix())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for code, names in converted.items():
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        log.warning("under %s: %d %s: %s%s", root, len(names), CONVERSIONS[code], ", ".join(names[:3]), more)
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


# ----------------------------------------------------------------------------------------------
# A federated site's own settings


def site_data_config(server: DataConfig, node_config: Mapping[str, Any]) -> DataConfig:
    """The server's data config with the archive settings replaced by the site's (node config).

    - ``label-map``: a YAML/JSON file ``{word: class-or-skip}`` (default: none);
    - ``labels-csv``: the site's ``file,label`` CSV (default: class folders);
    - ``frontal-only``: true/false (default true);
    - ``salt-file``: the patient-ID salt (default ``<state-dir>/patient-id.salt``, else
      ``~/.config/medstylegan2/patient-id.salt``);
    - ``cache-dir``: decoded-image cache (default ``<state-dir>/data-cache``, else the default
      ``.cache/medstylegan2`` under the SuperNode's working folder).
    """
    state_dir = str(node_config.get("state-dir", "") or "")
    salt = str(node_config.get(NODE_SALT_FILE, "") or "") or (str(Path(state_dir) / SALT_FILE_NAME) if state_dir
                                                              else None)
    cache = str(node_config.get(NODE_CACHE_DIR, "") or "") or (str(Path(state_dir) / CACHE_DIR_NAME) if state_dir
                                                               else DataConfig().cache_dir)
    label_map_file = str(node_config.get(NODE_LABEL_MAP, "") or "")
    return dataclasses.replace(
        server,
        label_map=read_label_map_file(label_map_file) if label_map_file else {},
        labels_csv=str(node_config.get(NODE_LABELS_CSV, "") or "") or None,
        frontal_only=_node_bool(node_config.get(NODE_FRONTAL_ONLY, True), NODE_FRONTAL_ONLY),
        patient_salt_file=salt,
        cache_dir=cache,
    )


def read_label_map_file(path: str | Path) -> dict[str, str]:
    """A site's label map file: a YAML (or JSON) mapping ``word: class`` validated like ``data.label_map``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"label map file not found: {path} (node config {NODE_LABEL_MAP})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"label map file {path}: not readable YAML/JSON: {exc}") from exc
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
        raise ConfigError(f"label map file {path}: must be a mapping of label words to class names, got {loaded!r}")
    try:
        check_label_map(loaded)
    except ConfigError as exc:
        raise ConfigError(f"label map file {path}: {exc}") from exc
    return loaded


def _node_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config '{key}' must be true or false, got {value!r}")
