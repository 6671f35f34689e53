"""D's real term on public images under DP (``train.public_real_weight``).

Under DP, D learns what real images look like only through clipped, noised per-sample gradients,
while the fake term pushes at full length: D's notion of "real" stays vague, and G's Normal fakes
narrow onto a few forms (docs/recipe.md, sessions 29-35). A public set of normal chest images
costs no privacy: D's ordinary real loss on it (logistic, lazy R1, the class head on its one
class) is added beside the fake term, outside the clip and the noise. Nothing in it reads a
private record, so it is post-processing, as the fake term is (docs/privacy.md).

The public set here is rendered, not read: Normal-only phantoms from a seed range the private
data never uses (``data.public_normals``, ``data.public_seed``), the stand-in the study's public
pretraining uses. Rendered images hold no one's data, so a server that sets these keys cannot
point the term at a site's archive.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# The public stand-in set holds Normal chests only (medstylegan2.config_checks.CLASS_NAMES[0]).
PUBLIC_LABEL = 0


@functools.lru_cache(maxsize=2)
def _rendered_normals(per_class: int, resolution: int, seed: int) -> np.ndarray:
    from medstylegan2.phantoms import generate_phantoms

    normals = generate_phantoms(per_class, resolution, seed=seed).of_class(PUBLIC_LABEL)
    images = normals.images
    images.setflags(write=False)  # shared by every trainer of the process
    return images


def public_normal_images(per_class: int, resolution: int, seed: int) -> np.ndarray:
    """The Normal images of ``generate_phantoms(per_class, resolution, seed)``: uint8 [N, 1, H, W]
    (read-only; the same array for the same arguments)."""
    return _rendered_normals(int(per_class), int(resolution), int(seed))


def public_images_of(cfg) -> np.ndarray | None:
    """The public images of ``cfg`` (``train.public_real_weight`` > 0), else None. The trainer
    uses them under DP only (the caller passes them to a DP site's trainer)."""
    if cfg.train.public_real_weight <= 0:
        return None
    return public_normal_images(cfg.data.public_normals, cfg.model.resolution, cfg.data.public_seed)


def public_real_loss(loss, public_images: torch.Tensor, r1_weight: float, batch_size: int) -> torch.Tensor:
    """D's real loss (``StyleGAN2Loss.discriminator_real``: logistic, R1 at ``r1_weight``, the class
    head) on ``batch_size`` public images drawn with replacement by the trainer's RNG, labelled Normal."""
    device = public_images.device
    idx = torch.randint(0, len(public_images), (batch_size,), device=device)
    labels = torch.full((batch_size,), PUBLIC_LABEL, dtype=torch.long, device=device)
    return loss.discriminator_real(public_images[idx], labels, r1_weight)
