"""Units of privacy larger than one image: a patient and all of their images.

With ``unit: patient`` the engine Poisson-samples patients, not images (``UnitIndex``), and clips
the sum of each sampled patient's per-image gradients (``sum_per_unit``): one clip per patient,
so epsilon is per patient however many images they have.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medstylegan2.errors import PrivacyError


def sum_per_unit(per_sample_grads: dict[str, torch.Tensor], unit_of_row: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-unit gradients: the rows of each unit summed, one row per distinct unit (in sorted order).

    ``per_sample_grads[name]`` is ``[m, *shape]``; ``unit_of_row`` (``[m]``, any integer ids) says
    which unit (patient) each row belongs to. Clipping the result bounds a patient's whole
    contribution, however many images they have, by C.
    """
    if len(unit_of_row) == 0:
        return per_sample_grads
    _, row_to_unit = torch.unique(unit_of_row, return_inverse=True)
    num_units = int(row_to_unit.max()) + 1
    summed = {}
    for name, g in per_sample_grads.items():
        out = g.new_zeros((num_units, *g.shape[1:]))
        summed[name] = out.index_add_(0, row_to_unit.to(g.device), g)
    return summed


class UnitIndex:
    """Which images belong to which unit (patient): ``groups[i]`` is image i's patient, any integers."""

    def __init__(self, groups: Sequence[int] | torch.Tensor, num_examples: int):
        groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
        if len(groups) != num_examples:
            raise PrivacyError(f"patient ids must name every image: {len(groups)} ids for {num_examples} images")
        # Units are numbered 0..P-1 in the order of their ids.
        _, self.unit_of_image = torch.unique(groups, return_inverse=True)
        self.num_units = int(self.unit_of_image.max()) + 1 if len(groups) else 0

    def images_of(self, units: torch.Tensor) -> torch.Tensor:
        """Indices of every image of the given units (ascending)."""
        chosen = torch.zeros(self.num_units, dtype=torch.bool)
        chosen[units] = True
        return torch.nonzero(chosen[self.unit_of_image]).reshape(-1)
