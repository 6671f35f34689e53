"""Per-class image statistics a site releases once under DP, for G's fakes to match.

Under DP every class of G's samples narrows over a run: the class guide pulls each class towards
its most recognisable form, and a D trained through DP-SGD's noise does not see the loss of
variety (docs/recipe.md, "The narrowing under DP", session 26). Two numbers per class say what the
variety should be: where a class's images are bright or dense on a coarse grid (its mean picture),
and how much they differ from one another there (its spread). Released once with the Gaussian
mechanism, they cost little epsilon (one step at sample rate 1 with a large sigma), and G's loss can
ask its fakes of each class to have the same mean picture and spread. G still reads no real image:
it reads the release (post-processing).

The mechanism (docs/privacy.md, point 6). Each image x (float, [-1, 1]) gives its coarse picture
u = mean-pooled x on a ``grid`` x ``grid`` raster (every cell in [-1, 1]) and the record vector,
zero outside its class's block::

    [u / grid, mean(u^2), 1]     (norm <= sqrt(1 + 1 + 1) = sqrt(3))

or, with one spread per cell (``spread="cell"``: where in the picture a class varies, e.g. a dense
lobe that lies in a different lobe from image to image), with u^2 taken cell by cell::

    [u / grid, u^2 / grid, 1]    (norm <= sqrt(1 + 1 + 1) = sqrt(3): every |u_i| <= 1, grid^2 cells)

A unit (an image, or a patient with all their images) contributes the sum of its images' vectors,
clipped to norm sqrt(3): adding or removing one unit moves the sum by at most SENSITIVITY. The
site releases the sum plus N(0, (sigma * SENSITIVITY)^2) on every coordinate, which is the
Gaussian mechanism with noise multiplier sigma: in Opacus' accountant one step at sample rate 1,
(sigma, 1.0, 1). Everything below is computed from the noisy sums alone.

A site makes the release once per run (``privacy.site.RoundPrivacy.class_moments``): the budget
is checked with it, it is recorded in the ledger (``mechanism: class_moments``) and only then kept
beside the ledger (``MomentsStore``) and used; a later round or a restarted site of the run
reuses it. Without DP the site computes the exact statistics (no noise) every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from medstylegan2.config import SPREAD_KINDS
from medstylegan2.errors import CheckpointError, PrivacyError
from medstylegan2.privacy.engine import fresh_generator_seeds
from medstylegan2.privacy.ledger import CLASS_MOMENTS
from medstylegan2.privacy.release_store import ReleaseStore, release_digest
from medstylegan2.privacy.units import sum_per_unit

SENSITIVITY = math.sqrt(3.0)    # the norm bound of one unit's record vector (see the module docstring)
# A class whose noisy count is below this many noise standard deviations is too uncertain to match:
# its mean picture divides by a count that may be mostly noise.
MIN_COUNT_IN_NOISE_STDS = 10.0
MOMENTS_FORMAT = "medstylegan2-class-moments-v1"
STATE_KEY = "class_moments"        # a train-local checkpoint's entry holding the run's release
MOMENTS_FOLDER = "class_moments"   # beside the ledger: one file per run and setting


@dataclass(frozen=True)
class ClassMoments:
    """What the release says per class: ``means`` [C, grid*grid] (the mean coarse picture),
    ``spreads`` [C] (the per-cell standard deviation, averaged over cells as a variance) or
    [C, grid*grid] (one per cell: ``per_cell``),
    ``counts`` [C] (the noisy number of units) and ``usable`` [C] (False: the noisy count was too
    small to divide by; G's loss skips the class)."""

    grid: int
    means: torch.Tensor
    spreads: torch.Tensor
    counts: torch.Tensor
    usable: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def per_cell(self) -> bool:
        return self.spreads.ndim == 2

    def to(self, device: Any) -> "ClassMoments":
        return ClassMoments(self.grid, *(t.to(device) for t in (self.means, self.spreads, self.counts, self.usable)))

    def to_state(self) -> dict[str, Any]:
        return {"format": MOMENTS_FORMAT, "grid": self.grid,
                **{k: getattr(self, k).detach().cpu() for k in ("means", "spreads", "counts", "usable")}}

    @classmethod
    def from_state(cls, state: Any, where: str) -> "ClassMoments":
        if not isinstance(state, dict) or state.get("format") != MOMENTS_FORMAT:
            raise CheckpointError(f"{where}: not a class-moments release (expected format {MOMENTS_FORMAT!r})")
        means, spreads, counts, usable = (state.get(k) for k in ("means", "spreads", "counts", "usable"))
        grid = state.get("grid")
        ok = (isinstance(grid, int) and all(isinstance(t, torch.Tensor) for t in (means, spreads, counts, usable))
              and means.ndim == 2 and means.shape[1] == grid * grid
              and spreads.shape in (means.shape[:1], means.shape) and counts.shape == usable.shape == means.shape[:1])
        if not ok:
            raise CheckpointError(f"{where}: the class-moments release is malformed (grid {grid!r})")
        return cls(grid, means.float(), spreads.float(), counts.float(), usable.bool())


def coarse_pictures(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Float images [N, 1, H, W] in [-1, 1] -> their mean-pooled ``grid`` x ``grid`` pictures, [N, grid*grid]."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grayscale images [N, 1, H, W], got shape {tuple(x.shape)}")
    return F.adaptive_avg_pool2d(x.float(), grid).flatten(1)


def release_class_moments(images: np.ndarray, labels: np.ndarray, *, num_classes: int, grid: int,
                          noise_multiplier: Optional[float], groups: Optional[np.ndarray] = None,
                          seed: Optional[int] = None, chunk: int = 1024, spread: str = "class") -> ClassMoments:
    """The release from uint8 ``images`` [N, 1, H, W] and ``labels`` (see the module docstring).

    ``noise_multiplier`` None: the exact statistics (no privacy; a non-DP site). ``groups``: each
    image's unit (patient) id, so a unit's images are summed before the clip. ``seed``: debugging
    only; None draws the noise from OS entropy, as DP-SGD's noise. ``spread``: "class" (one spread
    per class) or "cell" (one per cell of the coarse picture).
    """
    if len(images) != len(labels):
        raise PrivacyError(f"class moments need one label per image (got {len(images)} images, {len(labels)} labels)")
    if grid < 1:
        raise PrivacyError(f"class moments need a grid of at least 1 cell a side (got {grid})")
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PrivacyError(f"class moments: labels must lie in 0..{num_classes - 1}")
    if spread not in SPREAD_KINDS:
        raise PrivacyError(f"class moments: spread must be one of {', '.join(SPREAD_KINDS)} (got {spread!r})")
    per_cell = spread == "cell"
    cells = grid * grid
    squares = cells if per_cell else 1
    width = cells + squares + 1
    records = []
    for start in range(0, len(images), chunk):
        x = torch.as_tensor(np.asarray(images[start:start + chunk])).float() / 127.5 - 1.0
        u = coarse_pictures(x, grid)
        square = u.pow(2) / grid if per_cell else u.pow(2).mean(1, keepdim=True)
        block = torch.cat([u / grid, square, torch.ones(len(u), 1)], dim=1).double()
        # The block goes to its class's slot, zeros elsewhere.
        in_class = F.one_hot(torch.as_tensor(labels[start:start + chunk]), num_classes).double()
        records.append((in_class[:, :, None] * block[:, None, :]).flatten(1))
    vectors = torch.cat(records) if records else torch.zeros(0, num_classes * width, dtype=torch.float64)
    if groups is not None:
        vectors = sum_per_unit({"record": vectors}, torch.as_tensor(np.asarray(groups), dtype=torch.long))["record"]
    # The clip: a no-op for single images (their norm is at most sqrt(3)), the bound for a patient's sum.
    norms = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    total = (vectors * (SENSITIVITY / norms).clamp(max=1.0)).sum(0)
    noise_std = 0.0
    if noise_multiplier is not None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise PrivacyError(f"class moments: the noise multiplier must be > 0 (got {noise_multiplier!r})")
        _, noise_seed = fresh_generator_seeds(seed)
        noise_std = noise_multiplier * SENSITIVITY
        total = total + torch.randn(total.shape, generator=torch.Generator().manual_seed(noise_seed),
                                    dtype=torch.float64) * noise_std
    per_class = total.reshape(num_classes, width)
    counts = per_class[:, -1]
    usable = counts >= max(MIN_COUNT_IN_NOISE_STDS * noise_std, 1.0)
    safe = counts.clamp_min(1.0)[:, None]
    means = (grid * per_class[:, :cells] / safe).clamp(-1.0, 1.0)
    # Each cell of a noisy mean picture carries noise of variance (grid * noise_std / count)^2, which
    # would inflate means^2 and so shrink the spread; the variance is public: add it back.
    mean_noise_var = (grid * noise_std / safe).pow(2)
    if per_cell:
        mean_square = grid * per_class[:, cells:2 * cells] / safe
        variances = mean_square - means.pow(2) + mean_noise_var
    else:
        mean_square = per_class[:, cells] / safe[:, 0]
        variances = mean_square - means.pow(2).mean(1) + mean_noise_var[:, 0]
    spreads = variances.clamp_min(0.0).sqrt()
    return ClassMoments(grid, means.float(), spreads.float(), counts.float(), usable)


def release_from_config(cfg: Any, images: np.ndarray, labels: np.ndarray, *, noise_multiplier: Optional[float],
                        groups: Optional[np.ndarray] = None, seed: Optional[int] = None) -> ClassMoments:
    """``release_class_moments`` with a run config's classes and grid (``train.class_moments_grid``)."""
    return release_class_moments(images, labels, num_classes=cfg.model.num_classes, grid=cfg.train.class_moments_grid,
                                 noise_multiplier=noise_multiplier, groups=groups, seed=seed,
                                 spread=cfg.train.class_moments_spread)


def moments_loss(fake: torch.Tensor, labels: torch.Tensor, moments: ClassMoments) -> torch.Tensor:
    """How far each class's fakes in the batch are from the release: the mean squared difference of
    the mean coarse pictures plus the squared difference of the spreads (with one spread per cell:
    their mean squared difference), averaged over the classes with at least two fakes here and a
    usable release (0 when there is none). Masks, not branches: no host sync on a GPU."""
    u = coarse_pictures(fake, moments.grid)
    members = F.one_hot(labels.long(), moments.num_classes).to(u.dtype)            # [N, C]
    counts = members.sum(0)
    per = counts.clamp_min(1.0)
    mean = members.t() @ u / per[:, None]                                          # [C, cells]
    variance = members.t() @ u.pow(2) / per[:, None] - mean.pow(2)                # [C, cells]
    if not moments.per_cell:
        variance = variance.mean(1, keepdim=True)                                  # one spread per class
    spread = variance.clamp_min(1e-8).sqrt()
    spread_term = (spread - moments.spreads.reshape(spread.shape)).pow(2).mean(1)
    terms = (mean - moments.means).pow(2).mean(1) + spread_term
    counted = ((counts >= 2) & moments.usable).to(u.dtype)
    return (terms * counted).sum() / counted.sum().clamp_min(1.0)


def moments_digest(*, run: str, fingerprint: str, num_classes: int, grid: int, noise_multiplier: float,
                   spread: str = "class") -> str:
    """Names one run's release of one data set: a new run, data set, grid, noise or kind of spread
    makes a new one (one spread per class keeps the digests made before the choice existed)."""
    settings = {"run": run, "fingerprint": fingerprint, "num_classes": num_classes, "grid": grid,
                "noise_multiplier": noise_multiplier}
    return release_digest(settings if spread == "class" else {**settings, "spread": spread})


class MomentsStore(ReleaseStore):
    """A site's class-moments releases, ``<ledger_dir>/class_moments/<digest>.pt``, each naming its ledger entry."""

    def __init__(self, ledger_dir: Any):
        super().__init__(ledger_dir, MOMENTS_FOLDER, CLASS_MOMENTS, "class-moments release")

    def load(self, digest: str, ledger_entries: list[dict[str, Any]]) -> Optional[ClassMoments]:
        state = self.load_state(digest, ledger_entries)
        return None if state is None else ClassMoments.from_state(state, str(self.path(digest)))

    def save(self, digest: str, moments: ClassMoments, entry: dict[str, Any]) -> Any:
        return self.save_state(digest, moments.to_state(), entry)
