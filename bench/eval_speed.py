"""Evaluation speed: images/s for sampling and feature extraction, and the evaluator's overhead.

    python bench/eval_speed.py [--n-per-class 1000] [--resolution 64] [--inception-images 64] [--device cpu]

Prints a table. Rows:

- sampling: G_ema of the default model config (random weights; speed does not depend on training);
- feature extraction through torch-fidelity: the domain classifier, Inception-v3 (if weights can be found,
  timed on ``--inception-images`` images because it is slow on CPU), the ST-LPIPS/LPIPS trunk;
- overhead: the project's evaluator on a folder of generated and a folder of real PNGs (reading them, per-class
  and overall FD/KID/PR, JSON, sample grid) against ``torch_fidelity.calculate_metrics`` (FD + KID + PR, same
  extractor) called directly (a) once on the two folders, which gives the overall figures only, and (b) on the
  two folders and on each pair of class subfolders, which gives the same figures as the evaluator. Ratios =
  evaluator / direct (aim: <= 1.2). With ``--overhead-inception`` the same comparison with Inception;
- a full evaluation with the default metrics plus the memorization audit at ``--n-per-class`` per class.

The data are the embedded phantoms (``--n-per-class`` per class as "generated", as many as "real").
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medstylegan2.classifier import save_classifier, train_classifier
from medstylegan2.config import MetricsConfig, load_config
from medstylegan2.data import load_folder
from medstylegan2.images import write_image_folder
from medstylegan2.errors import MissingWeightsError
from medstylegan2.metrics.evaluate import evaluate_images
from medstylegan2.metrics.fidelity import FeatureSpace, calculate_metrics_dirs, clear_feature_cache, extract_features
from medstylegan2.phantoms import generate_phantoms


def timed(fn, sync: bool = False):
    start = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-per-class", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--inception-images", type=int, default=64, help="images timed through Inception (0: skip)")
    p.add_argument("--overhead-inception", action="store_true", help="also compare overhead with Inception")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-full", action="store_true", help="skip the full-evaluation row")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device, n, res = args.device, args.n_per_class, args.resolution
    rows: list[tuple[str, int, float, str]] = []

    def row(what: str, count: int, seconds: float, note: str = "") -> None:
        rows.append((what, count, seconds, note))
        print(f"  {what}: {count} images in {seconds:.2f} s ({count / seconds:.1f} img/s) {note}", flush=True)

    print(f"making {n} phantoms per class for 'generated' and 'real' at {res}px ...", flush=True)
    fake, t = timed(lambda: generate_phantoms(n, res, seed=1))
    real = generate_phantoms(n, res, seed=2)
    train = generate_phantoms(max(50, n // 4), res, seed=3)

    # sampling
    try:
        from medstylegan2.networks import build_networks
        from medstylegan2.sampling import generate_images

        cfg = load_config(None, [f"model.resolution={res}"])
        G, _ = build_networks(cfg.model)
        G = G.to(device).eval().requires_grad_(False)
        labels = np.repeat(np.arange(3), 64)
        generate_images(G, labels[:8], device=device)
        _, t = timed(lambda: generate_images(G, labels, batch_size=64, device=device), sync=True)
        row(f"sampling G_ema {res}px (default model, batch 64)", len(labels), t)
    except ImportError as exc:
        print(f"  sampling skipped: {exc}")

    work = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    model = train_classifier(train.images, train.labels, steps=50, seed=0, device=device)
    clf = save_classifier(model, work / "domain_classifier.pt")
    domain = FeatureSpace.domain(clf)
    extract_features(fake.images[:64], domain, device=device, use_cache=False)
    _, t = timed(lambda: extract_features(fake.images, domain, device=device, use_cache=False), sync=True)
    row("domain features (torch-fidelity extractor)", len(fake.images), t)

    inception = None
    if args.inception_images > 0:
        try:
            inception = FeatureSpace.inception(args.weights_dir)
            k = min(args.inception_images, len(fake.images))
            extract_features(fake.images[:8], inception, device=device, use_cache=False)
            _, t = timed(lambda: extract_features(fake.images[:k], inception, device=device, use_cache=False),
                         sync=True)
            row("Inception-v3 features (299px)", k, t, f"[{inception.label}]")
        except MissingWeightsError as exc:
            print(f"  Inception skipped: {exc}")

    try:
        from medstylegan2.metrics.lpips_metrics import load_lpips

        lp = load_lpips("alex", args.weights_dir, device=device)
        k = min(256, len(fake.images))
        lp.features(fake.images[:8])
        _, t = timed(lambda: lp.features(fake.images[:k]), sync=True)
        row(f"{lp.label} trunk features", k, t)
    except MissingWeightsError as exc:
        print(f"  LPIPS skipped: {exc}")

    # overhead against torch-fidelity called directly on the same folders
    fake_dir = write_image_folder(fake, work / "fake")
    real_dir = write_image_folder(real, work / "real")
    spaces = [("domain", domain, ["fd_domain", "kid_domain", "pr_domain"])]
    if args.overhead_inception and inception is not None:
        spaces.append(("Inception", inception, ["fid", "kid", "pr"]))
    ratios = []
    for name, space, metrics in spaces:
        _, t_direct = timed(lambda: calculate_metrics_dirs(fake_dir, real_dir, space, device=device,
                                                                   kid_subset_size=min(1000, 3 * n)))
        row(f"torch_fidelity.calculate_metrics on the two folders, FD+KID+PR ({name})", 2 * len(fake.images),
            t_direct)

        def direct_same_figures():  # the evaluator's figures: the pooled folders plus one call per class folder
            calculate_metrics_dirs(fake_dir, real_dir, space, device=device, kid_subset_size=min(1000, 3 * n))
            for cls in fake.class_names:
                calculate_metrics_dirs(fake_dir / cls, real_dir / cls, space, device=device,
                                       kid_subset_size=min(1000, n))

        _, t_same = timed(direct_same_figures)
        row(f"torch_fidelity.calculate_metrics x4, overall + per class ({name})", 2 * len(fake.images), t_same)

        def ours():
            clear_feature_cache()
            f = load_folder(fake_dir, res)
            r = load_folder(real_dir, res)
            return evaluate_images(f, r, train=None, cfg=MetricsConfig(metrics=metrics, weights_dir=args.weights_dir),
                                   out_dir=work / f"ev_{name}", device=device, classifier_path=clf)

        record, t_ours = timed(ours)
        assert not record["errors"], record["errors"]
        ratios.append((name, t_ours / t_direct, t_ours / t_same))
        row(f"evaluator on the same folders, per class + overall ({name})", 2 * len(fake.images), t_ours,
            f"{t_ours / t_direct:.2f}x one direct call, {t_ours / t_same:.2f}x the 4 direct calls")

    if not args.skip_full:
        cfg = MetricsConfig(metrics=["fd_domain", "kid_domain", "pr_domain", "lpips", "memorization"],
                            weights_dir=args.weights_dir)
        clear_feature_cache()
        record, t = timed(lambda: evaluate_images(fake, real, train=train, cfg=cfg, out_dir=work / "full",
                                                  device=device, classifier_path=clf))
        assert not record["errors"], record["errors"]
        row(f"full evaluation {n}/class: {', '.join(cfg.metrics)}", 2 * len(fake.images), t,
            "; ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items()))

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nEvaluation speed ({name}; {res}px, {n} generated + {n} real images per class)")
    print("| what | images | seconds | images/s | note |")
    print("|---|---|---|---|---|")
    for what, count, seconds, note in rows:
        print(f"| {what} | {count} | {seconds:.2f} | {count / seconds:.1f} | {note} |")
    for name, one, same in ratios:
        print(f"evaluator / torch-fidelity direct ({name}): {one:.2f}x one call on the two folders (overall "
              f"figures only); {same:.2f}x the direct calls giving the same overall + per-class figures (aim <= 1.2x)")


if __name__ == "__main__":
    main()
