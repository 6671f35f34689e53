"""Cost of differential privacy on one discriminator step: DP-SGD over the same step without DP.

    python bench/dp_overhead.py [--resolution 64] [--batch 32] [--steps 32] [--config configs/dp.yaml]

A "D step" is what training does for D every iteration: logistic loss on a batch of fakes and a
batch of reals, with the lazy R1 penalty on every ``r1_interval``-th step (16), then Adam. The DP
step draws a Poisson batch (expected size = batch), takes exact per-sample gradients of the real
terms (torch.func), clips, noises and accounts with Opacus. Fakes are made once, outside the
timing: G's cost is the same with or without DP. Prints a table of ms/step and the ratio per
device (CUDA rows when a GPU is present); use a multiple of 16 steps so R1 is weighted as in training.
On a GPU the DP step pads every Poisson batch to one fixed size and runs a compiled per-sample
function (``privacy.per_sample``); the table names the padded size. On the CPU, steps without R1
take their per-sample gradients from one batched pass (``privacy.layer_grads``); the column
"DP, vmap only" is the same DP step with that off (every step through ``vmap``), timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.privacy.engine import make_privacy_engine  # noqa: E402
from medstylegan2.trainer import SiteTrainer  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_trainer(cfg, device: str, private: bool, n: int, layer_gradients: bool = True) -> SiteTrainer:
    rng = np.random.default_rng(0)
    res = cfg.model.resolution
    images = rng.integers(0, 256, (n, 1, res, res), dtype=np.uint8)
    labels = rng.integers(0, cfg.model.num_classes, n)
    if not private:
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    engine = make_privacy_engine(cfg, n, planned_steps=1000, seed=0) if private else None
    trainer = SiteTrainer(cfg, images, labels, device=device, privacy=engine)
    if engine is not None:
        engine.layer_gradients = layer_gradients
    trainer.D.requires_grad_(True)
    trainer.G.requires_grad_(False)
    return trainer


def d_step(trainer: SiteTrainer, fake: torch.Tensor, fake_labels: torch.Tensor, step: int) -> None:
    """Exactly the D half of ``SiteTrainer.train_step``, private or not."""
    t = trainer.cfg.train
    r1_weight = trainer.loss.r1_weight(lazy=step % t.r1_interval == 0)
    trainer.discriminator_step(fake, fake_labels, r1_weight)


def measure(cfg, device: str, steps: int, warmup: int, n: int) -> dict[str, dict[str, float]]:
    """ms per D step without and with DP, the two interleaved step by step so that load from
    other processes hits both alike. Per variant: the mean over all steps, the medians of plain
    and R1 steps, and their R1-weighted mix ((interval - 1) * plain + r1) / interval, which is
    robust to the odd slow step on a shared machine."""
    trainers = {"base": make_trainer(cfg, device, False, n), "dp": make_trainer(cfg, device, True, n),
                "dp_vmap": make_trainer(cfg, device, True, n, layer_gradients=False)}
    batch = cfg.train.batch_size
    with torch.no_grad():
        z = torch.randn(batch, cfg.model.z_dim, device=device)
        fake_labels = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
        fake = trainers["base"].loss.generate(z, fake_labels, update_w_avg=False)
    times: dict[str, dict[str, list[float]]] = {k: {"plain": [], "r1": []} for k in trainers}
    interval = cfg.train.r1_interval
    for i in range(-warmup, steps):
        for name, trainer in trainers.items():
            _sync(device)
            start = time.perf_counter()
            d_step(trainer, fake, fake_labels, step=i)  # warmup covers an R1 step (i = 0 mod interval)
            _sync(device)
            if i >= 0:
                times[name]["r1" if i % interval == 0 else "plain"].append(1000 * (time.perf_counter() - start))
    result = {"pad_to": trainers["dp"].privacy.pad_to}
    for name, t in times.items():
        plain, r1 = float(np.median(t["plain"])), float(np.median(t["r1"])) if t["r1"] else float("nan")
        result[name] = {"mean": float(np.mean(t["plain"] + t["r1"])), "plain": plain, "r1": r1,
                        "weighted": ((interval - 1) * plain + r1) / interval}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=32, help="timed steps per variant (a multiple of r1_interval)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--site-images", type=int, default=640, help="images at the site (sample rate = batch / this)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--config", default=None, help="YAML config for model widths (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vmap-safe-onehot", action="store_true",
                   help="experiment: replace F.one_hot by a comparison (same values) so that vmap can batch D over "
                        "labels and per-sample gradients take one vmap call instead of one per class")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vmap_safe_onehot:
        import torch.nn.functional as F

        F.one_hot = lambda labels, num_classes=-1: (labels.unsqueeze(-1) == torch.arange(
            num_classes, device=labels.device)).long()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    cfg = load_config(args.config, args.overrides + [
        f"model.resolution={args.resolution}", f"train.batch_size={args.batch}", "model.mbstd_group_size=0",
        "privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null",
        "privacy.noise_seed=0"])
    rows = []
    for device in devices:
        r = measure(cfg, device, args.steps, args.warmup, args.site_images)
        name = (torch.cuda.get_device_name(0) if device.startswith("cuda")
                else f"CPU, {torch.get_num_threads()} threads")
        print(f"  {name}: no DP {r['base']['weighted']:.1f} ms/step, DP {r['dp']['weighted']:.1f} ms/step, "
              f"DP vmap only {r['dp_vmap']['weighted']:.1f} ms/step; plain steps (medians) "
              f"{r['base']['plain']:.1f} / {r['dp']['plain']:.1f} / {r['dp_vmap']['plain']:.1f}", flush=True)
        rows.append((name, r))
    d_params = sum(p.numel() for p in make_trainer(cfg, "cpu", False, 8).D.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nD step, {args.resolution} px, batch {args.batch} (DP: Poisson, expected {args.batch}), "
          f"R1 every {cfg.train.r1_interval} steps, D {d_params / 1e6:.2f}M params, {args.steps} timed steps each; "
          f"{os.cpu_count()} CPU(s), load average {load:.1f} at the end")
    print("ms/step: R1-weighted medians ((interval-1)*plain + R1)/interval; mean of all steps in brackets")
    print("| device | no DP | DP | DP / no DP | plain step no DP / DP | R1 step no DP / DP | DP, vmap only | "
          "DP vmap only / no DP | DP batch padded to |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        b, d, v = r["base"], r["dp"], r["dp_vmap"]
        print(f"| {name} | {b['weighted']:.1f} ({b['mean']:.1f}) | {d['weighted']:.1f} ({d['mean']:.1f}) | "
              f"{d['weighted'] / b['weighted']:.2f}x ({d['mean'] / b['mean']:.2f}x) | "
              f"{b['plain']:.1f} / {d['plain']:.1f} | {b['r1']:.1f} / {d['r1']:.1f} | "
              f"{v['weighted']:.1f} ({v['mean']:.1f}) | "
              f"{v['weighted'] / b['weighted']:.2f}x ({v['mean'] / b['mean']:.2f}x) | "
              f"{r['pad_to'] or 'no padding'} |")


if __name__ == "__main__":
    main()
