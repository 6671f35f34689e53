"""``medstylegan2 release``: a reproducible synthetic-data release that a data steward can hand on.

In: a checkpoint (``train-local``'s ``checkpoint.pt`` or a federated ``round_XXX.pt``). Out, in ``--out DIR``:

- ``<class>/<index:06d>.png``: 8-bit grayscale at the model's resolution (``--format png``), or
  ``<class>-<shard:05d>.npz`` shards of at most ``SHARD_BYTES`` of uint8 images (``--format npz``; arrays
  ``images`` [n, 1, H, W], ``index``, ``seed``);
- ``manifest.csv``: one row per image (file, npz entry, class, index, seed, truncation, sha256 of the PNG file
  or of the npz image's raw bytes, nearest-training-image distance, status) and, with ``--drop-memorized``,
  one row per candidate the filter dropped (status ``dropped-memorized``, no file);
- ``release.json``: checkpoint sha256 and config, rounds and sites, privacy, the evaluator's figures
  (``medstylegan2.model_card.collect_provenance``), generation settings, counts, file hashes;
- ``MODEL_CARD.md``: the same for people, with the intended use (``model_card.render_model_card``).

Reproducibility. Image ``index`` of class ``k`` has its own seed ``image_seed(seed, k, index)`` and its latent
is drawn from a generator seeded with it alone. Measured on this torch build (2.14.1, MKL + oneDNN, x86-64):
a sample's output of the same network depends on how many other samples share its batch (MKL GEMM uses
other kernels for row tails, oneDNN's 1x1 convolution blocks over the whole batch) and, with oneDNN, on the
thread count. So the network never sees a batch that depends on ``--batch``: it always runs on one fixed
block of ``CPU_BLOCK`` consecutive indices of one class (the last block of a class runs whole, the surplus
is discarded), with oneDNN switched off, which made the output identical for 1 to 16 threads. ``--batch``
only sets how many images are written (and filtered) per step. On CUDA the block is ``--batch`` rounded up
to a multiple of ``CPU_BLOCK`` (speed first; GPU output is not bit-identical to the CPU's anyway). PNGs are
encoded without time stamps and npz shards are written with fixed zip dates, so a rerun gives the same bytes.

Safety. Everything is written into ``<out>.partial-<random>`` beside ``--out`` and renamed into place at the
end. A run that fails removes its partial folder; one killed outright leaves it, and the next release to the
same ``--out`` removes it (each partial folder holds a lock file that its live writer keeps locked, so a
partial folder that is still being written is never touched). ``--force`` replaces only an earlier release.

Memory stays constant in the release size: one batch of images, one npz shard, the manifest streamed to disk;
with ``--drop-memorized`` also the training images (uint8) for the nearest-image search.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from medstylegan2.errors import CheckpointError, UserError
from medstylegan2.model_card import (INTENDED_USE, NOT_FOR_DIAGNOSIS, collect_provenance, find_evaluation,
                                     render_model_card)

log = logging.getLogger(__name__)

COMMAND_HELP = ("Write a synthetic-data release: N images per class from a checkpoint, with manifest.csv (sha256 "
                "per image), release.json and MODEL_CARD.md (provenance, privacy, evaluation, intended use).")
RELEASE_FORMAT = "medstylegan2-release-v1"
FORMATS = ("png", "npz")
# The CPU network always runs on blocks of this many consecutive indices of one class (see module docstring).
CPU_BLOCK = 16
# An npz shard holds at most this many bytes of images (its in-memory buffer is that large).
SHARD_BYTES = 32 * 2**20
MANIFEST_COLUMNS = ("file", "entry", "class", "index", "seed", "truncation", "sha256", "nearest_train_rms", "status")
LOCK_NAME = ".release.lock"
PARTIAL_TAG = ".partial-"
SEED_RULE = ("image_seed = int.from_bytes(sha256(f'medstylegan2-release/{release_seed}/{class_index}/{index}')"
             "[:8], 'little') & (2**63 - 1); z = torch.randn(z_dim, generator=torch.Generator()"
             ".manual_seed(image_seed)); class indices follow the class order of the counts table, from 0.")


# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class ReleaseOptions:
    checkpoint: Path
    out: Path
    per_class: int
    seed: int = 0
    truncation: float = 1.0
    format: str = "png"
    batch: int = 64
    device: str = "cpu"
    force: bool = False
    drop_memorized: bool = False
    train: Optional[Path] = None
    heldout: Optional[Path] = None
    # With --drop-memorized: give up on a class after this many candidates per image asked for.
    max_attempts: float = 4.0
    quiet: bool = False

    def __post_init__(self) -> None:
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        self.train = Path(self.train) if self.train is not None else None
        self.heldout = Path(self.heldout) if self.heldout is not None else None

    def validate(self) -> "ReleaseOptions":
        if self.per_class < 1:
            raise UserError(f"--per-class must be at least 1, got {self.per_class}")
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 < self.truncation <= 1:
            raise UserError(f"--truncation must be in (0, 1], got {self.truncation:g}")
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.drop_memorized and self.train is None:
            raise UserError("--drop-memorized needs --train DIR (the training images to compare against)")
        if not self.drop_memorized and (self.train is not None or self.heldout is not None):
            raise UserError("--train and --heldout are only used with --drop-memorized")
        if self.max_attempts < 1:
            raise UserError(f"--max-attempts must be at least 1, got {self.max_attempts:g}")
        return self


# ----------------------------------------------------------------------------------------------
# Seeds and images


def image_seed(release_seed: int, class_index: int, index: int) -> int:
    """The seed of one image, a function of (release seed, class, index) only (``SEED_RULE``)."""
    digest = hashlib.sha256(f"medstylegan2-release/{release_seed}/{class_index}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def latents(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """[len(seeds), z_dim] standard-normal latents, row i from its own generator seeded with ``seeds[i]``."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@contextlib.contextmanager
