"""Cost of the class guide's DP-SGD training: our per-sample gradients (torch.func vmap) against
Opacus' hooks (GradSampleModule), and against the same steps without DP, in one run.

    python bench/guide_speed.py [--resolution 32] [--batch 256] [--steps 20] [--width 16]

Each row trains the guide's network (``privacy.class_guide.build_guide``) for ``--steps`` steps on
phantoms, Poisson batches of expected size ``--batch``. "DP, vmap" is ``train_class_guide`` as the
sites run it; "DP, Opacus hooks" computes the per-sample gradients with Opacus' GradSampleModule
instead (the same clip, noise and Adam through DPOptimizer); "no DP" is plain Adam on batches of
the same size. The rows alternate, three rounds each, and the table shows the median ms/step and
the ratio to "no DP". One torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.phantoms import generate_phantoms  # noqa: E402
from medstylegan2.privacy.class_guide import GuideNoise, build_guide, train_class_guide  # noqa: E402


def opacus_hooks(images: np.ndarray, labels: np.ndarray, *, steps: int, batch: int, width: int, resolution: int
                 ) -> None:
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    model = GradSampleModule(build_guide(3, resolution, width))
    optimizer = DPOptimizer(torch.optim.Adam(model.parameters(), lr=2e-3), noise_multiplier=0.8, max_grad_norm=1.0,
                            expected_batch_size=batch, loss_reduction="mean")
    x_all, y_all = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    sampler = UniformWithReplacementSampler(num_samples=len(labels), sample_rate=batch / len(labels), steps=steps)
    for idx in sampler:
        idx = torch.as_tensor(idx, dtype=torch.long)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_all[idx].float() / 127.5 - 1), y_all[idx]).backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = generate_phantoms(max(args.batch * 4 // 3, 64), args.resolution, seed=0)
    images, labels = np.asarray(data.images), np.asarray(data.labels)
    n = len(labels)
    common = dict(num_classes=3, resolution=args.resolution, width=args.width, steps=args.steps, lr=2e-3,
                  max_grad_norm=1.0)
    rows = {
        "DP, vmap (the sites')": lambda: train_class_guide(
            images, labels, batch_size=args.batch, noise=GuideNoise(0.8, args.batch / n, float(args.batch)), **common),
        "DP, Opacus hooks": lambda: opacus_hooks(images, labels, steps=args.steps, batch=args.batch,
                                                 width=args.width, resolution=args.resolution),
        "no DP": lambda: train_class_guide(images, labels, batch_size=args.batch, **common),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(3):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000 / args.steps)
    base = statistics.median(times["no DP"])
    print(f"guide training, {args.resolution} px, width {args.width}, batch {args.batch} over {n} phantoms, "
          f"{args.steps} steps, {torch.get_num_threads()} thread(s)")
    print("| variant | ms/step (median of 3) | x no DP |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
