"""The evaluation every arm of the study gets: CAS, TSTR-relative, FD-domain and LPIPS, from the
same number of generated images and one shared real-trained domain classifier.

Every figure comes from the evaluator (``medstylegan2.metrics.evaluate``), so an arm's CAS and TSTR
are the same numbers a run's own evaluation reports (``metrics.cas``: the one CAS implementation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STUDY_METRICS = ["fd_domain", "lpips", "cas", "utility"]


def evaluate_checkpoint(checkpoint: str | Path, *, train, heldout, classifier_path: str | Path, n_per_class: int,
                        classifier_steps: int, out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Every study figure for one checkpoint's G_ema: CAS, TSTR-relative, FD-domain, LPIPS.

    ``classifier_path``: the real-trained domain classifier shared by all arms (FD-domain's feature
    space, CAS's judge and TSTR's real baseline). A figure the evaluator could not compute is ``None``
    and its reason is under ``errors``.
    """
    from medstylegan2.config import MetricsConfig
    from medstylegan2.metrics.evaluate import evaluate_images
    from medstylegan2.sampling import generate_per_class, load_generator

    G, _ = load_generator(checkpoint)
    fake = generate_per_class(G, n_per_class, seed=seed)
    fake.class_names = tuple(heldout.class_names)
    cfg = MetricsConfig(n_per_class=n_per_class, metrics=list(STUDY_METRICS), classifier_steps=classifier_steps)
    record = evaluate_images(fake, heldout, train=train, cfg=cfg, out_dir=out_dir, classifier_path=classifier_path,
                             seed=seed)
    overall, per_class = record["overall"], record["per_class"]
    if record.get("errors"):
        log.warning("evaluation of %s: %s", checkpoint, record["errors"])
    return {
        "cas": overall.get("cas"),
        "cas_per_class": {n: per_class[n].get("cas") for n in heldout.class_names},
        "tstr_relative": overall.get("tstr_relative"),
        "fd_domain": overall.get("fd_domain"),
        "fd_domain_per_class": {n: per_class[n].get("fd_domain") for n in heldout.class_names},
        "lpips_diversity": overall.get("lpips_diversity"),
        "lpips_to_nearest_real": overall.get("lpips_to_nearest_real"),
        "n_per_class": n_per_class,
        "errors": record.get("errors", {}),
    }
