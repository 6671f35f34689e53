"""DICOM decode throughput: images/s from 2k x 2k 16-bit radiographs to the model's 256 px, per transfer syntax.

    python bench/dicom_decode.py [--n 50] [--size 2048] [--resolution 256] [--variants uncompressed,rle,jpeg2000,png]

Writes ``--n`` synthetic DX radiographs per variant into a temporary folder (chest phantoms upscaled to
``--size`` with per-image noise, 16 bits stored, MONOCHROME2, no window: the percentile path), then
decodes every file through the loader's decoder (``medstylegan2.ingest.decode_file``: read tags, decode
pixels, Modality LUT, VOI, resize with padding, uint8) one file after another and with the loader's
thread pool, side by side in one run. ``png`` is the same images as 8-bit PNGs through the same decoder,
for reference. A second table splits the single-thread time of an uncompressed file into its stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from medstylegan2 import dicom
from medstylegan2.dicom_synth import phantom_anatomy, write_radiograph
from medstylegan2.ingest import SiteOptions, decode_file, decode_workers
from medstylegan2.patient_key import PatientHasher
from medstylegan2.skips import SkipFile

SYNTAXES = {"uncompressed": "1.2.840.10008.1.2.1", "rle": "1.2.840.10008.1.2.5", "jpeg2000": "1.2.840.10008.1.2.4.90"}


def radiograph(index: int, size: int, bases: list[np.ndarray]) -> np.ndarray:
    """A 16-bit radiograph: a phantom upscaled to ``size`` plus quantum-like noise (compresses like a real one)."""
    base = bases[index % len(bases)]
    rng = np.random.default_rng(index)
    noisy = base + rng.normal(0.0, 0.004, base.shape).astype(np.float32)
    return np.rint(np.clip(noisy, 0, 1) * 65535).astype(np.int64)


def write_variant(folder: Path, variant: str, n: int, size: int, bases: list[np.ndarray]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        stored = radiograph(i, size, bases)
        if variant == "png":
            path = folder / f"img{i:04d}.png"
            Image.fromarray((stored >> 8).astype(np.uint8), mode="L").save(path)
        else:
            path = write_radiograph(folder / f"img{i:04d}.dcm", stored=stored, bits_stored=16,
                                    transfer_syntax=SYNTAXES[variant])
        paths.append(path)
    return paths


def throughput(paths: list[Path], resolution: int, workers: int) -> float:
    options = SiteOptions()
    hasher = PatientHasher.ephemeral()
    start = time.perf_counter()
    if workers == 1:
        results = [decode_file(p, resolution, options, hasher) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda p: decode_file(p, resolution, options, hasher), paths))
    seconds = time.perf_counter() - start
    bad = [r for r in results if isinstance(r, SkipFile)]
    if bad:
        raise RuntimeError(f"{len(bad)} file(s) failed to decode: {bad[0]}")
    return len(paths) / seconds


def stages(paths: list[Path], resolution: int) -> list[tuple[str, float]]:
    """Mean single-thread milliseconds per stage for uncompressed files."""
    totals = {"read tags + pixel data (pydicom)": 0.0, "Modality LUT + VOI (percentile window)": 0.0,
              "resize + pad to square, uint8": 0.0}
    for path in paths:
        t0 = time.perf_counter()
        ds = dicom._read_tags(path)
        stored = dicom._stored_values(ds)
        t1 = time.perf_counter()
        unit, _ = dicom.to_unit_range(ds, dicom.modality_values(ds, stored))
        t2 = time.perf_counter()
        dicom.fit_square(unit, resolution)
        t3 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2)):
            totals[key] += dt
    return [(k, 1000 * v / len(paths)) for k, v in totals.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="files per variant")
    p.add_argument("--size", type=int, default=2048, help="rows = columns of each radiograph")
    p.add_argument("--resolution", type=int, default=256, help="model resolution to decode to")
    p.add_argument("--variants", default="uncompressed,rle,jpeg2000,png")
    p.add_argument("--workers", type=int, default=None, help="pool threads (default: the loader's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workers = args.workers or decode_workers()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in (*SYNTAXES, "png")]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join((*SYNTAXES, 'png'))}")

    load = os.getloadavg()
    print(f"# {args.n} files per variant, {args.size}x{args.size} 16-bit -> {args.resolution} px; "
          f"{os.cpu_count()} CPUs, pool of {workers} thread(s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    bases = []
    for label in range(3):
        small = phantom_anatomy(label, 512, seed=label).astype(np.float32)
        bases.append(np.asarray(Image.fromarray(small).resize((args.size, args.size), Image.Resampling.BICUBIC)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        for variant in variants:
            t0 = time.perf_counter()
            paths = write_variant(Path(tmp) / variant, variant, args.n, args.size, bases)
            written = time.perf_counter() - t0
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
            throughput(paths[: min(3, len(paths))], args.resolution, 1)  # warm up imports and codecs
            single = throughput(paths, args.resolution, 1)
            pooled = throughput(paths, args.resolution, workers)
            rows.append((variant, len(paths), mb, single, pooled, written))
            if variant == "uncompressed":
                stage_rows = stages(paths[: min(20, len(paths))], args.resolution)
    print(f"{'variant':<14}{'files':>6}{'MB/file':>9}{'1 thread img/s':>16}{f'{workers} threads img/s':>18}"
          f"{'speedup':>9}{'write s':>9}")
    for variant, n, mb, single, pooled, written in rows:
        print(f"{variant:<14}{n:>6}{mb:>9.2f}{single:>16.1f}{pooled:>18.1f}{pooled / single:>9.2f}{written:>9.1f}")
    if "uncompressed" in variants:
        print("\nsingle-thread stages, uncompressed (ms per image):")
        for name, ms in stage_rows:
            print(f"  {name:<42}{ms:>8.1f}")


if __name__ == "__main__":
    main()