def _onednn_off(device: torch.device) -> Iterator[None]:
    # oneDNN's convolutions give results that depend on the thread count; the plain kernels did not.
    if device.type != "cpu":
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


@torch.no_grad()
def render_block(G: torch.nn.Module, seeds: Sequence[int], class_index: int, truncation: float,
                 device: torch.device) -> np.ndarray:
    """uint8 [n, 1, H, W] images of one class for these image seeds, in one network call (eval mode,
    constant noise, class-aware truncation)."""
    from medstylegan2.trainer import float_to_images

    z = latents(seeds, G.z_dim).to(device)
    labels = torch.full((len(seeds),), class_index, dtype=torch.long, device=device)
    with _onednn_off(device):
        return float_to_images(G(z, labels, truncation_psi=truncation, noise_mode="const"))


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a uint8 [H, W] array; the same bytes for the same pixels (no time chunks)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Writers: PNG files or npz shards, each returning (file, entry, sha256) per image


class PngWriter:
    def __init__(self, root: Path):
        self.root = root

    def layout(self) -> str:
        return "<class>/<index>.png"

    def write(self, class_name: str, index: int, seed: int, image: np.ndarray) -> tuple[str, str, str]:
        data = encode_png(image[0])
        rel = f"{class_name}/{index:06d}.png"
        path = self.root / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return rel, "", hashlib.sha256(data).hexdigest()

    def end_class(self) -> None:
        pass

    def files(self) -> dict[str, str]:
        return {}


