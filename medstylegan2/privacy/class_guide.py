"""The class guide: a small classifier a site trains once on its own images, frozen, as G's class loss.

Under DP, D's class head learns the classes poorly: it shares each record's clip norm with the
adversarial term, and G learns to please a head that knows no real class (docs/recipe.md,
"Where a record's clip budget goes"). A dedicated classifier trained with DP-SGD on the same
images reaches 99% held-out accuracy at epsilon 10 and 98% at epsilon 1 on one site's 6,400
phantoms. With ``train.class_guide_weight`` > 0 every site trains one (``train_class_guide``),
freezes it, and G's loss adds ``class_guide_weight x CE(guide(fake), label)`` (``losses``).

Privacy (docs/privacy.md, point 5): training the guide is one more DP-SGD mechanism on the
site's data: Poisson sampling at the round's public sample rate, each unit's (image's or
patient's) gradient clipped to ``class_guide_max_grad_norm``, Gaussian noise at the round's
sigma, the noisy sum divided by the round's public expected batch size. Its steps are a release
in the site's ledger (``mechanism: class_guide``) and compose into the site's epsilon with D's.
The guide never leaves the site; G's updates read only the guide and D, so they are
post-processing of DP releases. It is trained once per run (``GuideStore``, a ``ReleaseStore``: kept
beside the ledger, named by the run token, the data set and its settings), so a repeated round or a
restarted site reuses it and spends nothing twice. Without DP it is trained plainly and kept in
the site's local state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.func import functional_call, grad, vmap

from medstylegan2.classifier import XrayClassifier
from medstylegan2.errors import CheckpointError, PrivacyError
from medstylegan2.privacy.engine import fresh_generator_seeds
from medstylegan2.privacy.ledger import CLASS_GUIDE
from medstylegan2.privacy.release_store import ReleaseStore, release_digest
from medstylegan2.privacy.units import UnitIndex, sum_per_unit

log = logging.getLogger(__name__)

STATE_KEY = "class_guide"          # a checkpoint's or a site's local state's entry holding the guide
GUIDE_FOLDER = "class_guides"      # beside the ledger: one file per run and setting
GUIDE_FORMAT = "medstylegan2-class-guide-v1"
PER_SAMPLE_CHUNK = 64              # vmap rows at a time: bounded memory at large Poisson batches


def build_guide(num_classes: int, resolution: int, width: int) -> XrayClassifier:
    """The guide's network: the project's small X-ray CNN, narrower than the evaluator's classifier."""
    return XrayClassifier(num_classes=num_classes, resolution=resolution, width=width, feature_dim=2 * width)


def guide_settings(cfg: Any) -> dict[str, Any]:
    """What decides the guide's training, from a run config (its digest names the stored guide)."""
    t = cfg.train
    return {"num_classes": cfg.model.num_classes, "resolution": cfg.model.resolution, "width": t.class_guide_width,
            "steps": t.class_guide_steps, "lr": t.class_guide_lr, "max_grad_norm": t.class_guide_max_grad_norm,
            "batch_size": t.batch_size}


@dataclass(frozen=True)
class GuideNoise:
    """The DP-SGD settings of the guide's training: the round's sigma and public sample rate."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: float   # the public divisor of the noisy sum (q x nominal size)
    seed: Optional[int] = None   # debugging only: None draws sampling and noise from OS entropy


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and none of training's gradients or per-sample gradients left on it."""
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "grad_sample"):
            del p.grad_sample
    return model.eval().requires_grad_(False)


