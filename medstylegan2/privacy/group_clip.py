"""Per-sample clipping by parameter group (``train.dp_clip_groups``), before Opacus' flat clip.

With one flat clip, each sample's whole gradient is scaled to norm C, and whichever part of D
has the largest gradient takes most of C. Under D's class loss that is the convolutional
features: the class head (a few hundred parameters) then gets a tiny share of C against noise of
sigma C per coordinate, and stays at chance on real images (docs/recipe.md). Clipping by group
gives every group its own share: with G groups, each sample's gradient restricted to a group is
clipped to C / sqrt(G), so the whole gradient still has norm at most

    sqrt(G * (C / sqrt(G))^2) = C.

The sensitivity of the sum is therefore still C. Opacus' flat clip to C then runs as before (it
finds nothing left to clip) and the same noise N(0, (sigma C)^2) is added to every coordinate,
so the accountant, sigma and epsilon are unchanged: this is Opacus' per-layer clipping with equal
thresholds, applied to groups of layers. What changes is only how a sample's C is split between
the parts of D (docs/privacy.md, point 2).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from medstylegan2.errors import PrivacyError
from medstylegan2.networks import under


def clip_factors(per_sample_grads: dict[str, torch.Tensor], names: Sequence[str], bound: float) -> torch.Tensor:
    """Opacus' per-sample clip factor ``min(1, bound / (norm + 1e-6))``, the norm of each sample's
    gradient taken over the parameters ``names`` together; shape ``[m]``."""
    norms = torch.sqrt(sum(per_sample_grads[name].flatten(1).square().sum(dim=1) for name in names))
    return (bound / (norms + 1e-6)).clamp(max=1.0)


def parameter_groups(names: Sequence[str], prefixes: Sequence[str]) -> list[list[str]]:
    """The clip groups of D's trained parameters: one per prefix (its parameters, by the first
    prefix that names them), then one of every parameter no prefix names (if any).

    Raises PrivacyError when a prefix names no trained parameter: a typo would otherwise silently
    leave the split as it was.
    """
    groups: list[list[str]] = [[] for _ in prefixes]
    rest: list[str] = []
    for name in names:
        for i, prefix in enumerate(prefixes):
            if under(name, prefix):
                groups[i].append(name)
                break
        else:
            rest.append(name)
    for prefix, members in zip(prefixes, groups):
        if not members:
            roots = sorted({name.split(".")[0] for name in names})
            raise PrivacyError(f"train.dp_clip_groups: {prefix!r} names no trained parameter of D (or only ones an "
                               f"earlier prefix took); D's trained parameters start with {', '.join(roots)}")
    return groups + ([rest] if rest else [])


def clip_by_group(per_sample_grads: dict[str, torch.Tensor], groups: list[list[str]], max_grad_norm: float
                  ) -> dict[str, torch.Tensor]:
    """Each sample's gradient within each group clipped to ``max_grad_norm / sqrt(len(groups))``
    (Opacus' factor ``min(1, c / (norm + 1e-6))``); parameters in no group are left as they are."""
    if len(groups) <= 1:
        return per_sample_grads
    bound = max_grad_norm / math.sqrt(len(groups))
    out = dict(per_sample_grads)
    for members in groups:
        factors = clip_factors(per_sample_grads, members, bound)
        for name in members:
            g = per_sample_grads[name]
            out[name] = g * factors.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
    return out
