"""Our G+D training step against NVlabs' stylegan2-ada-pytorch, timed side by side in one process.

    python bench/vs_reference.py --reference DIR [--resolutions 64 256] [--batch 16] [--reps 5]
                                 [--steps 16] [--config configs/x.yaml] [--devices cpu cuda] [--threads 1]

The reference is not part of this repository: ``--reference`` is the path of a checkout of
https://github.com/NVlabs/stylegan2-ada-pytorch (``git clone`` it anywhere), imported at run time.
Its CUDA plugins (bias_act, upfirdn2d) do not build under current torch, so both are forced onto
their pure-PyTorch reference paths (``impl='ref'``) on every device, and ``conv2d_gradfix`` is
off: the comparison is pure PyTorch against pure PyTorch.

One "step" is one training iteration as each code base defines it:

- ours: ``SiteTrainer.train_step`` (G main with style mixing, lazy path-length reg in the same G
  update, D on fakes + reals with lazy R1 in the same D update, EMA);
- reference: its training loop's phases (``Gmain``, ``Greg`` every G reg interval, ``Dmain``,
  ``Dreg`` every D reg interval; each its own Adam step, lr/betas scaled for lazy regularization
  as it does) through its own ``training.loss.StyleGAN2Loss``, then its G_ema update.

Both get the same resolution, widths (channel_base/max), latent sizes, mapping depth, class
conditioning (3 classes; the reference gets one-hot ``c``), grayscale images, minibatch-stddev,
fp32 in the reference (no fp16 blocks, no conv clamp; ours runs its defaults, bf16 autocast on
GPUs: pass ``--set train.precision=fp32`` for fp32 on both), R1 gamma and interval, path-length weight,
interval, batch shrink and decay, style-mixing probability, EMA half-life. Both configurations are
printed so that the match can be checked. Timing: ``--reps`` repetitions of ``--steps`` steps
(a multiple of both reg intervals, so lazy regs weigh as in training), ours and the reference
alternating step by step, so that load from other processes hits both alike; the table gives
median img/s of each and the median of the per-repetition ratios (ours / reference: > 1 means
ours is faster).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.trainer import SiteTrainer  # noqa: E402
from train_speed import machine  # noqa: E402  (bench/ is the script's folder: CPU model, threads, load)

GET_REFERENCE = ("get a checkout of the reference implementation with\n"
                 "    git clone https://github.com/NVlabs/stylegan2-ada-pytorch\n"
                 "and pass its folder: python bench/vs_reference.py --reference stylegan2-ada-pytorch")


# ----------------------------------------------------------------------------------------------
# The reference, imported from the user's checkout and held to its pure-PyTorch ops


class ReferenceMissing(RuntimeError):
    pass


def import_reference(path: str | Path):
    """The reference's modules (networks, loss, ops), with every custom CUDA op switched off."""
    root = Path(path).expanduser().resolve()
    if not (root / "training" / "networks.py").is_file() or not (root / "torch_utils" / "ops").is_dir():
        raise ReferenceMissing(f"{root} is not a checkout of stylegan2-ada-pytorch "
                               f"(no training/networks.py or torch_utils/ops there)")
    sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        # torch.utils.cpp_extension warns about a missing CUDA toolkit at import: nothing is built here.
        warnings.simplefilter("ignore")
        ops = {name: importlib.import_module(f"torch_utils.ops.{name}")
               for name in ("bias_act", "upfirdn2d", "conv2d_gradfix")}
        networks = importlib.import_module("training.networks")
        loss = importlib.import_module("training.loss")
    # Their plugin loaders: marked as tried-and-failed, so every call takes the 'ref' path (plain
    # torch ops) instead of compiling a CUDA extension, which fails under current torch.
    for name in ("bias_act", "upfirdn2d"):
        ops[name]._inited = True
        ops[name]._plugin = None
    # Their custom conv op only exists for old torch versions; off means F.conv2d.
    ops["conv2d_gradfix"].enabled = False
    return networks, loss


def reference_kwargs(cfg) -> dict:
    """The reference's constructor and training arguments that match our ``RunConfig``."""
    m, t = cfg.model, cfg.train
    common = dict(c_dim=m.num_classes, img_resolution=m.resolution, img_channels=m.channels)
    G = dict(z_dim=m.z_dim, w_dim=m.w_dim, **common,
             mapping_kwargs=dict(num_layers=m.mapping_layers, w_avg_beta=0.998),
             synthesis_kwargs=dict(channel_base=m.channel_base, channel_max=m.channel_max, num_fp16_res=0,
                                   conv_clamp=None, architecture="skip"))
    # Our D's class embedding: one linear layer + 2 lrelu layers to cmap_dim = their D mapping with 2 layers.
    D = dict(**common, architecture="resnet", channel_base=m.channel_base, channel_max=m.channel_max,
             num_fp16_res=0, conv_clamp=None, cmap_dim=m.cmap_dim, mapping_kwargs=dict(num_layers=2),
             epilogue_kwargs=dict(mbstd_group_size=m.mbstd_group_size or None,
                                  mbstd_num_channels=m.mbstd_channels if m.mbstd_group_size > 0 else 0))
    loss = dict(r1_gamma=t.r1_gamma, style_mixing_prob=t.style_mixing_prob, pl_weight=t.pl_weight,
                pl_batch_shrink=t.pl_batch_shrink, pl_decay=t.pl_decay)
    train = dict(batch_size=t.batch_size, G_reg_interval=t.pl_interval, D_reg_interval=t.r1_interval,
                 lr_G=t.g_lr, lr_D=t.d_lr, betas=(t.beta1, t.beta2), ema_kimg=t.ema_kimg, ema_rampup=t.ema_rampup)
    return {"G": G, "D": D, "loss": loss, "train": train}


