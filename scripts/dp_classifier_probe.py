"""Can the classes be learnt under DP-SGD at one site's size? (docs/recipe.md, session 21)

Trains the evaluator's small X-ray classifier with Opacus' DP-SGD (Poisson batches, per-sample
clip, RDP accountant) on one IID site's share of the phantom training split, and prints its
accuracy on the real held-out images, per class. A measurement for choosing the recipe, not part
of a run: nothing here is released.

    python scripts/dp_classifier_probe.py --epsilon 10 --steps 250
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=10.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=250, help="DP-SGD steps")
    p.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--width", type=int, default=32, help="classifier width")
    p.add_argument("--site-size", type=int, default=6400, help="training images of the site")
    p.add_argument("--phantoms-per-class", type=int, default=8000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from opacus import PrivacyEngine

    from medstylegan2.classifier import XrayClassifier, predict
    from medstylegan2.config import load_config
    from medstylegan2.fl.partition import load_split

    torch.manual_seed(args.seed)
    cfg = load_config(None, [f"model.resolution={args.resolution}", f"data.phantoms_per_class={args.phantoms_per_class}",
                             "data.heldout_fraction=0.2"])
    train, heldout = load_split(cfg)
    site = np.random.default_rng(args.seed).permutation(len(train.labels))[:args.site_size]
    images = torch.as_tensor(np.asarray(train.images)[site]).float() / 127.5 - 1
    labels = torch.as_tensor(np.asarray(train.labels)[site]).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=args.batch_size, shuffle=True)
    model = XrayClassifier(resolution=args.resolution, width=args.width, feature_dim=2 * args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    epochs = max(1, math.ceil(args.steps * args.batch_size / len(site)))
    with warnings.catch_warnings():
        # A measurement, not a release: Opacus' reminder about its secure RNG does not apply.
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Optimal order|full_backward_hook).*")
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
            target_delta=args.delta, epochs=epochs, max_grad_norm=args.max_grad_norm, poisson_sampling=True)
        started, done = time.perf_counter(), 0
        while done < args.steps:
            for x, y in loader:
                if done >= args.steps:
                    break
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                done += 1
        spent = engine.get_epsilon(args.delta)
    model.eval()
    predicted = predict(model._module, np.asarray(heldout.images))
    truth = np.asarray(heldout.labels)
    per_class = [float((predicted[truth == c] == c).mean()) for c in range(3)]
    result = {"epsilon": float(spent), "sigma": float(optimizer.noise_multiplier), "steps": done,
              "heldout_accuracy": float((predicted == truth).mean()), "seconds": time.perf_counter() - started}
    print(f"epsilon {spent:.2f} (delta {args.delta:g}), sigma {optimizer.noise_multiplier:.3f}, {done} steps of "
          f"batch {args.batch_size} on {len(site)} images, width {args.width}: held-out accuracy "
          f"{result['heldout_accuracy']:.3f} (per class {' / '.join(f'{a:.2f}' for a in per_class)}), "
          f"{result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
