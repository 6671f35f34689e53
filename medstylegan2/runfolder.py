"""Every file a run writes, written one way: atomic files, strict-JSON lines, checkpoints, path rules.

One owner for each kind of file (the trainer, the server, the evaluator, the privacy report and the
data cache all write through here):

- **atomic files**: ``atomic_write(path, write)`` and its shorthands (``atomic_write_bytes``,
  ``atomic_write_text``, ``atomic_write_json``, ``atomic_torch_save``). The content goes to a
  temporary file in the target's own folder, named ``.<target name>.<random>.tmp``; it is flushed
  and fsynced, ``os.replace``d over the target, and the folder is fsynced. A reader, or a crash at
  any moment, sees the old file or the new one, never half of one; a failed write leaves no
  temporary file behind. ``create_once_text`` is the same for a file that must never be replaced
  once it exists (a secret salt).
- **strict JSON**: ``jsonable`` (NaN/Inf become null, numpy scalars plain numbers, keys strings),
  ``json_line`` and ``append_json_line``, the appender of ``metrics.jsonl`` and ``log.jsonl``
  (one line per record, flushed and fsynced before it returns).
- **checkpoints**: ``write_checkpoint`` / ``read_checkpoint`` (format
  ``medstylegan2-checkpoint-v1``), the same file for ``train-local`` and for a federated round.
- **path rules** of a federated run folder (``RunFolder``): ``round_XXX.pt``, ``metrics.jsonl``,
  ``grids/round_XXX.png``, ``eval/round_XXX.json``, ``config.yaml``, ``partition.csv`` and the
  simulated sites' ``site_state/<run token>/<site>/round_XXX.pt``.

Light on purpose: torch is imported only inside the functions that read or write torch files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import yaml

from medstylegan2.errors import CheckpointError

CHECKPOINT_FORMAT = "medstylegan2-checkpoint-v1"
TEMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------
# Atomic files


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *,
                 before_replace: Optional[Callable[[], None]] = None) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary binary file beside it, then it replaces ``path``.

    Parent folders are created. The temporary file is ``.<name>.<random>.tmp`` in the same folder
    (so ``os.replace`` never crosses file systems, and two writers never share one).
    ``before_replace`` runs between the complete temporary file and the replace (a fault point).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, value: Any, *, indent: Optional[int] = 2) -> Path:
    """Strict JSON (see ``jsonable``), pretty-printed, with a final newline."""
    return atomic_write_text(path, json.dumps(jsonable(value), indent=indent, allow_nan=False) + "\n")


def atomic_torch_save(path: str | Path, value: Any, *, before_replace: Optional[Callable[[], None]] = None) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(value, fh), before_replace=before_replace)


def save_figure(fig: Any, path: str | Path) -> Path:
    """A matplotlib ``Figure`` as an image file, atomically; the format follows the suffix (``.png``)."""
    path = Path(path)
    return atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png"))


def create_once_text(path: str | Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; never replaces a file. True if this call made it.

    For secrets (the site's patient-ID salt): the content goes to a temporary file beside the
    target (``mkstemp``: mode 0600), is fsynced, then hard-linked to the name. A link fails when the
    name is taken, so of two processes racing to create the file both end up reading the winner's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Strict JSON


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/Inf -> None, numpy scalars -> numbers, tuples -> lists, keys -> str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON-lines record (no newline); every line is valid strict JSON."""
    return json.dumps(jsonable(dict(record)), allow_nan=False)


