"""Training speed: images/s for full G+D steps (incl. lazy R1 and path-length reg) per resolution/device.

    python bench/train_speed.py [--resolutions 64 128] [--batch 16] [--steps 16] [--config configs/x.yaml]
                                [--threads N] [--set train.precision=fp32 ...]

Prints one table row per (device, resolution): img/s, s/step and s/kimg (seconds per thousand real
images shown to D), with the speed settings each trainer resolved (``medstylegan2.acceleration``:
precision, memory layout, compile). CUDA rows appear when a GPU is present. Use a multiple of 16
steps so that the lazy regularizers weigh as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.trainer import SiteTrainer  # noqa: E402


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s), load average {load:.1f}"


def measure(cfg, device: str, steps: int, warmup: int) -> tuple[float, float, str]:
    res = cfg.model.resolution
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 1, res, res), dtype=np.uint8)
    labels = rng.integers(0, 3, 256)
    trainer = SiteTrainer(cfg, images, labels, device=device)
    trainer.train_steps(warmup)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_steps(steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return steps * cfg.train.batch_size / seconds, seconds / steps, trainer.accel.describe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="timed steps (a multiple of 16 covers every lazy reg)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--config", default=None, help="YAML config for model widths (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(f"machine: {machine()}", flush=True)
    rows = []
    for device in devices:
        for res in args.resolutions:
            cfg = load_config(args.config, args.overrides + [f"model.resolution={res}",
                                                             f"train.batch_size={args.batch}"])
            ips, sps, accel = measure(cfg, device, args.steps, args.warmup)
            rows.append((device, res, args.batch, ips, sps, cfg.model.channel_base, cfg.model.channel_max, accel))
            print(f"  measured {device} {res}px: {ips:.1f} img/s ({accel})", flush=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\nG+D training speed ({name}; {machine()}; every step = G main + D main, lazy PL every "
          f"{cfg.train.pl_interval}, lazy R1 every {cfg.train.r1_interval}; {args.steps} timed steps)")
    print("| device | resolution | batch | images/s | s/step | s/kimg | channel_base/max | speed settings |")
    print("|---|---|---|---|---|---|---|---|")
    for device, res, batch, ips, sps, base, cmax, accel in rows:
        print(f"| {device} | {res} | {batch} | {ips:.1f} | {sps:.3f} | {1000 / ips:.0f} | {base}/{cmax} | {accel} |")


if __name__ == "__main__":
    main()
