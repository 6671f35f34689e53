"""Sampling from a trained generator (G_ema of a checkpoint), class grids, and the ``sample`` command."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from medstylegan2.config import CLASS_NAMES, RunConfig
from medstylegan2.images import ImageSet, write_image_folder
from medstylegan2.network_weights import load_state_dict_checked
from medstylegan2.networks import build_networks
from medstylegan2.errors import CheckpointError
from medstylegan2.runfolder import config_from_checkpoint, read_checkpoint
from medstylegan2.tiling import save_image, tile_rows
from medstylegan2.trainer import float_to_images

log = logging.getLogger(__name__)

COMMAND_HELP = "Sample N synthetic images per class from a checkpoint's EMA generator into DIR/<class>/*.png."


def load_generator(checkpoint_path: str | Path, device: torch.device | str = "cpu",
                   which: str = "G_ema") -> tuple[torch.nn.Module, RunConfig]:
    """The EMA generator (or ``which``) of a checkpoint, in eval mode, and the run's config."""
    state = read_checkpoint(checkpoint_path)
    cfg = config_from_checkpoint(state, checkpoint_path)
    G, _ = build_networks(cfg.model)
    weights = state.get(which)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{checkpoint_path} holds no {which} weights (damaged, or not a generator "
                              "checkpoint)")
    load_state_dict_checked(G, weights, what=f"{checkpoint_path}:{which}")
    return G.to(device).eval().requires_grad_(False), cfg


@torch.no_grad()
def generate_images(G: torch.nn.Module, labels: np.ndarray, *, seed: int = 0, truncation_psi: float = 1.0,
                    batch_size: int = 64, device: torch.device | str = "cpu",
                    noise_mode: str = "const") -> np.ndarray:
    """uint8 [N,1,H,W] images for the given class labels; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.asarray(labels, dtype=np.int64)
    z_all = torch.randn(len(labels), G.z_dim, generator=generator)
    was_training = G.training
    G.eval()
    out = []
    for start in range(0, len(labels), batch_size):
        z = z_all[start:start + batch_size].to(device)
        c = torch.as_tensor(labels[start:start + batch_size], device=device)
        out.append(float_to_images(G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)))
    G.train(was_training)
    if not out:
        return np.zeros((0, G.img_channels, G.img_resolution, G.img_resolution), np.uint8)
    return np.concatenate(out)


def generate_per_class(G: torch.nn.Module, n_per_class: int, *, seed: int = 0, truncation_psi: float = 1.0,
                       batch_size: int = 64, device: torch.device | str = "cpu"):
    """An ImageSet with ``n_per_class`` generated images of every class, grouped by class."""
    labels = np.repeat(np.arange(G.num_classes, dtype=np.int64), n_per_class)
    images = generate_images(G, labels, seed=seed, truncation_psi=truncation_psi, batch_size=batch_size,
                             device=device)
    return ImageSet(images=images, labels=labels)


def save_class_grid(G: torch.nn.Module, path: str | Path, *, per_class: int = 8, seed: int = 0,
                    truncation_psi: float = 1.0, device: torch.device | str = "cpu",
                    real_rows: list[np.ndarray] | None = None) -> Path:
    """Generate ``per_class`` images of every class (fixed seed) and save one row per class.

    ``real_rows`` (uint8 [n,1,H,W] per class) are interleaved under each generated row for comparison.
    """
    fake = generate_per_class(G, per_class, seed=seed, truncation_psi=truncation_psi, device=device)
    rows = []
    for k in range(G.num_classes):
        rows.append(fake.images[fake.labels == k])
        if real_rows is not None:
            rows.append(real_rows[k][:per_class])
    return save_image(tile_rows(rows), path)


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (.pt) from train-local or a federated round")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--out", required=True, help="output folder; images go to OUT/<class>/*.png")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi in (0, 1] (default 1: none)")
    p.add_argument("--batch", type=int, default=64, help="generation batch size")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--grid", action="store_true", help="also write OUT/grid.png (8 per class, one row per class)")


def run(args: argparse.Namespace) -> int:
    from medstylegan2.errors import UserError
    from medstylegan2.trainer import resolve_device

    if args.per_class <= 0:
        raise UserError("--per-class must be > 0")
    if not 0 < args.truncation <= 1:
        raise UserError("--truncation must be in (0, 1]")
    device = resolve_device(args.device)
    G, cfg = load_generator(args.checkpoint, device)
    images = generate_per_class(G, args.per_class, seed=args.seed, truncation_psi=args.truncation,
                                batch_size=args.batch, device=device)
    out = write_image_folder(images, args.out)
    for k, name in enumerate(CLASS_NAMES):
        print(f"{name:>10}: {int((images.labels == k).sum())} images -> {Path(out) / name}")
    if args.grid:
        rows = [images.images[images.labels == k][:8] for k in range(G.num_classes)]
        print(f"grid: {save_image(tile_rows(rows), Path(args.out) / 'grid.png')}")
    return 0
