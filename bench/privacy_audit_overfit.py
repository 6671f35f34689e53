"""Membership-inference AUC of one small site trained with and without DP, side by side.

    python bench/privacy_audit_overfit.py [--steps 2000] [--every 500] [--epsilon 10] [--threads 1]

One site holds a few phantoms (``--per-class`` x (1 - ``--heldout``) per class, 36 by default) and
trains long enough to overfit; the rest of the phantom set is held out (the non-members). Both
runs start from the same weights and data; the private one uses DP-SGD with sigma set so that
epsilon reaches ``--epsilon`` (delta 1e-5) after ``--steps`` steps. Every ``--every`` steps the
white-box (D logit) and black-box (nearest generated image, pixel RMS) attacks of
``medstylegan2.privacy.audit`` are run on both; prints one table row per checkpoint and run.
Takes hours on a shared 2-core CPU at the defaults; ``--steps 20 --every 10 --resolution 16``
checks that it runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from medstylegan2.config import DataConfig, load_config
from medstylegan2.data import load_dataset
from medstylegan2.privacy.engine import make_privacy_engine
from medstylegan2.privacy.audit import audit
from medstylegan2.trainer import SiteTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--heldout", type=float, default=0.8)
    p.add_argument("--samples-per-class", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    members, non_members = load_dataset(DataConfig(source="phantoms", phantoms_per_class=args.per_class,
                                                   heldout_fraction=args.heldout, cache_dir=None), args.resolution)
    common = [f"model.resolution={args.resolution}", "model.mbstd_group_size=0", "train.batch_size=16"]
    runs = {}
    for name, private in (("no DP", False), (f"DP eps {args.epsilon:g}", True)):
        extra = ["privacy.enabled=true", f"privacy.target_epsilon={args.epsilon}", "privacy.delta=1.0e-5",
                 "privacy.max_grad_norm=0.25"] if private else []
        cfg = load_config(None, common + extra)
        engine = make_privacy_engine(cfg, len(members), args.steps) if private else None
        runs[name] = SiteTrainer(cfg, members.images, members.labels, device="cpu", privacy=engine)

    print(f"{len(members)} members, {len(non_members)} non-members, {args.resolution} px, "
          f"{args.samples_per_class} generated images per class")
    print("| run | step | epsilon | white-box AUC | black-box pixel AUC | TPR@1% FPR (white) | s/step |")
    print("|---|---|---|---|---|---|---|")
    for step in range(args.every, args.steps + 1, args.every):
        for name, trainer in runs.items():
            start = time.perf_counter()
            trainer.train_steps(args.every)
            per_step = (time.perf_counter() - start) / args.every
            eps = trainer.privacy.epsilon() if trainer.privacy is not None else None
            report, _ = audit(trainer.D, trainer.G_ema, members, non_members,
                              samples_per_class=args.samples_per_class, epsilon=eps,
                              delta=trainer.privacy.delta if trainer.privacy is not None else None)
            white, black = report["attacks"]["white_box_discriminator"], report["attacks"]["black_box_generator_pixel"]
            tpr = white["tpr_at_fpr"]["0.01"]
            print(f"| {name} | {step} | {'-' if eps is None else f'{eps:.3g}'} | "
                  f"{white['auc']:.3f} +- {white['auc_stderr']:.3f} | {black['auc']:.3f} +- {black['auc_stderr']:.3f} | "
                  f"{'-' if tpr is None else f'{tpr:.3f}'} | {per_step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
