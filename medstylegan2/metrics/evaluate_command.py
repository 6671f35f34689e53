"""The ``evaluate`` command: the evaluator (``medstylegan2.metrics.evaluate``) from the command line.

A checkpoint's EMA generator is sampled (``--n-per-class`` per class), or a folder of generated
``<class>/*.png`` images is read (``--fake``); both are compared with real held-out images
(``--real``) and, for the domain classifier, the memorization audit and the utility baseline, the
real training images (``--train``). Prints a table per class and overall and writes the evaluator's
files into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medstylegan2.errors import DataError, UserError
from medstylegan2.metrics import METRIC_NAMES
from medstylegan2.metrics.evaluate import CLASSIFIER_FILE, evaluate_generator, evaluate_images, validate_metric_names

COMMAND_HELP = ("Evaluate a checkpoint (sampled) or a folder of generated <class>/*.png images against real "
                "held-out images: FD/KID/PR, LPIPS, memorization, downstream utility.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="generator checkpoint to sample from (or use --fake)")
    p.add_argument("--fake", metavar="DIR", help="folder of generated images DIR/<class>/*.png instead of a checkpoint")
    p.add_argument("--real", metavar="DIR", required=True, help="real held-out images DIR/<class>/*.png")
    p.add_argument("--train", metavar="DIR", help="real training images DIR/<class>/*.png (domain classifier, "
                                                  "memorization audit, utility baseline)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder (evaluation.json, PNGs)")
    p.add_argument("--n-per-class", type=int, help="images per class sampled from the checkpoint "
                                                   "(default: metrics.n_per_class)")
    p.add_argument("--metrics", nargs="+", metavar="NAME",
                   help=f"metrics to run (default: metrics.metrics); any of: {', '.join(METRIC_NAMES)}")
    p.add_argument("--weights-dir", metavar="DIR",
                   help="folder with feature-network weights files (default: metrics.weights_dir, then "
                        "$TORCH_HOME/hub/checkpoints)")
    p.add_argument("--classifier", metavar="FILE",
                   help="domain classifier file to use, or to create when absent (default: the run's "
                        "domain_classifier.pt beside CHECKPOINT if there is one, else OUT/domain_classifier.pt)")
    p.add_argument("--max-per-class", type=int, help="read at most this many images per class from each folder")
    p.add_argument("--resolution", type=int, help="resolution to load folders at (default: the checkpoint's, "
                                                  "else the first generated image's)")
    p.add_argument("--round", type=int, dest="round_num", help="write OUT/eval/round_XXX.json instead of "
                                                               "OUT/evaluation.json")
    p.add_argument("--config", metavar="FILE", help="YAML config whose metrics section gives the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set metrics.classifier_steps=100 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling / pair-sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def _first_image_size(folder: Path) -> int:
    from PIL import Image

    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as im:
                return int(im.size[0])
    raise DataError(f"no images found under {folder}")


def run(args: argparse.Namespace) -> int:
    from medstylegan2.config import load_config
    from medstylegan2.data import load_folder

    if (args.checkpoint is None) == (args.fake is None):
        raise UserError("give either a CHECKPOINT or --fake DIR (exactly one)")
    cfg = load_config(args.config, args.overrides).metrics
    if args.metrics:
        cfg.metrics = [m for item in args.metrics for m in item.split(",") if m]
    validate_metric_names(cfg.metrics)
    if args.n_per_class is not None:
        if args.n_per_class <= 0:
            raise UserError("--n-per-class must be > 0")
        cfg.n_per_class = args.n_per_class
    if args.weights_dir:
        cfg.weights_dir = args.weights_dir
    device = args.device
    if device == "auto":
        from medstylegan2.trainer import resolve_device

        device = str(resolve_device("auto"))

    G = None
    resolution = args.resolution
    if args.checkpoint:
        from medstylegan2.sampling import load_generator

        G, run_cfg = load_generator(args.checkpoint, device)
        resolution = resolution or run_cfg.model.resolution
    else:
        resolution = resolution or _first_image_size(Path(args.fake))
    print(f"loading real held-out images from {args.real} at {resolution}px ...", flush=True)
    real = load_folder(args.real, resolution, max_per_class=args.max_per_class)
    train = None
    if args.train:
        print(f"loading real training images from {args.train} ...", flush=True)
        train = load_folder(args.train, resolution, max_per_class=args.max_per_class)
    out = Path(args.out)
    classifier = Path(args.classifier) if args.classifier else out / CLASSIFIER_FILE
    if not args.classifier and args.checkpoint and (Path(args.checkpoint).parent / CLASSIFIER_FILE).is_file():
        classifier = Path(args.checkpoint).parent / CLASSIFIER_FILE  # the run's own domain classifier
        print(f"using the run's domain classifier {classifier}", flush=True)
    common = dict(out_dir=out, round_num=args.round_num, device=device, seed=args.seed, classifier_path=classifier)
    if G is not None:
        print(f"sampling {cfg.n_per_class} images per class from {args.checkpoint} ...", flush=True)
        record = evaluate_generator(G, real, train, cfg, **common)
    else:
        print(f"loading generated images from {args.fake} ...", flush=True)
        fake = load_folder(args.fake, resolution, max_per_class=args.max_per_class)
        record = evaluate_images(fake, real, train=train, cfg=cfg, **common)
    _print_summary(record)
    return 0


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_summary(record: dict) -> None:
    keys = []
    for values in [record["overall"]] + list(record["per_class"].values()):
        for k, v in values.items():
            if k not in keys and (v is None or isinstance(v, (int, float))):
                keys.append(k)
    names = list(record["per_class"]) + ["overall"]
    width = max(len(k) for k in keys) if keys else 10
    print("\n" + " " * width + "".join(f"{n:>12}" for n in names))
    for k in keys:
        row = [record["per_class"][n].get(k) for n in names[:-1]] + [record["overall"].get(k)]
        print(f"{k:<{width}}" + "".join(f"{_fmt(v):>12}" for v in row))
    for name, label in record.get("feature_networks", {}).items():
        print(f"feature network {name}: {label}")
    for name, msg in record.get("errors", {}).items():
        print(f"NOT COMPUTED {name}: {msg}")
    print(f"\nwrote {record['json']}")
