"""Central evaluation of generated chest X-rays against real held-out images.

One module per concern:

- ``features``: where feature-network weights come from (never downloaded) and the registration of the
  project's own domain feature extractor in torch-fidelity's registry;
- ``fidelity``: Frechet distance, KID and precision/recall, computed by torch-fidelity;
- ``lpips_metrics``: LPIPS diversity and LPIPS to the nearest real image (lpips / ST-LPIPS);
- ``memorization``: nearest-training-image audit;
- ``cas``: classification accuracy score, the real-trained classifier's accuracy on the generated images;
- ``utility``: train-on-synthetic, test-on-real classification;
- ``plots``: sample grids, memorization pairs, metrics over rounds;
- ``headline``: the few figures a run prints at its end;
- ``evaluate``: the orchestrator (``evaluate_images``, ``evaluate_generator``);
- ``evaluate_command``: the ``evaluate`` command.
"""

from __future__ import annotations

METRIC_NAMES: tuple[str, ...] = (
    "fd_domain", "kid_domain", "pr_domain",  # torch-fidelity in the domain classifier's feature space
    "fid", "kid", "pr",                      # torch-fidelity with the TF-FID Inception-v3
    "lpips",                                 # diversity + distance to the nearest real image
    "memorization",                          # nearest training image in pixel / domain feature space
    "cas",                                   # the domain classifier's accuracy on generated images
    "utility",                               # train on synthetic, test on real (TSTR)
)


def check_metrics_config(cfg) -> None:
    """``ConfigError`` naming the key for unknown metric names or a bad ``fid_n_per_class`` (a ``MetricsConfig``).

    ``metrics``: measured at every evaluation (every ``federation.evaluate_every`` rounds and after the last);
    ``final_metrics``: also measured after the last round; both empty: no evaluator at all.
    ``fid_n_per_class``: the first N generated and N real images of each class go through Inception.
    """
    from medstylegan2.errors import ConfigError

    for key in ("metrics", "final_metrics"):
        unknown = [name for name in getattr(cfg, key) if name not in METRIC_NAMES]
        if unknown:
            raise ConfigError(f"'metrics.{key}' has unknown metric '{unknown[0]}'; allowed: {', '.join(METRIC_NAMES)}")
    if cfg.fid_n_per_class is not None and cfg.fid_n_per_class < 2:
        raise ConfigError("'metrics.fid_n_per_class' must be >= 2 (FID needs two images per set) or null (all images)")