class NpzWriter:
    """Per class, shards ``<class>-00000.npz``, ... of at most ``shard_bytes`` of images each."""

    def __init__(self, root: Path, resolution: int, shard_bytes: Optional[int] = None):
        self.root, self.resolution = root, resolution
        self.capacity = max(1, (shard_bytes or SHARD_BYTES) // (resolution * resolution))
        self.class_name: Optional[str] = None
        self.shard = 0
        self.images = np.empty((self.capacity, 1, resolution, resolution), np.uint8)
        self.index: list[int] = []
        self.seed: list[int] = []
        self.shard_hashes: dict[str, str] = {}

    def layout(self) -> str:
        return f"<class>-<shard>.npz, at most {self.capacity} images per shard (arrays images, index, seed)"

    def _name(self) -> str:
        return f"{self.class_name}-{self.shard:05d}.npz"

    def write(self, class_name: str, index: int, seed: int, image: np.ndarray) -> tuple[str, str, str]:
        if class_name != self.class_name:
            self.end_class()
            self.class_name, self.shard = class_name, 0
        entry = len(self.index)
        self.images[entry] = image
        self.index.append(index)
        self.seed.append(seed)
        name = self._name()
        if len(self.index) == self.capacity:
            self._flush()
        return name, str(entry), hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    def _flush(self) -> None:
        n = len(self.index)
        if n == 0:
            return
        name = self._name()
        self.shard_hashes[name] = write_npz(self.root / name, {
            "images": self.images[:n], "index": np.asarray(self.index, np.int64),
            "seed": np.asarray(self.seed, np.int64)})
        self.index, self.seed = [], []
        self.shard += 1

    def end_class(self) -> None:
        self._flush()

    def files(self) -> dict[str, str]:
        return dict(self.shard_hashes)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write arrays as an ``np.load``-able npz (deflated); returns the file's sha256.

    ``np.savez`` stamps each member with the current time; fixed zip dates make the bytes reproducible.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return _sha256_file(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Memorization filter


@dataclass
class MemorizationFilter:
    """Drops images whose nearest training image is closer than the memorization audit's threshold,
    in the audit's pixel space (``medstylegan2.metrics.memorization``)."""

    train_images: np.ndarray
    threshold: float
    threshold_source: str
    train_dir: str

    def distances(self, images: np.ndarray) -> np.ndarray:
        from medstylegan2.metrics.memorization import pixel_nearest

        return pixel_nearest(images, self.train_images)[0]

    def describe(self) -> dict[str, Any]:
        from medstylegan2.metrics.memorization import THRESHOLD_PERCENTILE

        return {"space": "pixel (RMS difference of images scaled to [0, 1])", "train": self.train_dir,
                "n_train": int(len(self.train_images)), "threshold": self.threshold,
                "threshold_source": self.threshold_source,
                "rule": (f"drop a candidate whose nearest training image is closer than the threshold: the "
                         f"{THRESHOLD_PERCENTILE:g}th percentile of the real held-out images' nearest-training-"
                         "image distances (the memorization audit's threshold)")}


def build_memorization_filter(opts: ReleaseOptions, resolution: int, eval_record: Optional[dict],
                              eval_file: Optional[str] = None) -> MemorizationFilter:
    """The filter for ``--drop-memorized``: training images from ``--train``; the threshold from the held-out
    images of ``--heldout`` or, without it, the evaluator's audit of this checkpoint (same training set)."""
    from medstylegan2.data import load_folder
    from medstylegan2.metrics.memorization import memorization_threshold, pixel_nearest

    train = load_folder(opts.train, resolution)
    if opts.heldout is not None:
        heldout = load_folder(opts.heldout, resolution)
        threshold = memorization_threshold(pixel_nearest(heldout.images, train.images)[0])
        source = f"computed from {len(heldout)} held-out images in {opts.heldout}"
    else:
        pixel = ((eval_record or {}).get("memorization") or {}).get("pixel") or {}
        if pixel.get("threshold") is None:
            raise UserError("--drop-memorized needs the memorization audit's threshold: pass --heldout DIR (real "
                            "images never trained on), or evaluate this checkpoint with the memorization metric "
                            "first (its eval/round_XXX.json)")
        if eval_record.get("n_train") != len(train) or eval_record.get("resolution") != resolution:
            raise UserError(f"the evaluator's memorization threshold was measured against {eval_record.get('n_train')} "
                            f"training images at {eval_record.get('resolution')} px, but --train {opts.train} has "
                            f"{len(train)} at {resolution} px; pass --heldout DIR to compute the threshold here")
        threshold = float(pixel["threshold"])
        source = f"the evaluator's audit of this checkpoint ({eval_file})"
    if threshold <= 0:
        raise UserError(f"the memorization threshold is 0 ({source}): at least the audit's percentile of the "
                        "held-out images are exact copies of training images, so the filter would drop nothing; "
                        "remove the duplicates from the held-out set")
    return MemorizationFilter(train_images=train.images, threshold=threshold, threshold_source=source,
                              train_dir=str(opts.train))


# ----------------------------------------------------------------------------------------------
# Output folder: refuse, write beside, rename at the end


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


# ----------------------------------------------------------------------------------------------
# The release


@dataclass
class ClassCount:
    images: int = 0
    candidates: int = 0
    dropped_memorized: int = 0


@dataclass
class _Loaded:
    G: torch.nn.Module
    cfg: Any
    provenance: dict[str, Any]
    eval_record: Optional[dict]
    class_names: tuple[str, ...]
    resolution: int


def load_for_release(opts: ReleaseOptions, device: torch.device) -> _Loaded:
    """The checkpoint's G_ema on ``device`` and everything the card says about it; errors name the file."""
    from medstylegan2.config import CLASS_NAMES
    from medstylegan2.networks import build_networks
    # TODO(arch): read through the run-folder module's checkpoint reader once it exists.
    from medstylegan2.trainer import config_from_checkpoint, load_state_dict_checked, read_checkpoint

    state = read_checkpoint(opts.checkpoint)
    if not isinstance(state.get("G_ema"), dict):
        raise CheckpointError(f"{opts.checkpoint} has no G_ema weights; it cannot be sampled")
    cfg = config_from_checkpoint(state)
    G, _ = build_networks(cfg.model)
    load_state_dict_checked(G, state["G_ema"], what=f"{opts.checkpoint}:G_ema")
    G = G.to(device).eval().requires_grad_(False)
    round_num = int(state["round"]) if "federation" in state and "round" in state else None
    evaluation, eval_record = find_evaluation(opts.checkpoint, round_num)
    provenance = collect_provenance(opts.checkpoint, state, cfg, _sha256_file(opts.checkpoint), evaluation)
    names = CLASS_NAMES if G.num_classes == len(CLASS_NAMES) else tuple(f"class_{k}" for k in range(G.num_classes))
    return _Loaded(G=G, cfg=cfg, provenance=provenance, eval_record=eval_record, class_names=tuple(names),
                   resolution=cfg.model.resolution)


def _blocks(start: int, stop: int, block: int) -> Iterator[range]:
    for s in range(start, stop, block):
        yield range(s, s + block)


def write_release(opts: ReleaseOptions, *, after_batch: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Write the release described by ``opts``; returns the ``release.json`` record.

    ``after_batch(n)`` is called after the n-th batch's files are written (a fault-injection point for tests).
    """
    from medstylegan2.trainer import resolve_device

    opts.validate()
    device = resolve_device(opts.device)
    check_output(opts.out, opts.force, [opts.checkpoint, opts.train, opts.heldout])
    loaded = load_for_release(opts, device)
    mem_filter = (build_memorization_filter(opts, loaded.resolution, loaded.eval_record,
                                            loaded.provenance["evaluation"].get("file"))
                  if opts.drop_memorized else None)
    block = CPU_BLOCK if device.type == "cpu" else math.ceil(opts.batch / CPU_BLOCK) * CPU_BLOCK
    batch = math.ceil(opts.batch / block) * block  # whole blocks, so every network call is one block

    with PartialFolder(opts.out) as partial:
        root = partial.path
        writer = NpzWriter(root, loaded.resolution) if opts.format == "npz" else PngWriter(root)
        with open(root / "manifest.csv", "w", newline="") as manifest_fh, _progress(opts, loaded) as bar:
            manifest = csv.writer(manifest_fh, lineterminator="\n")
            manifest.writerow(MANIFEST_COLUMNS)
            batches = 0
            counts: dict[str, ClassCount] = {}
            for k, name in enumerate(loaded.class_names):
                count = counts[name] = ClassCount()
                limit = opts.per_class if mem_filter is None else math.ceil(opts.per_class * opts.max_attempts)
                next_index = 0
                while count.images < opts.per_class:
                    if next_index >= limit:
                        raise UserError(
                            f"class {name}: only {count.images} of {opts.per_class} images passed the memorization "
                            f"filter after {count.candidates} candidates (--max-attempts {opts.max_attempts:g}); "
                            "the model reproduces training images too often to release this many")
                    wanted = min(batch, math.ceil((opts.per_class - count.images) / block) * block)
                    images, seeds, distances = [], [], []
                    for indices in _blocks(next_index, next_index + wanted, block):
                        block_seeds = [image_seed(opts.seed, k, i) for i in indices]
                        block_images = render_block(loaded.G, block_seeds, k, opts.truncation, device)
                        images.append(block_images)
                        seeds += block_seeds
                        if mem_filter is not None:  # per block too, so the distances never depend on --batch
                            distances.append(mem_filter.distances(block_images))
                    images_np = np.concatenate(images)
                    dist_np = np.concatenate(distances) if distances else None
                    for j, index in enumerate(range(next_index, next_index + wanted)):
                        if count.images == opts.per_class or index >= limit:
                            break
                        count.candidates += 1
                        distance = "" if dist_np is None else f"{dist_np[j]:.6f}"
                        if mem_filter is not None and dist_np[j] < mem_filter.threshold:
                            count.dropped_memorized += 1
                            manifest.writerow(["", "", name, index, seeds[j], f"{opts.truncation:g}", "", distance,
                                               "dropped-memorized"])
                            continue
                        file, entry, digest = writer.write(name, index, seeds[j], images_np[j])
                        manifest.writerow([file, entry, name, index, seeds[j], f"{opts.truncation:g}", digest,
                                           distance, "kept"])
                        count.images += 1
                        bar.update(1)
                    next_index += wanted
                    batches += 1
                    if after_batch is not None:
                        after_batch(batches)
                writer.end_class()
        record = _release_record(opts, loaded, counts, device, block, writer, mem_filter, root)
        (root / "release.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        (root / "MODEL_CARD.md").write_text(render_model_card(record))
        partial.commit()
    return record


def _progress(opts: ReleaseOptions, loaded: _Loaded):
    from tqdm import tqdm

    return tqdm(total=opts.per_class * len(loaded.class_names), unit="img", desc="release", file=sys.stderr,
                disable=opts.quiet or not sys.stderr.isatty(), leave=False)


def _release_record(opts: ReleaseOptions, loaded: _Loaded, counts: dict[str, ClassCount], device: torch.device,
                    block: int, writer, mem_filter: Optional[MemorizationFilter], root: Path) -> dict[str, Any]:
    invariance = (f"On the CPU the generator runs in eval mode with constant noise on fixed blocks of {block} "
                  "consecutive indices of one class, with oneDNN off: the same checkpoint, --seed, --per-class and "
                  "--truncation give byte-identical files whatever --batch and thread count (measured with torch "
                  "2.14.1 on x86-64 for 1 to 16 threads). Another CPU type, BLAS or torch version may round a few "
                  "pixels differently, and another Pillow (zlib) may compress the same pixels into other PNG "
                  "bytes; npz manifest hashes are of the raw pixels." if device.type == "cpu" else
                  f"On the GPU the generator ran on blocks of {block} images (--batch rounded up to a multiple of "
                  f"{CPU_BLOCK}); a rerun with another --batch, GPU or software may differ in a few pixels.")
    generation = {"per_class": opts.per_class, "seed": opts.seed, "truncation": opts.truncation,
                  "format": opts.format, "resolution": loaded.resolution, "noise_mode": "const",
                  "device": device.type, "torch": torch.__version__, "compute_block": block,
                  "onednn": device.type != "cpu", "seed_rule": SEED_RULE, "batch_invariance": invariance}
    files = {"manifest.csv": _sha256_file(root / "manifest.csv"), **writer.files()}
    return {
        "format": RELEASE_FORMAT,
        "intended_use": {"use": INTENDED_USE, "not_for_diagnosis": NOT_FOR_DIAGNOSIS},
        **{key: loaded.provenance[key] for key in ("checkpoint", "training", "privacy", "evaluation")},
        "generation": generation,
        "layout": writer.layout(),
        "counts": {name: vars(c) for name, c in counts.items()},
        "memorization_filter": None if mem_filter is None else mem_filter.describe(),
        "files": files,
        "config": loaded.cfg.to_dict(),
    }


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint (.pt) from train-local or a federated round")
    p.add_argument("--out", required=True, help="release folder to create (written beside it, renamed at the end)")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="release seed; each image's seed derives from it (default 0)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi in (0, 1] (default 1: none)")
    p.add_argument("--format", default="png", help="png (one file per image, default) or npz (shards per class)")
    p.add_argument("--batch", type=int, default=64, help="images generated and written per step (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (default; reproducible), cuda or auto")
    p.add_argument("--force", action="store_true", help="replace an earlier release in --out")
    p.add_argument("--drop-memorized", action="store_true",
                   help="drop images closer to a training image than the memorization audit's threshold, and "
                        "generate more until every class has --per-class images")
    p.add_argument("--train", metavar="DIR", help="training images DIR/<class>/*.png (for --drop-memorized)")
    p.add_argument("--heldout", metavar="DIR",
                   help="real held-out images DIR/<class>/*.png: the threshold is the audit's percentile of their "
                        "distances (default: the threshold of this checkpoint's eval/round_XXX.json)")
    p.add_argument("--max-attempts", type=float, default=4.0,
                   help="with --drop-memorized, stop with an error after this many candidates per requested image "
                        "of a class (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    opts = ReleaseOptions(checkpoint=args.checkpoint, out=args.out, per_class=args.per_class, seed=args.seed,
                          truncation=args.truncation, format=args.format, batch=args.batch, device=args.device,
                          force=args.force, drop_memorized=args.drop_memorized, train=args.train,
                          heldout=args.heldout, max_attempts=args.max_attempts, quiet=args.quiet)
    record = write_release(opts)
    for name, c in record["counts"].items():
        dropped = f" ({c['dropped_memorized']} dropped as memorized)" if record["memorization_filter"] else ""
        print(f"{name:>10}: {c['images']} images{dropped}")
    privacy = record["privacy"]
    if not privacy["differentially_private"]:
        print("privacy: NOT differentially private")
    elif privacy.get("missing"):
        print(f"privacy: {privacy['missing']}")
    else:
        eps = ", ".join(f"{site} {_eps(s['epsilon'])}" for site, s in privacy["sites"].items())
        print(f"privacy: epsilon per site: {eps}")
    print(f"wrote {opts.out} (manifest.csv, release.json, MODEL_CARD.md)")
    return 0


def _eps(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"
