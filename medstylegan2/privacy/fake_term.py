"""D's fake-image term under DP, clipped per sample as the real term is (``train.dp_clip_fakes``).

The fakes read no private data, so this is not for privacy but for balance. The real term reaches
D as a mean of per-sample gradients clipped to C (typically 50x shorter than they were), while an
unclipped fake term keeps its full length: D then pushes every logit down until sigmoid(D(fake))
is as small as the clipping factor, and both logits settle well below 0 (docs/recipe.md). Clipped
alike, both terms push with the same strength.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medstylegan2.privacy.group_clip import clip_factors
from medstylegan2.privacy.per_sample import per_sample_fake_gradients


def add_clipped_fake_gradient(D: nn.Module, fake: torch.Tensor, labels: torch.Tensor, *, max_grad_norm: float
                              ) -> torch.Tensor:
    """Add to every D ``p.grad`` the mean over ``fake`` of each fake's gradient of softplus(D(x)),
    clipped to ``max_grad_norm`` (Opacus' clipping factor). Divided by the fake batch size, which
    is the real term's expected batch size. Returns the per-sample fake losses."""
    grads, losses = per_sample_fake_gradients(D, fake.detach(), labels)
    # As for the real term, the norm is taken over the parameters that train (train.d_frozen).
    trained = [(name, p) for name, p in D.named_parameters() if p.requires_grad]
    factors = clip_factors(grads, [name for name, _ in trained], max_grad_norm)
    for name, p in trained:
        term = torch.einsum("b,b...->...", factors.to(grads[name].dtype), grads[name]) / max(len(losses), 1)
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # in the parameter's own layout
        p.grad.add_(term.to(p.grad.dtype))
    return losses
