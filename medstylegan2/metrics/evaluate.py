"""The central evaluator: every requested metric per class and overall, one JSON record per evaluation.

``evaluate_images`` compares a generated ``ImageSet`` with real held-out images (and, for the memorization
audit and the domain classifier, the real training split); ``evaluate_generator`` samples ``n_per_class``
images per class from a generator first - the federation server's hook. The ``evaluate`` command
(``medstylegan2.metrics.evaluate_command``) does the same from a checkpoint or a folder of images.

Metric names (``MetricsConfig.metrics``): see ``medstylegan2.metrics.METRIC_NAMES``. A metric that cannot
run (a weights file absent, no training set given) is recorded under ``errors`` with the message, and the
others still run; numbers are never made up.

Output files. Without ``round_num`` they go to ``out_dir``; with ``round_num`` to ``<run_dir>/eval/`` when
``run_dir`` is given (where ``plot_metrics`` reads them), else to ``<out_dir>/eval/``:

- ``round_XXX.json`` (with a round) or ``evaluation.json``: the record ``evaluate_images`` returns;
- ``grid_round_XXX.png`` (or ``grid.png``): per-class generated rows beside real held-out rows;
- ``memorization_pairs_round_XXX.png`` (or ``memorization_pairs.png``): the 8 closest generated/training pairs;
- with ``run_dir``: one line ``{"round": r, "kind": "eval", ...}`` appended to ``<run_dir>/metrics.jsonl`` and
  ``<run_dir>/metrics.png`` redrawn from all ``eval/round_*.json``.

The domain classifier (FD-domain's feature network) is ``<run_dir>/domain_classifier.pt`` (or
``<out>/domain_classifier.pt``): trained on the training split the first time and reused after, so that
FD-domain values of different rounds are measured in the same feature space.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medstylegan2.classifier import (XrayClassifier, evaluate_classifier, load_classifier, save_classifier,
                                     train_classifier)
from medstylegan2.config import ConfigError, MetricsConfig
from medstylegan2.errors import DataError, UserError
from medstylegan2.metrics import METRIC_NAMES
from medstylegan2.runfolder import RunFolder, atomic_write_json, jsonable, round_file

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "domain_classifier.pt"
DOMAIN_METRICS = ("fd_domain", "kid_domain", "pr_domain")
INCEPTION_METRICS = ("fid", "kid", "pr")

# LPIPS protocol (see lpips_metrics): trunk, pairs for diversity, pixel-nearest candidates for "nearest real".
LPIPS_NET = "alex"
LPIPS_MAX_PAIRS = 1000
LPIPS_CANDIDATES = 5


def validate_metric_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Names in order without duplicates; ``ConfigError`` listing the allowed names for an unknown one."""
    out = []
    for name in names:
        if name not in METRIC_NAMES:
            raise ConfigError(f"unknown metric '{name}' in metrics.metrics; allowed: {', '.join(METRIC_NAMES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"metrics.metrics is empty; choose from: {', '.join(METRIC_NAMES)}")
    return out


def _round_tag(round_num: int | None) -> str:
    return "" if round_num is None else f"_round_{round_num:03d}"


def _count_per_class(labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, int]:
    return {name: int((labels == k).sum()) for k, name in enumerate(class_names)}


def _check_sets(fake, real, train) -> None:
    if len(fake.images) == 0:
        raise DataError("no generated images to evaluate")
    if len(real.images) == 0:
        raise DataError("the real held-out set is empty")
    sizes = {"generated": fake.images.shape[2:], "real held-out": real.images.shape[2:]}
    if train is not None:
        sizes["training"] = train.images.shape[2:]
    if len(set(sizes.values())) > 1:
        raise DataError("image sets differ in resolution: " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in sizes.items())
                        + "; load them at one resolution")


def domain_classifier(path: Path, train, cfg: MetricsConfig, *, device: str = "cpu",
                      seed: int = 0) -> tuple[XrayClassifier, bool]:
    """Load ``path``, or train on ``train`` and save it there; returns (model, trained_now)."""
    if path.is_file():
        log.info("domain classifier: reusing %s", path)
        return load_classifier(path, device=device), False
    if train is None or len(train.images) == 0:
        raise DataError(f"the domain feature network {path} does not exist and no training set was given to "
                        "train it (evaluate --train DIR, or keep the run's domain_classifier.pt)")
    log.info("domain classifier: training on %d training images (%d steps)", len(train.images),
             cfg.classifier_steps)
    model = train_classifier(train.images, train.labels, steps=cfg.classifier_steps, seed=seed, device=device,
                             num_classes=len(train.class_names))
    save_classifier(model, path, meta={
        "trained_on": "training split", "n_train": int(len(train.images)), "steps": cfg.classifier_steps,
        "seed": seed, "class_counts": _count_per_class(train.labels, tuple(train.class_names))})
    return model, True


