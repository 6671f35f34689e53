"""Where a release is written: refuse a wrong output folder, write beside it, rename into place at the end.

Everything is written into ``<out>.partial-<random>`` beside ``--out`` (``PartialFolder``) and renamed into
place at the end. A run that fails removes its partial folder; one killed outright leaves it, and the next
release to the same ``--out`` removes it (each partial folder holds a lock file that its live writer keeps
locked, so a partial folder that is still being written is never touched: ``remove_stale_partials``).
``check_output`` refuses a non-empty ``--out`` unless ``--force``, which replaces only an earlier release.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from medstylegan2.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".release.lock"
PARTIAL_TAG = ".partial-"


def check_output(out: Path, force: bool, protected: Sequence[Path]) -> None:
    """Refuse an ``--out`` that is a file, non-empty without ``--force``, not an earlier release with
    ``--force``, or that holds one of the inputs."""
    for path in protected:
        if path is not None and _is_within(path, out):
            raise UserError(f"--out {out} contains the input {path}; choose another output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"output folder {out} is not empty; pass --force to replace it")
    if not (out / "release.json").is_file():
        raise UserError(f"output folder {out} is not empty and holds no release.json: --force only replaces an "
                        "earlier release; remove the folder yourself or choose another --out")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove ``<out>.partial-*`` folders whose writer is gone (their lock file can be locked); returns them.

    A partial folder without a lock file is left alone with a warning: its writer may be starting up.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for folder in sorted(out.parent.glob(out.name + PARTIAL_TAG + "*")):
        if not folder.is_dir():
            continue
        lock = folder / LOCK_NAME
        try:
            fh = open(lock, "r+b")
        except FileNotFoundError:
            log.warning("leaving %s: it has no %s (remove it by hand if no release is running)", folder, LOCK_NAME)
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a release is writing it now
            shutil.rmtree(folder)
        log.info("removed %s, left by an interrupted release", folder)
        removed.append(folder)
    return removed


class PartialFolder:
    """``<out>.partial-<random>``, locked while this process writes it; ``commit`` renames it to ``out``.

    Leaving the ``with`` block by an exception removes it; a killed process leaves it for
    ``remove_stale_partials``.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path: Optional[Path] = None
        self._lock: Optional[Any] = None

    def __enter__(self) -> "PartialFolder":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out)
        self.path = self.out.with_name(f"{self.out.name}{PARTIAL_TAG}{secrets.token_hex(4)}")
        self.path.mkdir()
        self._lock = open(self.path / LOCK_NAME, "wb")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def commit(self) -> Path:
        assert self.path is not None
        (self.path / LOCK_NAME).unlink()
        self._lock.close()
        self._lock = None
        # Flush every file before the folder becomes visible under its final name: after a power cut the
        # release is whole or absent, never truncated files under the final name.
        os.sync()
        if self.out.exists():  # empty, or an earlier release (check_output allowed it)
            old = self.out.with_name(f"{self.out.name}.replaced-{secrets.token_hex(4)}")
            self.out.rename(old)
            self.path.rename(self.out)
            shutil.rmtree(old)
        else:
            self.path.rename(self.out)
        self.path = None
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock is not None:
            self._lock.close()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
