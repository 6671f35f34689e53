"""Central evaluation of generated chest X-rays against real held-out images.

One module per concern:

- ``features``: where feature-network weights come from (never downloaded) and the registration of the
  project's own domain feature extractor in torch-fidelity's registry;
- ``fidelity``: Frechet distance, KID and precision/recall, computed by torch-fidelity;
- ``lpips_metrics``: LPIPS diversity and LPIPS to the nearest real image (lpips / ST-LPIPS);
- ``memorization``: nearest-training-image audit;
- ``utility``: train-on-synthetic, test-on-real classification;
- ``plots``: sample grids, memorization pairs, metrics over rounds;
- ``evaluate``: the orchestrator (``evaluate_images``, ``evaluate_generator``);
- ``evaluate_command``: the ``evaluate`` command.
"""

from __future__ import annotations

METRIC_NAMES: tuple[str, ...] = (
    "fd_domain", "kid_domain", "pr_domain",  # torch-fidelity in the domain classifier's feature space
    "fid", "kid", "pr",                      # torch-fidelity with the TF-FID Inception-v3
    "lpips",                                 # diversity + distance to the nearest real image
    "memorization",                          # nearest training image in pixel / domain feature space
    "utility",                               # train on synthetic, test on real
)
