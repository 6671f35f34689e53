"""Per-sample gradients of D's real loss without R1: one batched pass (privacy.layer_grads) vs vmap.

    python bench/per_sample_speed.py [--config configs/dp.yaml] [--resolution 64] [--batch 32] [--reps 7]

Times ``per_sample_real_gradients`` alone (no clipping, noise or optimizer step) with
``layer_gradients`` on and off, alternating, on the CPU, for D in contiguous and channels_last
layout (training uses channels_last), and checks that both give the same gradients. The class
head's term is included when the config has the head (``configs/dp.yaml`` does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.losses import class_weight_of  # noqa: E402
from medstylegan2.networks import build_networks  # noqa: E402
from medstylegan2.privacy.per_sample import per_sample_real_gradients  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dp.yaml")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.resolution={args.resolution}", "model.mbstd_group_size=0"])
    class_weight = class_weight_of(build_networks(cfg.model)[1], cfg.train)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, args.resolution, args.resolution)
    labels = torch.randint(0, cfg.model.num_classes, (args.batch,))
    rows = []
    for layout in ("contiguous", "channels_last"):
        _, D = build_networks(cfg.model)
        x = images
        if layout == "channels_last":
            D, x = D.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
        out = {flag: per_sample_real_gradients(D, x, labels, 0.0, class_weight, layer_gradients=flag)[0]
               for flag in (True, False)}  # warm-up, and the check
        diff = max(((out[True][k] - out[False][k]).abs().max() / out[False][k].abs().max().clamp_min(1e-30)).item()
                   for k in out[False])
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.reps):
            for flag in ((True, False) if rep % 2 == 0 else (False, True)):
                start = time.perf_counter()
                per_sample_real_gradients(D, x, labels, 0.0, class_weight, layer_gradients=flag)
                times[flag].append(1000 * (time.perf_counter() - start))
        rows.append((layout, statistics.median(times[True]), statistics.median(times[False]), diff))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nper-sample gradients without R1, {args.resolution} px, batch {args.batch}, class weight {class_weight:g}, "
          f"{args.threads} thread(s), {os.cpu_count()} CPU(s), load average {load:.1f}; medians of {args.reps}")
    print("| D layout | layer gradients ms | vmap ms | vmap / layer gradients | max relative difference |")
    print("|---|---|---|---|---|")
    for layout, fast, slow, diff in rows:
        print(f"| {layout} | {fast:.0f} | {slow:.0f} | {slow / fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