class _Evaluation:
    """One evaluation: the shared inputs, the record being filled, one method per metric group."""

    def __init__(self, fake, real, train, cfg: MetricsConfig, names: list[str], *, eval_dir: Path,
                 classifier_path: Path, round_num: int | None, device: str, seed: int, use_fid_helper: bool,
                 use_stlpips: bool):
        self.fake, self.real, self.train, self.cfg, self.names = fake, real, train, cfg, names
        self.eval_dir, self.classifier_path, self.round_num = eval_dir, classifier_path, round_num
        self.device, self.seed = device, seed
        self.use_fid_helper, self.use_stlpips = use_fid_helper, use_stlpips
        self.class_names = tuple(real.class_names)
        self.tag = _round_tag(round_num)
        self.classifier: XrayClassifier | None = None
        self.record: dict[str, Any] = {
            "kind": "eval",
            "round": round_num,
            "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "class_names": list(self.class_names),
            "resolution": int(fake.images.shape[-1]),
            "n_generated": _count_per_class(fake.labels, self.class_names),
            "n_real_heldout": _count_per_class(real.labels, self.class_names),
            "n_train": None if train is None else int(len(train.images)),
            "metrics_requested": names,
            "feature_networks": {},
            "overall": {},
            "per_class": {name: {} for name in self.class_names},
            "errors": {},
            "timings_s": {},
        }
        self.overall, self.per_class = self.record["overall"], self.record["per_class"]
        self.errors = self.record["errors"]

    def step(self, label: str, members: list[str], fn: Callable[[], None]) -> None:
        """Run one metric group; a failure is recorded under ``errors`` for each of ``members``."""
        t0 = time.perf_counter()
        log.info("eval%s: %s ...", "" if self.round_num is None else f" round {self.round_num}", label)
        try:
            fn()
        except UserError as exc:
            self.errors.update({m: str(exc) for m in members})
            log.warning("%s not computed: %s", label, exc)
        except Exception as exc:  # noqa: BLE001 - one broken metric must not lose the others
            self.errors.update({m: f"{type(exc).__name__}: {exc}" for m in members})
            log.exception("%s failed", label)
        self.record["timings_s"][label] = round(time.perf_counter() - t0, 3)
        log.info("eval: %s done in %.1f s", label, self.record["timings_s"][label])

    def run(self) -> dict[str, Any]:
        names = self.names
        if any(m in DOMAIN_METRICS or m in ("memorization", "utility") for m in names):
            self.step("domain classifier", ["domain_classifier"], self.domain_classifier)
        if any(m in DOMAIN_METRICS for m in names):
            self.step("FD/KID/PR-domain", [m for m in DOMAIN_METRICS if m in names], self.fidelity_domain)
        if any(m in INCEPTION_METRICS for m in names):
            self.step("FID/KID/PR (Inception)", [m for m in INCEPTION_METRICS if m in names], self.fidelity_inception)
        if "lpips" in names:
            self.step("LPIPS", ["lpips"], self.lpips)
        if "memorization" in names:
            self.step("memorization", ["memorization"], self.memorization)
        if "utility" in names:
            self.step("utility", ["utility"], self.utility)
        return self.record

    # --- the domain classifier (FD-domain's feature network, memorization's domain space, utility baseline)
    def domain_classifier(self) -> None:
        model, trained_now = domain_classifier(self.classifier_path, self.train, self.cfg, device=self.device,
                                               seed=self.seed)
        if model.resolution != self.fake.images.shape[-1]:
            log.warning("domain classifier %s was trained at %dpx; images are %dpx and get resized",
                        self.classifier_path, model.resolution, self.fake.images.shape[-1])
        scores = evaluate_classifier(model, self.real.images, self.real.labels)
        self.classifier = model
        self.record["domain_classifier"] = {"path": str(self.classifier_path), "trained_now": trained_now,
                                            "heldout_accuracy": scores["accuracy"],
                                            "heldout_macro_f1": scores["macro_f1"]}

    # --- torch-fidelity: FD / KID / PR
    def _fidelity(self, space, network_key: str, metric_names: tuple[str, str, str], keys: tuple[str, ...]) -> None:
        """``metric_names``: (fd, kid, pr) names of this space; ``keys``: record keys fd, kid, kid_std, p, r."""
        from medstylegan2.metrics.fidelity import fidelity_per_class

        self.record["feature_networks"][network_key] = space.label
        want = [m in self.names for m in metric_names]
        res = fidelity_per_class(self.fake.images, self.fake.labels, self.real.images, self.real.labels, space,
                                 self.class_names, fid=want[0], kid=want[1], prc=want[2], device=self.device,
                                 batch_size=self.cfg.batch_size, seed=self.seed)
        k_fd, k_kid, k_kid_std, k_p, k_r = keys
        for target, values in [(self.overall, res["overall"])] + [(self.per_class[n], v)
                                                                  for n, v in res["per_class"].items()]:
            if "skipped" in values:
                target[f"{network_key}_skipped"] = values["skipped"]
                continue
            if "fd" in values:
                target[k_fd] = values["fd"]
            if "kid" in values:
                target[k_kid], target[k_kid_std] = values["kid"], values["kid_std"]
            if "precision" in values:
                target[k_p], target[k_r] = values["precision"], values["recall"]

    def fidelity_domain(self) -> None:
        from medstylegan2.metrics.fidelity import FeatureSpace

        if self.classifier is None:
            raise DataError(self.errors.get("domain_classifier", "no domain classifier"))
        self._fidelity(FeatureSpace.domain(self.classifier_path), "domain", DOMAIN_METRICS,
                       ("fd_domain", "kid_domain", "kid_domain_std", "precision_domain", "recall_domain"))

    def fidelity_inception(self) -> None:
        from medstylegan2.metrics.fidelity import FeatureSpace

        space = FeatureSpace.inception(self.cfg.weights_dir, use_fid_helper=self.use_fid_helper)
        self._fidelity(space, "inception", INCEPTION_METRICS, ("fid", "kid", "kid_std", "precision", "recall"))

    # --- LPIPS
    def lpips(self) -> None:
        from medstylegan2.metrics.lpips_metrics import load_lpips, lpips_per_class

        model = load_lpips(LPIPS_NET, self.cfg.weights_dir, device=self.device, use_stlpips=self.use_stlpips)
        self.record["feature_networks"]["lpips"] = model.label
        res = lpips_per_class(model, self.fake.images, self.fake.labels, self.real.images, self.real.labels,
                              self.class_names, max_pairs=LPIPS_MAX_PAIRS, candidates=LPIPS_CANDIDATES,
                              seed=self.seed, batch_size=self.cfg.batch_size)
        self.record["lpips"] = {"label": model.label, "max_pairs": LPIPS_MAX_PAIRS, "candidates": LPIPS_CANDIDATES,
                                "overall_is": "mean over classes", "per_class": res}
        for name, v in res.items():
            self.per_class[name]["lpips_diversity"] = v["diversity"]["mean"]
            self.per_class[name]["lpips_to_nearest_real"] = v["to_nearest_real"]["mean"]
        for key in ("lpips_diversity", "lpips_to_nearest_real"):
            vals = [self.per_class[n][key] for n in self.class_names if self.per_class[n].get(key) is not None]
            self.overall[key] = float(np.mean(vals)) if vals else None

    # --- memorization audit
    def memorization(self) -> None:
        from medstylegan2.metrics.memorization import memorization_audit
        from medstylegan2.metrics.plots import save_memorization_pairs

        if self.train is None:
            raise DataError("the memorization audit needs the training images (evaluate --train DIR)")
        res = memorization_audit(self.fake.images, self.fake.labels, self.train.images, self.train.labels,
                                 self.real.images, self.class_names, domain_model=self.classifier)
        if self.classifier is None:
            res["domain"] = {"error": self.errors.get("domain_classifier", "no domain classifier")}
        png = save_memorization_pairs(self.fake.images, self.train.images, res["closest_pairs"],
                                      self.eval_dir / f"memorization_pairs{self.tag}.png")
        res["pairs_png"] = str(png)
        self.record["memorization"] = res
        self.overall["memorization_fraction_pixel"] = res["pixel"].get("fraction_below")
        if "fraction_below" in res.get("domain", {}):
            self.overall["memorization_fraction_domain"] = res["domain"]["fraction_below"]

    # --- downstream utility
    def utility(self) -> None:
        from medstylegan2.metrics.utility import downstream_utility

        train = self.train
        res = downstream_utility(self.fake.images, self.fake.labels, self.real.images, self.real.labels,
                                 train_images=None if train is None else train.images,
                                 train_labels=None if train is None else train.labels, real_model=self.classifier,
                                 steps=self.cfg.classifier_steps, seed=self.seed, device=self.device,
                                 num_classes=len(self.class_names))
        self.record["utility"] = res
        synth, real = res["trained_on_synthetic"], res["trained_on_real"]
        self.overall["utility_accuracy_synthetic"] = synth["accuracy"]
        self.overall["utility_macro_f1_synthetic"] = synth["macro_f1"]
        if real is not None:
            self.overall["utility_accuracy_real"] = real["accuracy"]
            self.overall["utility_macro_f1_real"] = real["macro_f1"]
        for k, name in enumerate(self.class_names):
            self.per_class[name]["utility_recall_synthetic"] = synth["per_class_recall"][k]


