"""Peak memory and time of a DP R1 step's per-sample gradients: vmap over the whole batch vs in chunks.

    python bench/dp_memory.py [--config configs/dp.yaml] [--resolution 32] [--batch 256] [--chunks none,64,32]

Every R1 step (one D step in ``train.r1_interval``) takes exact per-sample gradients with a double
backward under ``vmap``; its intermediates set a DP site's peak memory. Each setting runs in a
fresh process (peak resident memory is per process), twice, alternating with the others, and the
table shows the peak above the process's baseline and the seconds of the call. The gradients are
checked to be the same in every setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.losses import class_weight_of  # noqa: E402
from medstylegan2.networks import build_networks  # noqa: E402
from medstylegan2.privacy.per_sample import per_sample_real_gradients  # noqa: E402


def measure(config: str, resolution: int, batch: int, chunk: int | None) -> dict:
    """One R1 per-sample gradient call in this process: peak RSS growth (GB), seconds, a checksum."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(config, [f"model.resolution={resolution}", "model.mbstd_group_size=0"])
    _, D = build_networks(cfg.model)
    images = torch.randn(batch, 1, resolution, resolution)
    labels = torch.randint(0, D.num_classes, (batch,))
    class_weight = class_weight_of(D, cfg.train)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    grads, _, order = per_sample_real_gradients(D, images, labels, 0.5, class_weight, chunk_size=chunk)
    seconds = time.perf_counter() - start
    peak_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / 1e9  # ru_maxrss: KiB
    rows = torch.argsort(order)
    checksum = float(sum(g[rows].double().flatten(1).sum(1).mul(torch.arange(1, batch + 1)).sum()
                         for g in grads.values()))
    return {"peak_gb": peak_gb, "seconds": seconds, "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dp.yaml")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--chunks", default="none,64,32", help="vmap chunk sizes; none = the whole batch at once")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        chunk = None if args.child == "none" else int(args.child)
        print(json.dumps(measure(args.config, args.resolution, args.batch, chunk)))
        return
    chunks = [c.strip() for c in args.chunks.split(",") if c.strip()]
    results: dict[str, list[dict]] = {c: [] for c in chunks}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(args.reps):
        for chunk in chunks:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--resolution",
                                  str(args.resolution), "--batch", str(args.batch), "--child", chunk],
                                 check=True, capture_output=True, text=True, env=env)
            results[chunk].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"R1 per-sample gradients, {args.config}, {args.resolution} px, batch {args.batch}, 1 thread, "
          f"{args.reps} fresh processes per setting")
    print("| vmap chunk | peak memory above baseline (GB) | seconds | same gradients |")
    print("| --- | --- | --- | --- |")
    reference = results[chunks[0]][0]["checksum"]
    for chunk in chunks:
        runs = results[chunk]
        same = all(abs(r["checksum"] - reference) <= 1e-6 * max(1.0, abs(reference)) for r in runs)
        print(f"| {chunk} | {min(r['peak_gb'] for r in runs):.2f} | {min(r['seconds'] for r in runs):.1f} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
