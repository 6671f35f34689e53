"""Validation before training: can this discriminator be trained with per-sample DP-SGD at all?

As Opacus' ``ModuleValidator`` does, but with messages that name each offending layer of D and say
what to use instead. The engine calls it when the trainer binds D to it, before any step.
"""

from __future__ import annotations

import torch.nn as nn
from opacus.validators import ModuleValidator

from medstylegan2.errors import PrivacyError


def validate_discriminator(D: nn.Module) -> None:
    """Raise ``PrivacyError`` naming every layer of D that per-sample DP-SGD cannot handle.

    Rejected: minibatch-stddev over the batch (mixes the samples of a batch; the reference form,
    which groups each sample with fakes only, is allowed), BatchNorm (same, plus running
    statistics of real data), any buffer (state updated from real data would leave the site
    un-noised), and whatever Opacus' ``ModuleValidator`` rejects.
    """
    from opacus.validators.errors import UnsupportedModuleError

    problems: list[str] = []
    if getattr(D, "mbstd_group_size", 0) and not getattr(D, "mbstd_against_reference", False):
        problems.append(f"D.mbstd_group_size={D.mbstd_group_size}: minibatch-stddev mixes the samples of a batch, "
                        "so per-sample gradients are undefined; set model.mbstd_group_size: 0 or "
                        "model.mbstd_reference: true under DP")
    for name, module in D.named_modules():
        where = f"D.{name}" if name else "D"
        if type(module).__name__ == "MinibatchStdLayer" and not getattr(module, "against_reference", False):
            problems.append(f"{where} (MinibatchStdLayer): mixes the samples of a batch; "
                            "set model.mbstd_group_size: 0 or model.mbstd_reference: true under DP")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{where} ({type(module).__name__}): BatchNorm mixes the samples of a batch and keeps "
                            "running statistics of real data; use GroupNorm or LayerNorm (no running stats), "
                            "or no normalization")
        elif type(module) in ModuleValidator.VALIDATORS:
            for error in ModuleValidator.VALIDATORS[type(module)](module):
                problems.append(f"{where} ({type(module).__name__}): {error}")
    for name, _ in D.named_buffers():
        problems.append(f"D.{name} is a buffer: state kept outside the parameters is not clipped or noised; "
                        "compute it as a constant inside forward() instead")
    if not problems:
        # Anything Opacus rejects that the named walk above did not already report.
        for error in ModuleValidator.validate(D, strict=False):
            if not isinstance(error, UnsupportedModuleError) or "training mode" not in str(error):
                problems.append(f"D: {error}")
    if problems:
        raise PrivacyError("the discriminator cannot be trained with differential privacy:\n  - "
                           + "\n  - ".join(problems))