def evaluate_images(fake, real_heldout, *, train=None, cfg: MetricsConfig | None = None,
                    out_dir: str | Path | None = None, round_num: int | None = None,
                    run_dir: str | Path | None = None, device: str = "cpu", seed: int = 0,
                    classifier_path: str | Path | None = None, use_fid_helper: bool = True,
                    use_stlpips: bool = True) -> dict:
    """Evaluate generated images against real held-out images; returns the record written to JSON.

    ``fake``, ``real_heldout``, ``train``: ``ImageSet``s (uint8 [N, 1, H, W] ``images``, int ``labels``), one
    resolution. ``cfg.metrics`` picks the metrics. ``classifier_path`` overrides where the domain classifier
    lives. ``use_fid_helper`` / ``use_stlpips`` allow the packaged fallback weights (tests switch them off).
    """
    from medstylegan2.metrics.plots import plot_metrics, save_sample_grid

    cfg = cfg or MetricsConfig()
    names = validate_metric_names(cfg.metrics)
    if out_dir is None and run_dir is None:
        raise ValueError("give out_dir or run_dir")
    out_dir = Path(out_dir if out_dir is not None else run_dir)
    run_dir = Path(run_dir) if run_dir is not None else None
    _check_sets(fake, real_heldout, train)
    started = time.perf_counter()
    if round_num is None:
        eval_dir = out_dir
    else:  # round records live in the run's eval/ folder, where plot_metrics reads them
        eval_dir = RunFolder(run_dir if run_dir is not None else out_dir).eval_dir
    eval_dir.mkdir(parents=True, exist_ok=True)
    clf_path = Path(classifier_path) if classifier_path else (run_dir or out_dir) / CLASSIFIER_FILE

    evaluation = _Evaluation(fake, real_heldout, train, cfg, names, eval_dir=eval_dir, classifier_path=clf_path,
                             round_num=round_num, device=str(device), seed=seed, use_fid_helper=use_fid_helper,
                             use_stlpips=use_stlpips)
    record = evaluation.run()
    grid = save_sample_grid(fake.images, fake.labels, real_heldout.images, real_heldout.labels,
                            evaluation.class_names, eval_dir / f"grid{evaluation.tag}.png",
                            title=None if round_num is None else f"round {round_num}")
    record["grid_png"] = str(grid)
    record["elapsed_s"] = round(time.perf_counter() - started, 3)
    record = jsonable(record)
    json_path = round_file(eval_dir, round_num, ".json") if round_num is not None else eval_dir / "evaluation.json"
    atomic_write_json(json_path, record)
    record["json"] = str(json_path)
    if run_dir is not None:
        RunFolder(run_dir).append_metrics(eval_metrics_line(record))
        try:
            plot_metrics(run_dir)
        except Exception:  # noqa: BLE001 - a plotting problem must not fail the server's round
            log.exception("could not draw %s", run_dir / "metrics.png")
    log.info("eval: wrote %s (%.1f s)", json_path, record["elapsed_s"])
    return record


