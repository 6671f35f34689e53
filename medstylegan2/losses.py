"""StyleGAN2 losses, one method per training phase.

- ``generator_main``: non-saturating logistic loss, minus the seed paper's diversity-sensitive term.
- ``generator_path_length``: path-length regularization (lazy; the caller scales by its interval).
- ``discriminator_fake`` / ``discriminator_real``: logistic loss on fakes and reals; R1 on reals.

With a class head on D (``model.d_class_head``, AC-GAN) D's real loss adds the head's
cross-entropy on the real labels and G's loss adds it on the fakes' conditioning labels, both
weighted by ``train.class_loss_weight``. With a class guide (``privacy.class_guide``: a frozen
classifier the site trained on its own images) G's loss adds ``train.class_guide_weight`` times
the guide's cross-entropy on the fakes; with class moments (``privacy.class_moments``: each
class's mean coarse picture and spread, released once) ``train.class_moments_weight`` times how
far each class's fakes in the batch are from them.

The discriminator's real-image terms are written per sample (``reduction="none"``) because the
differential-privacy path needs them one sample at a time; the non-private path takes the mean.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medstylegan2.augment import make_augment
from medstylegan2.config import TrainConfig
from medstylegan2.privacy.class_moments import ClassMoments, moments_loss


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 results of autocast as fp32 (the losses stay fp32); fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def full_precision(t: torch.Tensor):
    """No autocast: for the double-backward gradients of R1 and path length (backward passes under
    autocast are not supported) and the losses, which stay fp32 under bf16 autocast."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def r1_penalty_per_sample(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """||d D(x) / d x||^2 for each sample (needs ``real_images.requires_grad``)."""
    with full_precision(real_logits):
        (grads,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
        return at_least_fp32(grads).square().flatten(1).sum(dim=1)


def class_weight_of(D: nn.Module, cfg: TrainConfig, step: int = 0) -> float:
    """The auxiliary classifier's loss weight at G step ``step`` if D has a class head, else 0:
    ``cfg.class_loss_weight``, or with ``class_loss_weight_end`` the linear schedule towards it."""
    if not getattr(D, "has_class_head", False):
        return 0.0
    return _scheduled(cfg.class_loss_weight, cfg.class_loss_weight_end, step, cfg.class_loss_decay_steps)


def d_class_weight_of(D: nn.Module, cfg: TrainConfig, step: int = 0) -> float:
    """The head's loss weight on reals in D's loss at step ``step``: ``cfg.d_class_loss_weight`` if set
    (and D has a class head), else G's weight (``class_weight_of``)."""
    if cfg.d_class_loss_weight is None or not getattr(D, "has_class_head", False):
        return class_weight_of(D, cfg, step)
    return cfg.d_class_loss_weight


def guide_weight_of(cfg: TrainConfig, step: int = 0) -> float:
    """The class guide's weight at G step ``step``: ``cfg.class_guide_weight``, or with
    ``class_guide_weight_end`` the linear schedule towards it (a strong class push while G learns the
    classes, then room for each class's variety)."""
    return _scheduled(cfg.class_guide_weight, cfg.class_guide_weight_end, step, cfg.class_guide_decay_steps)


def ds_weight_of(cfg: TrainConfig, step: int) -> float:
    """The diversity-sensitive loss weight at G step ``step``: ``lambda_ds``, linearly decayed to 0."""
    if cfg.lambda_ds <= 0:
        return 0.0
    return cfg.lambda_ds * (1.0 - _ramp(step, cfg.ds_decay_steps))


def _scheduled(start: float, end: Optional[float], step: int, steps: int) -> float:
    """``start``, or with an ``end`` the linear move from ``start`` to ``end`` over ``steps``, at ``step``."""
    return start if end is None else start + (end - start) * _ramp(step, steps)


def _ramp(step: int, steps: int) -> float:
    """How far a linear schedule over ``steps`` trainer steps (each: G's updates, then D's) is at
    ``step``: 0 -> 1, then 1."""
    return min(1.0, step / max(steps, 1))


