"""The decoded-image cache: a data set decoded once per resolution, read back in a second.

One ``.npz`` per (data root, kind of listing, resolution), named
``<kind>-<root hash>-<R>px-<listing key>.npz``: the prefix names the data set, the key says which
listing it was built from (paths, sizes, modification times, and the site options that change
which files are kept or how they decode). A changed tree gets a new key, and writing the new file
removes the stale one of the same prefix. The file holds the pixels, labels, class names, sources,
the files skipped per reason, and the per-patient group numbers (no PatientID, no hash); it stays
on the site's disk. ``medstylegan2.data`` decides when to read and write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medstylegan2.images import ImageSet
from medstylegan2.ingest import SiteOptions
from medstylegan2.runfolder import atomic_write
from medstylegan2.skips import SkipTally

log = logging.getLogger(__name__)

# Bump when the cache layout or decoding changes, so stale caches are never read.
CACHE_VERSION = 2
KEY_CHARS = 20


def cache_file(cache_dir: str | Path, *, kind: str, root: Path, splits: Sequence[str], resolution: int,
               max_per_class: int | None, entries: list[tuple[Path, int]], options: SiteOptions) -> Path:
    """Where the cache of this listing lives (it may not exist yet)."""
    listing = []
    for path, label in entries:
        st = path.stat()
        listing.append([path.relative_to(root).as_posix(), label, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "root": str(root), "splits": list(splits),
                       "resolution": resolution, "max_per_class": max_per_class, "files": listing,
                       "options": options.decoding_key()})
    key = hashlib.sha256(blob.encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"{_prefix(kind, root, resolution)}{key[:KEY_CHARS]}.npz"


def _prefix(kind: str, root: Path, resolution: int) -> str:
    # One cache per (root, kind, resolution) is kept: the prefix names it, the suffix says which
    # listing it was built from.
    return f"{kind}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}-{resolution}px-"


def read_cache(path: Path) -> ImageSet | None:
    """The cached images, or None (with a warning) when the file is unreadable."""
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
    if skipped:
        log.warning("when this cache was built, %d file(s) were skipped:", skipped.total())
        skipped.log_summary(str(path.name), log)
    return images


def write_cache(path: Path, images: ImageSet, skipped: SkipTally, *, root: Path) -> None:
    """Write the cache (atomically: a crash or a concurrent reader never sees half a file) and remove
    the stale caches of the same data set."""
    atomic_write(path, lambda fh: np.savez(
        fh, images=images.images, labels=images.labels, class_names=np.array(images.class_names),
        sources=np.array(images.sources or [], dtype=str), skipped=np.array(skipped.to_strings(), dtype=str),
        has_groups=np.array(images.groups is not None),
        groups=images.groups if images.groups is not None else np.zeros(0, np.int64)))
    log.info("cached %d images at %s", len(images), path)
    prefix = path.name[: -len(path.suffix) - KEY_CHARS]
    for stale in path.parent.glob(f"{prefix}*.npz"):
        if stale != path:
            log.info("removing stale cache %s (the files under %s changed)", stale, root)
            stale.unlink(missing_ok=True)