def eval_metrics_line(record: dict) -> dict:
    """The ``metrics.jsonl`` line (kind ``eval``) of an evaluation record ``evaluate_images`` returned."""
    return {"round": record["round"], "kind": "eval", "time": record["time"], "overall": record["overall"],
            "per_class": record["per_class"], "errors": record["errors"], "file": str(record["json"])}


def evaluate_generator(G_ema, real_heldout, train, cfg: MetricsConfig, out_dir: str | Path | None = None,
                       round_num: int | None = None, run_dir: str | Path | None = None, device: str = "cpu",
                       *, seed: int = 0, truncation_psi: float = 1.0, **kwargs) -> dict:
    """Sample ``cfg.n_per_class`` images per class from ``G_ema`` (fixed ``seed``: the same latents every
    round) and ``evaluate_images`` them; the federation server's evaluation hook."""
    from medstylegan2.sampling import generate_per_class

    fake = generate_per_class(G_ema, cfg.n_per_class, seed=seed, truncation_psi=truncation_psi,
                              batch_size=cfg.batch_size, device=device)
    fake.class_names = tuple(real_heldout.class_names)
    return evaluate_images(fake, real_heldout, train=train, cfg=cfg, out_dir=out_dir, round_num=round_num,
                           run_dir=run_dir, device=str(device), seed=seed, **kwargs)
