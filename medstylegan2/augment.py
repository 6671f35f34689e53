"""Differentiable augmentation of D's inputs (``train.augment``), after DiffAugment (Zhao et al. 2020).

D sees every image it judges - real, fake, public - through the same random transforms, drawn
afresh for each image; G's gradient flows back through them. D can then no longer win by
learning the exact look of the few real images its noisy, clipped steps carry (under DP) or of
a small set, and every fake keeps a gradient towards "real" on the transformed images. Nothing
here reads data beyond the one image it transforms, so under DP a record's clipped gradient is
still the gradient of a function of that record alone: the same sensitivity, the same epsilon
(docs/privacy.md).

Transforms (a registry: ``AUGMENTATIONS``), on images in [-1, 1], shape [N, C, H, W]:

- ``color``: brightness (+ U(-0.5, 0.5)) and contrast (x U(0.5, 1.5) about the image's mean);
- ``translation``: an integer shift of up to an eighth of the side in each axis, zeros shifted in;
- ``cutout``: a square of half the side, anywhere in the image, set to 0.

No flips: a chest X-ray's left and right differ (the heart), and a flipped chest is not a real one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

TRANSLATION_SHARE = 0.125
CUTOUT_SHARE = 0.5


def _uniform(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """One draw per image, broadcastable over [C, H, W]; from the global RNG (saved with checkpoints)."""
    u = torch.rand(x.shape[0], 1, 1, 1, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return low + (high - low) * u


def color(x: torch.Tensor) -> torch.Tensor:
    x = x + _uniform(x, -0.5, 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def translation(x: torch.Tensor, share: float = TRANSLATION_SHARE) -> torch.Tensor:
    n, _, h, w = x.shape
    reach = max(1, int(round(min(h, w) * share)))
    shift = torch.randint(-reach, reach + 1, (2, n, 1))
    rows = (torch.arange(h).view(1, h) + shift[0] + reach).to(x.device)
    cols = (torch.arange(w).view(1, w) + shift[1] + reach).to(x.device)
    padded = F.pad(x, (reach, reach, reach, reach))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # [N, H, W, C] from per-image row and column indices, back to [N, C, H, W].
    return padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, share: float = CUTOUT_SHARE) -> torch.Tensor:
    n, _, h, w = x.shape
    size_h, size_w = max(1, int(h * share)), max(1, int(w * share))
    top = torch.randint(0, h - size_h + 1, (n, 1, 1))
    left = torch.randint(0, w - size_w + 1, (n, 1, 1))
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = (ys >= top) & (ys < top + size_h) & (xs >= left) & (xs < left + size_w)
    keep = (~inside).unsqueeze(1).to(device=x.device, dtype=x.dtype)
    return x * keep


AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
}


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_augment(names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transforms ``names`` in the registry's order (``color`` before the geometric ones); none:
    the identity. Unknown names raise naming the key (the config check catches them first)."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"train.augment: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(AUGMENTATIONS)}")
    chosen = [fn for name, fn in AUGMENTATIONS.items() if name in names]
    if not chosen:
        return identity

    def augment(x: torch.Tensor) -> torch.Tensor:
        for fn in chosen:
            x = fn(x)
        return x

    return augment