def train_class_guide(images: np.ndarray, labels: np.ndarray, *, num_classes: int, resolution: int, width: int,
                      steps: int, batch_size: int, lr: float, max_grad_norm: float,
                      noise: Optional[GuideNoise] = None, groups: Optional[np.ndarray] = None, seed: int = 0,
                      device: torch.device | str = "cpu") -> XrayClassifier:
    """Train the guide for ``steps`` steps on uint8 ``images`` [N,1,H,W] and ``labels``; returns it frozen.

    ``noise`` None: plain Adam on shuffled batches of ``batch_size`` (no privacy). Otherwise
    DP-SGD: every step Poisson-samples units at ``noise.sample_rate`` (images, or with ``groups``
    patients and all their images), clips each unit's gradient to ``max_grad_norm``, adds
    N(0, (sigma C)^2) and divides by ``noise.expected_batch_size`` (Opacus' ``DPOptimizer``). An
    empty batch is noise only and still a step: the caller records ``steps`` steps.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise PrivacyError(f"the class guide needs images with one label each (got {len(images)} images, "
                           f"{len(labels)} labels)")
    device = torch.device(device)
    x_all = torch.as_tensor(np.asarray(images), device=device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    torch.manual_seed(seed)  # the guide's initial weights; the DP noise has its own generator
    model = build_guide(num_classes, resolution, width).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(device)
        return x_all[idx].to(torch.float32) / 127.5 - 1.0, y_all[idx]

    if noise is None:
        order = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = batch(torch.randint(0, len(labels), (min(batch_size, len(labels)),), generator=order))
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return frozen(model)

    units = UnitIndex(groups, len(labels)) if groups is not None else None
    sampling, noise_seed = fresh_generator_seeds(noise.seed)
    sampler = UniformWithReplacementSampler(num_samples=units.num_units if units else len(labels),
                                            sample_rate=noise.sample_rate, generator=sampling, steps=steps)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise.noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=noise.expected_batch_size, loss_reduction="mean",
                               generator=torch.Generator(device=device).manual_seed(noise_seed))
    named = list(model.named_parameters())
    taken = 0
    for sampled in sampler:
        sampled = torch.as_tensor(sampled, dtype=torch.long)
        idx = units.images_of(sampled) if units is not None else sampled
        grads = per_sample_gradients(model, *batch(idx))
        if units is not None:
            grads = sum_per_unit(grads, units.unit_of_image[idx].to(device))
        dp_optimizer.zero_grad(set_to_none=True)
        for name, p in named:
            p.grad_sample = grads[name]
        dp_optimizer.step()  # clip each unit, sum, noise, divide by the public batch size, Adam
        taken += 1
    assert taken == steps, f"the sampler gave {taken} of {steps} steps"
    return frozen(model)


def train_from_settings(images: np.ndarray, labels: np.ndarray, settings: Mapping[str, Any], *,
                        steps: Optional[int] = None, batch_size: Optional[int] = None, **options: Any
                        ) -> XrayClassifier:
    """``train_class_guide`` with a run's ``guide_settings``; ``steps`` and ``batch_size`` default to
    the settings' (a DP round passes its own effective ones); ``options``: noise, groups, seed, device."""
    return train_class_guide(images, labels, num_classes=settings["num_classes"], resolution=settings["resolution"],
                             width=settings["width"], lr=settings["lr"], max_grad_norm=settings["max_grad_norm"],
                             steps=settings["steps"] if steps is None else steps,
                             batch_size=settings["batch_size"] if batch_size is None else batch_size, **options)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each sample's gradient of its cross-entropy, ``[m, *shape]`` per parameter (m = 0: empty)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    if len(y) == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}

    def loss_of_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=PER_SAMPLE_CHUNK)(params, x, y)


# ----------------------------------------------------------------------------------------------
# Keeping it (state dicts; under DP a file beside the ledger)


def guide_to_state(model: XrayClassifier, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": GUIDE_FORMAT, "settings": dict(settings), "config": model.config(),
            "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def guide_from_state(state: Any, settings: Mapping[str, Any], where: str) -> XrayClassifier:
    """The frozen guide of ``state``; ``CheckpointError`` naming ``where`` if it is not one, or another setting's."""
    if not isinstance(state, dict) or state.get("format") != GUIDE_FORMAT:
        raise CheckpointError(f"{where}: not a class guide (expected format {GUIDE_FORMAT!r})")
    if state.get("settings") != dict(settings):
        raise CheckpointError(f"{where}: the class guide was trained with other settings ({state.get('settings')}) "
                              f"than this run's ({dict(settings)})")
    model = XrayClassifier(**state["config"])
    try:
        model.load_state_dict(state["weights"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{where}: the class guide's weights do not fit its network: {exc}") from exc
    return frozen(model)


def guide_digest(*, run: str, fingerprint: str, settings: Mapping[str, Any], noise: GuideNoise) -> str:
    """Names one run's guide of one data set: a new run, data set, setting or noise trains a new one."""
    return release_digest({"run": run, "fingerprint": fingerprint, "settings": dict(settings),
                           "noise_multiplier": noise.noise_multiplier, "sample_rate": noise.sample_rate})


class GuideStore(ReleaseStore):
    """A site's DP-trained guides, ``<ledger_dir>/class_guides/<digest>.pt``, each naming its ledger entry."""

    def __init__(self, ledger_dir: str | Path):
        super().__init__(ledger_dir, GUIDE_FOLDER, CLASS_GUIDE, "class guide")

    def load(self, digest: str, settings: Mapping[str, Any], ledger_entries: list[dict[str, Any]]
             ) -> Optional[XrayClassifier]:
        state = self.load_state(digest, ledger_entries)
        return None if state is None else guide_from_state(state, settings, str(self.path(digest)))

    def save(self, digest: str, model: XrayClassifier, settings: Mapping[str, Any], entry: Mapping[str, Any]) -> Path:
        return self.save_state(digest, guide_to_state(model, settings), entry)