def append_json_line(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line to ``path`` (created with its folder), flushed and fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json_line(record) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_json_lines(path: str | Path, *, skip_broken: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped; a missing file has none).

    ``skip_broken``: leave out lines that are not a JSON object (a line torn by a crash while it
    was being appended) instead of raising.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if skip_broken:
                continue
            raise
        if isinstance(record, dict):
            records.append(record)
        elif not skip_broken:
            raise ValueError(f"{path}: a line is not a JSON object: {line[:80]!r}")
    return records


# ----------------------------------------------------------------------------------------------
# Checkpoints


def write_checkpoint(path: str | Path, state: Mapping[str, Any], *,
                     before_replace: Optional[Callable[[], None]] = None) -> Path:
    """Write a Med-StyleGAN2 checkpoint (stamped with ``CHECKPOINT_FORMAT``) atomically."""
    return atomic_torch_save(path, {**dict(state), "format": CHECKPOINT_FORMAT}, before_replace=before_replace)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``write_checkpoint``; ``CheckpointError`` naming the file otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a Med-StyleGAN2 checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


def config_from_checkpoint(state: Mapping[str, Any], path: str | Path | None = None):
    """The validated ``RunConfig`` a checkpoint was written with (``path`` names the file in errors)."""
    from medstylegan2.config import from_dict

    where = f"{path} (its config)" if path is not None else "checkpoint config"
    if not isinstance(state.get("config"), Mapping):
        raise CheckpointError(f"{path or 'the checkpoint'} holds no config; it was not written by Med-StyleGAN2 "
                              "(or it is damaged)")
    return from_dict(dict(state["config"]), where=where).validate()


def config_yaml(config: Mapping[str, Any]) -> str:
    """A config dictionary (``RunConfig.to_dict()``) as the YAML a run folder keeps."""
    return yaml.safe_dump(dict(config), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Path rules


def round_file(folder: str | Path, round_num: int, suffix: str = ".pt") -> Path:
    """``folder/round_XXX<suffix>`` (three digits at least)."""
    return Path(folder) / f"round_{round_num:03d}{suffix}"


def round_numbers_in(folder: str | Path, suffix: str = ".pt") -> list[int]:
    """Sorted N of every ``round_N<suffix>`` in a folder (other names ignored; a missing folder has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"round_*{suffix}"):
        try:
            found.append(int(path.name[len("round_"):-len(suffix)]))
        except ValueError:
            continue
    return sorted(found)


def site_state_folder(state_root: str | Path, run_token: str, site: str) -> Path:
    """Where a site keeps its local state between rounds: ``<state root>/<run token>/<site>/``."""
    return Path(state_root) / run_token / site


@dataclass
class RunFolder:
    """A federated run's folder and the files in it."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- where things are ------------------------------------------------------------------------
    def checkpoint(self, round_num: int) -> Path:
        return round_file(self.root, round_num, ".pt")

    def grid(self, round_num: int) -> Path:
        return round_file(self.root / "grids", round_num, ".png")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_record(self, round_num: int) -> Path:
        return round_file(self.eval_dir, round_num, ".json")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def partition_csv(self) -> Path:
        return self.root / "partition.csv"

    @property
    def site_state(self) -> Path:
        """Root of the simulated sites' state folders (``site_state_folder`` below it)."""
        return self.root / "site_state"

    def checkpoint_rounds(self) -> list[int]:
        return round_numbers_in(self.root, ".pt")

    # -- writing ---------------------------------------------------------------------------------
    def write_config(self, config: Mapping[str, Any]) -> Path:
        return atomic_write_text(self.config, config_yaml(config))

    def write_checkpoint(self, round_num: int, state: Mapping[str, Any], *, keep: int = 0,
                         before_replace: Optional[Callable[[], None]] = None) -> Path:
        """``round_XXX.pt`` for ``round_num``; then only the newest ``keep`` round checkpoints stay (0: all)."""
        path = write_checkpoint(self.checkpoint(round_num), state, before_replace=before_replace)
        if keep > 0:
            for old in self.checkpoint_rounds()[:-keep]:
                self.checkpoint(old).unlink(missing_ok=True)
        return path

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_json_line(self.metrics, record)

    def metrics_records(self) -> list[dict[str, Any]]:
        return read_json_lines(self.metrics, skip_broken=True)

    def ensure_metrics(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Add each record whose (round, kind) ``metrics.jsonl`` lacks; returns how many were added.

        Idempotent: a record already there (same round and kind) is never written twice. Records
        of the newest round are appended; one of an earlier round (restored after a crash) is put
        in its place in round order, by an atomic rewrite of the file.
        """
        existing = self.metrics_records()
        have = {metrics_key(r) for r in existing}
        missing = [dict(r) for r in records if metrics_key(r) not in have]
        if not missing:
            return 0
        last = max((int(r.get("round") or 0) for r in existing), default=0)
        if all(int(r.get("round") or 0) >= last for r in missing) and self._ends_cleanly():
            for record in missing:
                self.append_metrics(record)
        else:
            merged = sorted(existing + missing, key=lambda r: int(r.get("round") or 0))  # stable: kinds keep order
            atomic_write_text(self.metrics, "".join(json_line(r) + "\n" for r in merged))
        return len(missing)

    def repair_metrics(self, last_round: int) -> None:
        """Keep only the lines of committed rounds (<= ``last_round``), each (round, kind) once.

        Lines of later rounds belong to a round that crashed before its commit point; a line torn
        by a crash while it was appended is dropped (the round's checkpoint still holds it, and
        ``ensure_metrics`` restores it). The file is rewritten only when something changes.
        """
        if not self.metrics.is_file():
            return
        raw = self.metrics.read_text(encoding="utf-8")
        kept, seen = [], set()
        for record in read_json_lines(self.metrics, skip_broken=True):
            key = metrics_key(record)
            if int(record.get("round") or 0) <= last_round and key not in seen:
                seen.add(key)
                kept.append(record)
        text = "".join(json_line(r) + "\n" for r in kept)
        if text != raw:
            atomic_write_text(self.metrics, text)

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (they belong to a run that crashed)."""
        self.repair_metrics(last_round)

    def remove_temporary_files(self) -> list[Path]:
        """Remove the temporary files of atomic writes a crash interrupted (run folder, grids/, eval/)."""
        removed = []
        for folder in (self.root, self.grid(0).parent, self.eval_dir):
            if folder.is_dir():
                for path in folder.glob(f".*{TEMP_SUFFIX}"):
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def _ends_cleanly(self) -> bool:
        """True if ``metrics.jsonl`` is absent, empty or ends with a newline (no torn last line)."""
        if not self.metrics.is_file() or self.metrics.stat().st_size == 0:
            return True
        with self.metrics.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"


def metrics_key(record: Mapping[str, Any]) -> tuple[int, str]:
    """What identifies a ``metrics.jsonl`` line: its round and its kind (``round``, ``eval``)."""
    return int(record.get("round") or 0), str(record.get("kind", ""))
