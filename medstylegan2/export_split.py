"""``medstylegan2 export-split``: the training and held-out images of a run, as PNG class folders.

A simulation splits its data in memory (``data.load_dataset``: held-out fraction, seed, patient
groups), so a phantom or COVID-QU-Ex run leaves no folder of what it trained on. The commands that
compare against the training set (``evaluate --train``, ``audit-privacy --members``, ``release
--drop-memorized --train``) need one. This writes both sides of the same split the run used, from
the run's own ``config.yaml`` (or any config): ``OUT/train/<class>/*.png`` and
``OUT/heldout/<class>/*.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from medstylegan2.errors import UserError

if TYPE_CHECKING:
    from medstylegan2.images import ImageSet

COMMAND_HELP = ("Write the training and held-out images a config's run uses (e.g. RUN_DIR/config.yaml) as "
                "OUT/train/<class>/*.png and OUT/heldout/<class>/*.png, for evaluate --train, audit-privacy "
                "and release --drop-memorized.")

SPLITS = ("train", "heldout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="the run's config: RUN_DIR/config.yaml, or a config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.heldout_fraction=0.2 (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output folder; OUT/train and OUT/heldout must not exist "
                                                           "or be empty")


def export_split(cfg, out: str | Path) -> dict[str, "ImageSet"]:
    """Write ``cfg``'s training and held-out images under ``out``; the two ``ImageSet``s by split."""
    from medstylegan2.data import load_dataset
    from medstylegan2.images import write_image_folder

    out = Path(out)
    for split in SPLITS:
        folder = out / split
        if folder.exists() and any(folder.iterdir()):
            # Adding to an old split would mix two sets of members: refuse rather than merge.
            raise UserError(f"{folder} is not empty; choose another --out or remove it")
    train, heldout = load_dataset(cfg.data, cfg.model.resolution)
    written = dict(zip(SPLITS, (train, heldout)))
    for split, images in written.items():
        write_image_folder(images, out / split)
    return written


def run(args: argparse.Namespace) -> int:
    from medstylegan2.config import load_config
    from medstylegan2.data import class_summary

    cfg = load_config(args.config, list(args.overrides))
    for split, images in export_split(cfg, args.out).items():
        print(f"{split:8s} {len(images):6d} images ({class_summary(images)}) -> {args.out / split}")
    print(f"{cfg.model.resolution} px, data seed {cfg.data.seed}, held-out fraction {cfg.data.heldout_fraction:g}")
    return 0