class ReferenceStep:
    """One iteration of the reference's training loop (its phases, its loss, its EMA)."""

    def __init__(self, modules, cfg, device: torch.device, images: torch.Tensor, labels: torch.Tensor):
        networks, loss_module = modules
        self.kwargs = kw = reference_kwargs(cfg)
        self.device, self.images, self.labels = device, images, labels
        self.num_classes = cfg.model.num_classes
        tr = kw["train"]
        self.batch, self.ema_kimg, self.ema_rampup = tr["batch_size"], tr["ema_kimg"], tr["ema_rampup"]
        self.G = networks.Generator(**kw["G"]).train().requires_grad_(False).to(device)
        self.D = networks.Discriminator(**kw["D"]).train().requires_grad_(False).to(device)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.loss = loss_module.StyleGAN2Loss(device=device, G_mapping=self.G.mapping, G_synthesis=self.G.synthesis,
                                              D=self.D, **kw["loss"])
        self.phases = []
        for name, module, lr, interval in (("G", self.G, tr["lr_G"], tr["G_reg_interval"]),
                                           ("D", self.D, tr["lr_D"], tr["D_reg_interval"])):
            ratio = interval / (interval + 1)
            opt = torch.optim.Adam(module.parameters(), lr=lr * ratio, betas=[b ** ratio for b in tr["betas"]],
                                   eps=1e-8)
            self.phases += [(name + "main", module, opt, 1), (name + "reg", module, opt, interval)]
        self.batch_idx = 0
        self.cur_nimg = 0

    def _labels(self, n: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.labels), (n,), device=self.device)
        return torch.nn.functional.one_hot(self.labels[idx], self.num_classes).to(torch.float32)

    def step(self) -> None:
        idx = torch.randint(0, len(self.images), (self.batch,), device=self.device)
        real_img = self.images[idx].to(torch.float32) / 127.5 - 1
        real_c = torch.nn.functional.one_hot(self.labels[idx], self.num_classes).to(torch.float32)
        for name, module, opt, interval in self.phases:
            if self.batch_idx % interval != 0:
                continue
            gen_z = torch.randn(self.batch, self.G.z_dim, device=self.device)
            opt.zero_grad(set_to_none=True)
            module.requires_grad_(True)
            self.loss.accumulate_gradients(phase=name, real_img=real_img, real_c=real_c, gen_z=gen_z,
                                           gen_c=self._labels(self.batch), sync=True, gain=interval)
            module.requires_grad_(False)
            for p in module.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
        self.cur_nimg += self.batch
        with torch.no_grad():
            ema_nimg = self.ema_kimg * 1000
            if self.ema_rampup is not None:
                ema_nimg = min(ema_nimg, self.cur_nimg * self.ema_rampup)
            beta = 0.5 ** (self.batch / max(ema_nimg, 1e-8))
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
                p_ema.copy_(p.lerp(p_ema, beta))
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
                b_ema.copy_(b)
        self.batch_idx += 1


class OurStep:
    def __init__(self, cfg, device: torch.device, images: np.ndarray, labels: np.ndarray):
        self.trainer = SiteTrainer(cfg, images, labels, device=device)

    def step(self) -> None:
        self.trainer.train_step()


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compare(modules, cfg, device: torch.device, *, reps: int, steps: int, warmup: int,
            site_images: int = 256) -> dict:
    """img/s of both per repetition (interleaved) and the parameter counts of their G and D."""
    res = cfg.model.resolution
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (site_images, 1, res, res), dtype=np.uint8)
    labels = rng.integers(0, cfg.model.num_classes, site_images)
    torch.manual_seed(0)
    ours = OurStep(cfg, device, images, labels)
    torch.manual_seed(0)
    theirs = ReferenceStep(modules, cfg, device, torch.as_tensor(images, device=device),
                           torch.as_tensor(labels, device=device))
    runners = {"ours": ours.step, "reference": theirs.step}
    for run in runners.values():
        for _ in range(warmup):
            run()
    _sync(device)
    ips: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(reps):
        seconds = {name: 0.0 for name in runners}
        for i in range(steps):
            # Step by step, alternating who goes first: a slow stretch of a shared machine hits both
            # sides alike, and step i of both has the same lazy regularization.
            order = list(runners) if (rep * steps + i) % 2 == 0 else list(reversed(runners))
            for name in order:
                _sync(device)
                start = time.perf_counter()
                runners[name]()
                _sync(device)
                seconds[name] += time.perf_counter() - start
        for name in runners:
            ips[name].append(steps * cfg.train.batch_size / seconds[name])
    ratios = [a / b for a, b in zip(ips["ours"], ips["reference"])]
    return {"ips": ips, "ratios": ratios, "accel": ours.trainer.accel.describe(),
            "params": {"ours": (_param_count(ours.trainer.G), _param_count(ours.trainer.D)),
                       "reference": (_param_count(theirs.G), _param_count(theirs.D))},
            "kwargs": theirs.kwargs}


