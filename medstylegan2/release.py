"""``medstylegan2 release``: a reproducible synthetic-data release that a data steward can hand on.

In: a checkpoint (``train-local``'s ``checkpoint.pt`` or a federated ``round_XXX.pt``). Out, in ``--out DIR``:

- ``<class>/<index:06d>.png``: 8-bit grayscale at the model's resolution (``--format png``), or
  ``<class>-<shard:05d>.npz`` shards of at most ``release_images.SHARD_BYTES`` of uint8 images (``--format npz``; arrays
  ``images`` [n, 1, H, W], ``index``, ``seed``);
- ``manifest.csv``: one row per image (file, npz entry, class, index, seed, truncation, sha256 of the PNG file
  or of the npz image's raw bytes, nearest-training-image distance, status) and, with ``--drop-memorized``,
  one row per candidate the filter dropped (status ``dropped-memorized``, no file);
- ``release.json``: checkpoint sha256 and config, rounds and sites, privacy, the evaluator's figures
  (``medstylegan2.model_card.collect_provenance``), generation settings, counts, file hashes;
- ``MODEL_CARD.md``: the same for people, with the intended use (``model_card.render_model_card``).

Reproducibility (per-image seeds, fixed compute blocks, stable PNG/npz bytes): ``medstylegan2.release_images``;
``--batch`` only sets how many images are written (and filtered) per step. Safety (refusing ``--out``,
writing beside it, renaming at the end): ``medstylegan2.release_folder``.

Memory stays constant in the release size: one batch of images, one npz shard, the manifest streamed to disk;
with ``--drop-memorized`` also the training images (uint8) for the nearest-image search.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from medstylegan2.config import CLASS_NAMES
from medstylegan2.data import load_folder
from medstylegan2.errors import CheckpointError, UserError
from medstylegan2.metrics.memorization import THRESHOLD_PERCENTILE, memorization_threshold, pixel_nearest
from medstylegan2.model_card import (INTENDED_USE, NOT_FOR_DIAGNOSIS, collect_provenance, find_evaluation,
                                     render_model_card)
from medstylegan2.network_weights import load_state_dict_checked
from medstylegan2.networks import build_networks
from medstylegan2.release_folder import PartialFolder, check_output
from medstylegan2.release_images import (CPU_BLOCK, SEED_RULE, NpzWriter, PngWriter, image_seed, render_block,
                                         sha256_file)
from medstylegan2.runfolder import atomic_write_json, atomic_write_text, config_from_checkpoint, read_checkpoint
from medstylegan2.trainer import resolve_device

log = logging.getLogger(__name__)

COMMAND_HELP = ("Write a synthetic-data release: N images per class from a checkpoint, with manifest.csv (sha256 "
                "per image), release.json and MODEL_CARD.md (provenance, privacy, evaluation, intended use).")
RELEASE_FORMAT = "medstylegan2-release-v1"
FORMATS = ("png", "npz")
MANIFEST_COLUMNS = ("file", "entry", "class", "index", "seed", "truncation", "sha256", "nearest_train_rms", "status")


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
        return pixel_nearest(images, self.train_images)[0]

    def describe(self) -> dict[str, Any]:
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
    state = read_checkpoint(opts.checkpoint)
    if not isinstance(state.get("G_ema"), dict):
        raise CheckpointError(f"{opts.checkpoint} has no G_ema weights; it cannot be sampled")
    cfg = config_from_checkpoint(state, opts.checkpoint)
    G, _ = build_networks(cfg.model)
    load_state_dict_checked(G, state["G_ema"], what=f"{opts.checkpoint}:G_ema")
    G = G.to(device).eval().requires_grad_(False)
    round_num = int(state["round"]) if "federation" in state and "round" in state else None
    evaluation, eval_record = find_evaluation(opts.checkpoint, round_num)
    provenance = collect_provenance(opts.checkpoint, state, cfg, sha256_file(opts.checkpoint), evaluation)
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
        atomic_write_json(root / "release.json", record)
        atomic_write_text(root / "MODEL_CARD.md", render_model_card(record))
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
    files = {"manifest.csv": sha256_file(root / "manifest.csv"), **writer.files()}
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
