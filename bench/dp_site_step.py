"""Where a DP site's training time goes: one D update (DP-SGD on reals, fakes made for it) against
one G update at several G batches (``train.g_batch_size``), in one run.

    python bench/dp_site_step.py [--study configs/study.yaml] [--profile quick] [--arm dp-eps10]
                                 [--g-batches 256 128 64 32] [--steps 16] [--threads 2]

The trainer is the study arm's (its model, batch, clip and G's loss terms); the class guide and the
class moments are left out (they need a site's release), and the noise multiplier is fixed instead
of found for the arm's epsilon (the cost does not depend on it). Reals are random images of the
arm's size. G's updates read no real image, so they cost no privacy: what one costs against a D
update says how many an arm can afford (``train.g_steps_per_d``). Rows alternate G batches step by
step, so load from other processes hits them alike; the table shows medians and the ratio of one G
update to one D update. The D rows include the lazy R1 step in its share (use a multiple of 16 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.privacy.engine import make_privacy_engine  # noqa: E402
from medstylegan2.study.config import arm_overrides, load_study  # noqa: E402
from medstylegan2.trainer import SiteTrainer  # noqa: E402

NOT_TIMED = ("train.class_guide_weight", "train.class_moments_weight")


def arm_trainer(study_path: str, profile: str, arm: str, site_images: int) -> SiteTrainer:
    """The arm's site trainer on random reals, DP at a fixed noise multiplier, no guide or moments."""
    study = load_study(study_path)
    overrides = [o for o in arm_overrides(study, profile, arm, seed=0) if not o.startswith(NOT_TIMED)]
    # A fixed noise multiplier instead of one found for the arm's epsilon (ignored by a non-DP arm).
    overrides += ["train.class_guide_weight=0.0", "train.class_moments_weight=0.0", "privacy.noise_multiplier=1.0",
                  "privacy.target_epsilon=null", "privacy.noise_seed=0"]
    cfg = load_config(study.base_config_path, overrides)
    rng = np.random.default_rng(0)
    res = cfg.model.resolution
    images = rng.integers(0, 256, (site_images, 1, res, res), dtype=np.uint8)
    labels = rng.integers(0, cfg.model.num_classes, site_images)
    engine = make_privacy_engine(cfg, site_images, planned_steps=1000, seed=0) if cfg.privacy.enabled else None
    return SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)


def d_update(trainer: SiteTrainer, index: int) -> None:
    """The D half of a training step: fakes at D's batch, then D's (DP) update."""
    t = trainer.cfg.train
    trainer.D.requires_grad_(True)
    trainer.G.requires_grad_(False)
    with torch.no_grad():
        z = torch.randn(t.batch_size, trainer.cfg.model.z_dim)
        labels = trainer.sample_fake_labels(t.batch_size)
        fake = trainer.loss.generate(z, labels, update_w_avg=False, fast=True)
    with trainer.mbstd_reference():
        trainer.discriminator_step(fake, labels, trainer.loss.r1_weight(lazy=index % t.r1_interval == 0))
    trainer.G.requires_grad_(True)


def g_update(trainer: SiteTrainer, batch: int, index: int) -> None:
    trainer.cfg = dataclasses.replace(trainer.cfg, train=dataclasses.replace(trainer.cfg.train, g_batch_size=batch))
    trainer.generator_step(index)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default=str(Path(__file__).resolve().parents[1] / "configs" / "study.yaml"))
    p.add_argument("--profile", default="quick")
    p.add_argument("--arm", default="dp-eps10")
    p.add_argument("--g-batches", type=int, nargs="+", default=[256, 128, 64, 32])
    p.add_argument("--steps", type=int, default=16, help="timed steps per row (a multiple of r1_interval)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--site-images", type=int, default=6400)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    trainer = arm_trainer(args.study, args.profile, args.arm, args.site_images)
    rows = {"D": []} | {f"G{b}": [] for b in args.g_batches}
    for i in range(-args.warmup, args.steps):
        start = time.perf_counter()
        d_update(trainer, i)
        times = [("D", time.perf_counter() - start)]
        for b in args.g_batches:
            start = time.perf_counter()
            g_update(trainer, b, i)
            times.append((f"G{b}", time.perf_counter() - start))
        if i >= 0:
            for name, seconds in times:
                rows[name].append(seconds)
    cfg = trainer.cfg
    d_ms = 1000 * statistics.mean(rows["D"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\narm {args.arm} ({args.profile}): {cfg.model.resolution} px, D batch {cfg.train.batch_size} "
          f"({'DP-SGD' if cfg.privacy.enabled else 'no DP'}), {args.steps} timed steps a row, CPU, "
          f"{torch.get_num_threads()} thread(s), load average {load:.1f} at the end")
    print("| update | batch | ms (D: mean, G: median) | x one D update |")
    print("|---|---|---|---|")
    print(f"| D (fakes + {'DP ' if cfg.privacy.enabled else ''}reals, R1 every {cfg.train.r1_interval}) | "
          f"{cfg.train.batch_size} | {d_ms:.0f} | 1.00 |")
    for b in args.g_batches:
        ms = 1000 * statistics.median(rows[f"G{b}"])
        print(f"| G | {b} | {ms:.0f} | {ms / d_ms:.2f} |")


if __name__ == "__main__":
    main()