def describe_ours(cfg) -> str:
    m, t = cfg.model, cfg.train
    return (f"ours: resolution={m.resolution} channels={m.channels} classes={m.num_classes} z_dim={m.z_dim} "
            f"w_dim={m.w_dim} mapping_layers={m.mapping_layers} channel_base={m.channel_base} "
            f"channel_max={m.channel_max} cmap_dim={m.cmap_dim} (class embedding: 2 layers) "
            f"mbstd_group_size={m.mbstd_group_size} mbstd_channels={m.mbstd_channels} fp32; "
            f"batch={t.batch_size} r1_gamma={t.r1_gamma} r1_interval={t.r1_interval} pl_weight={t.pl_weight} "
            f"pl_interval={t.pl_interval} pl_batch_shrink={t.pl_batch_shrink} pl_decay={t.pl_decay} "
            f"style_mixing_prob={t.style_mixing_prob} g_lr={t.g_lr} d_lr={t.d_lr} betas=({t.beta1}, {t.beta2}) "
            f"ema_kimg={t.ema_kimg} ema_rampup={t.ema_rampup} d_class_head={m.d_class_head} "
            f"d_steps_per_g={t.d_steps_per_g}")


def unmatched_by_reference(cfg) -> list[str]:
    """Our settings the reference has no counterpart for (the comparison is then not like for like)."""
    notes = []
    if cfg.model.d_class_head:
        notes.append("model.d_class_head=true (the reference's D has no auxiliary-classifier head)")
    if cfg.train.d_steps_per_g != 1:
        notes.append(f"train.d_steps_per_g={cfg.train.d_steps_per_g} (the reference does one D update per G update)")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="folder of a stylegan2-ada-pytorch checkout")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (interleaved)")
    p.add_argument("--steps", type=int, default=16, help="steps per repetition (a multiple of both reg intervals)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--config", default=None, help="YAML config for widths and training settings (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    try:
        modules = import_reference(args.reference)
    except ReferenceMissing as exc:
        print(f"error: {exc}\n{GET_REFERENCE}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for name in devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"error: --devices {name}: CUDA is not available here", file=sys.stderr)
            return 2

    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)", flush=True)
    rows = []
    for name in devices:
        device = torch.device(name)
        for res in args.resolutions:
            cfg = load_config(args.config, args.overrides + [f"model.resolution={res}",
                                                             f"train.batch_size={args.batch}", f"device={name}"])
            lcm = cfg.train.r1_interval * cfg.train.pl_interval // math.gcd(cfg.train.r1_interval,
                                                                           cfg.train.pl_interval)
            if args.steps % lcm:
                print(f"  note: --steps {args.steps} is not a multiple of {lcm}: lazy regs are not weighted as "
                      "in training", flush=True)
            for note in unmatched_by_reference(cfg):
                print(f"  note: {note}: ours does more work per step than the reference", flush=True)
            r = compare(modules, cfg, device, reps=args.reps, steps=args.steps, warmup=args.warmup)
            kw = r["kwargs"]
            print(f"\n[{name}, {res} px] {describe_ours(cfg)}; speed settings {r['accel']}")
            print(f"reference: Generator({kw['G']}); Discriminator({kw['D']}); StyleGAN2Loss({kw['loss']}); "
                  f"loop {kw['train']}")
            (og, od), (rg, rd) = r["params"]["ours"], r["params"]["reference"]
            print(f"parameters: ours G {og:,} D {od:,}; reference G {rg:,} D {rd:,}")
            med = {k: statistics.median(v) for k, v in r["ips"].items()}
            print(f"img/s per repetition: ours {[round(v, 1) for v in r['ips']['ours']]}, "
                  f"reference {[round(v, 1) for v in r['ips']['reference']]}", flush=True)
            rows.append((name, res, args.batch, med["ours"], med["reference"], statistics.median(r["ratios"]),
                         min(r["ratios"]), max(r["ratios"])))

    print(f"\nG+D training step, ours vs stylegan2-ada-pytorch (pure-PyTorch ops), {machine()}, "
          f"{torch.get_num_threads()} thread(s); {args.reps} x {args.steps} steps each, interleaved")
    print("| device | resolution | batch | ours img/s | reference img/s | ours / reference (median) | range |")
    print("|---|---|---|---|---|---|---|")
    for name, res, batch, ours, ref, ratio, lo, hi in rows:
        device_name = torch.cuda.get_device_name(0) if name.startswith("cuda") else "cpu"
        print(f"| {device_name} | {res} | {batch} | {ours:.1f} | {ref:.1f} | {ratio:.2f}x | {lo:.2f}-{hi:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