def discriminator_real_loss_per_sample(D: nn.Module, real: torch.Tensor, labels: torch.Tensor,
                                       r1_weight: float, class_weight: float = 0.0) -> torch.Tensor:
    """softplus(-D(x)) + r1_weight * ||grad_x D(x)||^2 + class_weight * CE(head(x), y), one value per sample.

    ``r1_weight`` already includes gamma/2 and the lazy-regularization interval; 0 skips R1.
    R1 penalizes the adversarial logit only; ``class_weight`` > 0 needs D's class head.
    """
    if r1_weight > 0:
        real = real.detach().requires_grad_(True)
    if class_weight > 0:
        logits, class_logits = D(real, labels, with_class_logits=True)
        logits = logits.squeeze(1)
    else:
        logits = D(real, labels).squeeze(1)
    loss = F.softplus(-at_least_fp32(logits))
    if r1_weight > 0:
        loss = loss + r1_weight * r1_penalty_per_sample(logits, real)
    if class_weight > 0:
        loss = loss + class_weight * F.cross_entropy(at_least_fp32(class_logits), labels.long(), reduction="none")
    return loss


class StyleGAN2Loss:
    """Phases of StyleGAN2 training for a class-conditional G and D (any arch with that interface)."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: TrainConfig):
        self.G, self.D, self.cfg = G, D, cfg
        self.has_mapping = hasattr(G, "mapping") and hasattr(G, "synthesize")
        self.pl_mean = torch.zeros([])
        # The site's frozen class guide (set by the trainer); its term's weight is set by schedule().
        self.class_guide: Optional[nn.Module] = None
        # The site's class-moments release (set by the trainer), matched with class_moments_weight.
        self.class_moments: Optional[ClassMoments] = None
        # What D sees of any image (augment.py; the identity unless train.augment names transforms).
        self.augment = make_augment(cfg.augment)
        self.schedule(0)
        # The same functions, possibly torch.compile'd by the trainer (acceleration.py): used only
        # where no double backward runs through them (not for R1 or path length).
        self.D_fast = D
        self.synthesize_fast = G.synthesize if self.has_mapping else None

    def schedule(self, step: int) -> None:
        """The class terms' weights at trainer step ``step``: D's head on fakes in G's loss, on reals in
        D's loss, and the class guide's in G's loss (each on its schedule: class first, then variety)."""
        self.class_weight = class_weight_of(self.D, self.cfg, step)
        self.d_class_weight = d_class_weight_of(self.D, self.cfg, step)
        self.guide_weight = guide_weight_of(self.cfg, step)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, z: torch.Tensor, labels: torch.Tensor, *, update_w_avg: bool = True,
                 fast: bool = False) -> torch.Tensor:
        """G(z, c) with style mixing (a second latent of the SAME class takes over after a cutoff).

        ``fast``: through ``synthesize_fast`` (no double backward may run through the result).
        """
        if not self.has_mapping:
            return self.G(z, labels)
        ws = self.G.mapping(z, labels, update_w_avg=update_w_avg)
        if self.cfg.style_mixing_prob > 0 and ws.shape[1] > 1:
            # Drawn by the CPU generator: reading it is no GPU sync.
            cutoff = int(torch.randint(1, ws.shape[1], ()).item())
            mix = torch.rand(ws.shape[0], device=ws.device) < self.cfg.style_mixing_prob
            cut = torch.where(mix, torch.full_like(labels, cutoff), torch.full_like(labels, ws.shape[1]))
            layer_idx = torch.arange(ws.shape[1], device=ws.device).view(1, -1, 1)
            ws2 = self.G.mapping(torch.randn_like(z), labels, update_w_avg=False)
            ws = torch.where(layer_idx < cut.view(-1, 1, 1), ws, ws2)
        return (self.synthesize_fast if fast else self.G.synthesize)(ws)

    # -- generator phases ------------------------------------------------------------------------
    def generator_main(self, z: torch.Tensor, labels: torch.Tensor, ds_weight: float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its statistics (detached tensors: read them once, not every step)."""
        fake = self.generate(z, labels, fast=True)
        seen = self.augment(fake)  # D judges the augmented fake; the guide and moments the fake itself
        if self.class_weight > 0:
            logits, class_logits = self.D_fast(seen, labels, with_class_logits=True)
        else:
            logits = self.D_fast(seen, labels)
        adversarial = F.softplus(-at_least_fp32(logits)).mean()
        loss = adversarial
        stats = {"loss_g": adversarial.detach()}
        if self.class_weight > 0:
            # AC-GAN: fakes should be classified as their conditioning class by D's head.
            class_loss = F.cross_entropy(at_least_fp32(class_logits), labels.long())
            loss = loss + self.class_weight * class_loss
            stats["loss_g_class"] = class_loss.detach()
        if self.class_guide is not None and self.guide_weight > 0:
            # The frozen guide is post-processing of its DP release; only G's weights get gradients.
            guide_loss = F.cross_entropy(self.class_guide(at_least_fp32(fake)).float(), labels.long(),
                                         reduction="none")
            pushed = guide_loss
            if self.cfg.class_guide_confidence is not None:
                # -log p below -log(confidence): already recognisable, no further pull.
                pushed = F.relu(guide_loss + math.log(self.cfg.class_guide_confidence))
            loss = loss + self.guide_weight * pushed.mean()
            stats["loss_g_guide"] = guide_loss.mean().detach()
        if self.class_moments is not None and self.cfg.class_moments_weight > 0:
            # Against the narrowing: each class's fakes keep the released mean picture and spread.
            mismatch = moments_loss(at_least_fp32(fake), labels, self.class_moments)
            loss = loss + self.cfg.class_moments_weight * mismatch
            stats["loss_g_moments"] = mismatch.detach()
        if ds_weight > 0:
            # Seed paper's "style difference" loss (StarGAN v2's diversity-sensitive loss): two
            # latents of one class should give different images; maximized, so subtracted.
            other = self.generate(torch.randn_like(z), labels, update_w_avg=False)
            diversity = (fake - other).abs().mean()
            loss = loss - ds_weight * diversity
            stats["loss_ds"] = diversity.detach()
        return loss, stats

    def generator_path_length(self, z: torch.Tensor, labels: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Penalty on the deviation of |J_w^T y| from its running mean (scaled by weight * interval)."""
        if not self.has_mapping or self.cfg.pl_weight <= 0:
            return torch.zeros([], device=z.device), {}
        batch = max(1, z.shape[0] // self.cfg.pl_batch_shrink)
        z, labels = z[:batch], labels[:batch]
        ws = self.G.mapping(z, labels)
        img = self.G.synthesize(ws)
        with full_precision(img):
            img = at_least_fp32(img)
            noise = torch.randn(img.shape, device=img.device, dtype=img.dtype) / math.sqrt(img.shape[2] * img.shape[3])
            (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
            lengths = at_least_fp32(grads).square().sum(dim=2).mean(dim=1).sqrt()
        self.pl_mean = self.pl_mean.to(lengths.device)
        pl_mean = self.pl_mean.lerp(lengths.mean().detach(), self.cfg.pl_decay)
        self.pl_mean = pl_mean.detach()
        penalty = (lengths - pl_mean).square().mean()
        return penalty * self.cfg.pl_weight * self.cfg.pl_interval, {"loss_pl": penalty.detach()}

    # -- discriminator phases --------------------------------------------------------------------
    def discriminator_fake(self, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.softplus(at_least_fp32(self.D_fast(self.augment(fake.detach()), labels))).mean()

    def discriminator_real(self, real: torch.Tensor, labels: torch.Tensor, r1_weight: float) -> torch.Tensor:
        # R1 is a double backward: the eager D then.
        D = self.D if r1_weight > 0 else self.D_fast
        return discriminator_real_loss_per_sample(D, self.augment(real), labels, r1_weight, self.d_class_weight).mean()

    def r1_weight(self, lazy: bool) -> float:
        """gamma/2 scaled by the lazy interval on regularization steps, else 0."""
        if not lazy or self.cfg.r1_gamma <= 0:
            return 0.0
        return self.cfg.r1_gamma / 2 * self.cfg.r1_interval
