"""Training speed: images/s for full G+D steps (incl. lazy R1 and path-length reg) per resolution/device.

    python bench/train_speed.py [--resolutions 64 128] [--batch 16] [--steps 10] [--config configs/x.yaml]

Prints one table row per (device, resolution). CUDA rows appear when a GPU is present.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medstylegan2.config import load_config
from medstylegan2.trainer import SiteTrainer


def measure(cfg, device: str, steps: int, warmup: int) -> tuple[float, float]:
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
    return steps * cfg.train.batch_size / seconds, seconds / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps (a multiple of 16 covers every lazy reg)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--config", default=None, help="YAML config for model widths (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for res in args.resolutions:
            cfg = load_config(args.config, args.overrides + [f"model.resolution={res}",
                                                             f"train.batch_size={args.batch}"])
            ips, sps = measure(cfg, device, args.steps, args.warmup)
            rows.append((device, res, args.batch, ips, sps, cfg.model.channel_base, cfg.model.channel_max))
            print(f"  measured {device} {res}px: {ips:.1f} img/s", flush=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nG+D training speed ({name}; every step = G main + D main, lazy PL every "
          f"{cfg.train.pl_interval}, lazy R1 every {cfg.train.r1_interval})")
    print("| device | resolution | batch | images/s | s/step | channel_base/max |")
    print("|---|---|---|---|---|---|")
    for device, res, batch, ips, sps, base, cmax in rows:
        print(f"| {device} | {res} | {batch} | {ips:.1f} | {sps:.3f} | {base}/{cmax} |")


if __name__ == "__main__":
    main()
