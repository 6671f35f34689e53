"""The site trainer: one hospital's G, G_ema, D and optimizers, trained for K steps at a time.

``SiteTrainer`` knows nothing about Flower. ``train-local`` calls it in a loop; the Flower client
loads the global weights into it, calls ``train_steps(K)`` and sends the weights back. A
checkpoint holds everything needed to continue exactly: networks, optimizers, counters, the
path-length mean, the batch sampler and every RNG state.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from medstylegan2.acceleration import (DeviceStats, as_floats, copy_indices_to, ema_update_, images_in_format,
                                       make_adam, match_grad_layouts, maybe_compile, resolve_acceleration,
                                       to_memory_format)
from medstylegan2.config import RunConfig
from medstylegan2.errors import CheckpointError, UserError
from medstylegan2.losses import StyleGAN2Loss, ds_weight_of
from medstylegan2.network_weights import load_state_dict_checked
from medstylegan2.networks import build_networks, freeze_parameters
from medstylegan2.privacy.class_guide import STATE_KEY, guide_settings, guide_to_state
from medstylegan2.privacy.class_moments import STATE_KEY as MOMENTS_KEY, ClassMoments
from medstylegan2.privacy.fake_term import add_clipped_fake_gradient
from medstylegan2.privacy.public_term import public_real_loss
from medstylegan2.rng_state import rng_state, seed_everything, set_rng_state
from medstylegan2.runfolder import write_checkpoint
from medstylegan2.shuffle_sampler import ShuffleSampler

if TYPE_CHECKING:
    from medstylegan2.privacy.engine import DPEngine

log = logging.getLogger(__name__)

NETWORK_NAMES = ("G", "G_ema", "D")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def images_to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N,1,H,W] -> float32 in [-1, 1] on ``device``."""
    t = torch.as_tensor(images, device=device)
    return t.to(torch.float32) / 127.5 - 1.0


def float_to_images(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 [N,C,H,W] (clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


class SiteTrainer:
    """Trains one site's class-conditional GAN on its own images (uint8 [N,1,H,W] + labels)."""

    def __init__(self, cfg: RunConfig, images: np.ndarray, labels: np.ndarray, *,
                 device: torch.device | str | None = None, seed: Optional[int] = None,
                 privacy: Optional["DPEngine"] = None, class_guide: Optional[nn.Module] = None,
                 class_moments: Optional[ClassMoments] = None, public_images: Optional[np.ndarray] = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.seed = cfg.seed if seed is None else seed
        seed_everything(self.seed)
        # Device-level speed choices (precision, memory layout, compile): same function, see acceleration.py.
        self.accel = resolve_acceleration(cfg.train, self.device)
        self.num_examples = int(len(labels))
        self.real_images = (images_in_format(images_to_float(images, self.device), self.accel.channels_last)
                            if self.num_examples else None)
        self.real_labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        # Public Normal images for D's public real term under DP (train.public_real_weight; privacy/public_term.py).
        self.public_images = (None if public_images is None or len(public_images) == 0 else
                              images_in_format(images_to_float(np.array(public_images), self.device),
                                               self.accel.channels_last))

        self.G, self.D = build_networks(cfg.model)
        self.G.to(self.device).train()
        self.D.to(self.device).train()
        to_memory_format([self.G, self.D], self.accel.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        try:  # train.d_frozen: what D's optimizer (and under DP the noise) covers
            self.d_trainable = freeze_parameters(self.D, cfg.train.d_frozen)
        except ValueError as exc:
            raise UserError(f"train.d_frozen: {exc}") from None
        self.loss = StyleGAN2Loss(self.G, self.D, cfg.train)
        self.loss.pl_mean = self.loss.pl_mean.to(self.device)
        # The site's frozen class guide and class-moments release (privacy.class_guide, privacy.class_moments),
        # read by G's loss; never sent anywhere.
        self.loss.class_guide = None if class_guide is None else class_guide.to(self.device)
        self.loss.class_moments = None if class_moments is None else class_moments.to(self.device)
        if self.accel.compile:
            # Reference mbstd swaps a tensor attribute of D every step: compiled, each swap would
            # be a guard failure and a recompile, so D stays eager then.
            self.loss.D_fast = maybe_compile(self.D, not self.uses_reference_mbstd)
            if self.loss.has_mapping:
                self.loss.synthesize_fast = maybe_compile(self.G.synthesize, True)
        self.g_opt = self._make_optimizer(self.G.parameters(), cfg.train.g_lr, cfg.train.pl_interval
                                          if self.loss.has_mapping and cfg.train.pl_weight > 0 else None)
        self.d_opt = self._make_optimizer(self.d_trainable, cfg.train.d_lr,
                                          cfg.train.r1_interval if cfg.train.r1_gamma > 0 else None)
        self.sampler = ShuffleSampler(max(self.num_examples, 1), cfg.train.batch_size, seed=self.seed + 1)
        self.step = 0          # G+D steps taken by this trainer (all rounds)
        self.cur_nimg = 0      # real images shown to D
        # Set by federation for a FedProx-style proximal term: {"G": {...}, "D": {...}} of tensors.
        self.proximal_reference: Optional[dict[str, dict[str, torch.Tensor]]] = None
        # The differential-privacy engine (medstylegan2.privacy.engine) supplies D's real-data
        # gradient; this trainer still owns the whole D step.
        self.privacy = privacy
        if privacy is not None:
            # Validates D before any training; fails here if D or this site does not fit DP-SGD.
            privacy.bind(self.D, self.d_opt, num_examples=self.num_examples, batch_size=cfg.train.batch_size,
                         clip_groups=cfg.train.dp_clip_groups)
        elif cfg.privacy.enabled and self.num_examples > 0:
            # Never train on real images without DP when the config promises it.
            raise UserError("privacy.enabled is true but no privacy engine was given: pass "
                            "privacy=medstylegan2.privacy.engine.make_privacy_engine(cfg, num_examples, planned_steps)")

    # -- construction helpers --------------------------------------------------------------------
    def _make_optimizer(self, params: Iterable[nn.Parameter], lr: float, reg_interval: Optional[int]
                        ) -> torch.optim.Adam:
        beta1, beta2 = self.cfg.train.beta1, self.cfg.train.beta2
        if reg_interval:
            # Lazy regularization: the optimizer sees reg_interval+1 updates per interval, so scale
            # lr and betas to keep the effective schedule (StyleGAN2, Appendix B).
            ratio = reg_interval / (reg_interval + 1)
            lr, beta1, beta2 = lr * ratio, beta1 ** ratio, beta2 ** ratio
        return make_adam(params, lr=lr, betas=(beta1, beta2), eps=1e-8, device=self.device)

    def sample_fake_labels(self, n: int) -> torch.Tensor:
        num_classes = self.cfg.model.num_classes
        if self.privacy is not None or self.num_examples == 0:
            # Under DP the site's label distribution is private: condition fakes on uniform classes.
            return torch.randint(0, num_classes, (n,), device=self.device)
        idx = torch.randint(0, self.num_examples, (n,), device=self.device)
        return self.real_labels[idx]

    @property
    def uses_reference_mbstd(self) -> bool:
        return bool(getattr(self.D, "mbstd_against_reference", False))

    def mbstd_reference(self):
        """A context in which D's reference minibatch-stddev sees fresh fakes (a no-op otherwise).

        The fakes are G's output for fresh noise and every class: nothing in them depends on
        private data except through G's weights, which are post-processing of DP releases. So,
        under DP, a real image's loss still depends on that image alone among the private data.
        """
        if not self.uses_reference_mbstd:
            return contextlib.nullcontext()
        labels = self.D.reference_labels(self.device)
        with torch.no_grad(), self.accel.autocast():
            z = torch.randn(len(labels), self.cfg.model.z_dim, device=self.device)
            fake = self.loss.generate(z, labels, update_w_avg=False, fast=True)
        return self.D.mbstd_reference(fake.reshape(self.D.num_classes, -1, *fake.shape[1:]))

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = copy_indices_to(self.sampler.next_indices(), self.device)
        return self.real_images[idx], self.real_labels[idx]

    # -- one step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One G+D step; its statistics as numbers (``train_steps`` reads them once per call instead)."""
        return as_floats(self._train_step())

    def _train_step(self) -> dict[str, Any]:
        """One G+D step; statistics stay on the device (no host sync)."""
        if self.num_examples == 0:
            raise ValueError("this site has no training images")
        t = self.cfg.train
        batch = t.batch_size
        stats: dict[str, Any] = {}
        self.loss.schedule(self.step)

        # G: g_steps_per_d updates (non-saturating loss, lazy path length), each followed by the EMA.
        for g_index in range(self.step * t.g_steps_per_d, (self.step + 1) * t.g_steps_per_d):
            stats.update(self.generator_step(g_index))

        # D: logistic loss on fakes and reals, lazy R1 on reals; d_steps_per_g updates per G update.
        self.G.requires_grad_(False)
        for p in self.d_trainable:
            p.requires_grad_(True)
        for d_index in range(self.step * t.d_steps_per_g, (self.step + 1) * t.d_steps_per_g):
            with torch.no_grad(), self.accel.autocast():
                z = torch.randn(batch, self.cfg.model.z_dim, device=self.device)
                fake_labels = self.sample_fake_labels(batch)
                fake = self.loss.generate(z, fake_labels, update_w_avg=False, fast=True)
            r1_weight = self.loss.r1_weight(lazy=d_index % t.r1_interval == 0)
            with self.mbstd_reference():
                stats.update(self.discriminator_step(fake, fake_labels, r1_weight))
        self.G.requires_grad_(True)

        self.step += 1
        return stats

    @property
    def g_batch_size(self) -> int:
        """Fakes per G update: ``train.g_batch_size``, or D's batch when unset."""
        return self.cfg.train.g_batch_size or self.cfg.train.batch_size

    def generator_step(self, g_index: int) -> dict[str, Any]:
        """G update number ``g_index`` of this trainer (all rounds): non-saturating loss (+ the
        diversity-sensitive term), path-length regularization every ``pl_interval`` updates, then
        the EMA. It reads no real image."""
        t = self.cfg.train
        batch = self.g_batch_size
        stats: dict[str, Any] = {}
        self.D.requires_grad_(False)
        self.G.requires_grad_(True)
        self.g_opt.zero_grad(set_to_none=True)
        z = torch.randn(batch, self.cfg.model.z_dim, device=self.device)
        labels = self.sample_fake_labels(batch)
        with self.mbstd_reference(), self.accel.autocast():
            loss_g, s = self.loss.generator_main(z, labels, ds_weight=ds_weight_of(t, self.step))
        loss_g.backward()
        stats.update(s)
        if self.loss.has_mapping and t.pl_weight > 0 and g_index % t.pl_interval == 0:
            z = torch.randn(batch, self.cfg.model.z_dim, device=self.device)
            with self.accel.autocast():
                loss_pl, s = self.loss.generator_path_length(z, self.sample_fake_labels(batch))
            loss_pl.backward()
            stats.update(s)
        self._add_proximal_gradient("G", self.G)
        _sanitize_gradients(self.G)
        self.g_opt.step()
        self.update_ema(g_index)
        return stats

    def discriminator_step(self, fake: torch.Tensor, fake_labels: torch.Tensor, r1_weight: float) -> dict[str, Any]:
        """One D update on ``fake`` and a batch of real images (DP-SGD under privacy); shareable stats.

        Without privacy: a shuffled batch of reals, the mean loss over fakes and reals, backward.
        Under privacy the engine draws a Poisson batch and sets D's gradients to the clipped and
        noised gradient of its real-data loss; the fake term is added here as is. Either way this
        trainer adds the proximal term, sanitizes, steps D's optimizer and counts the images.
        """
        if self.privacy is not None:
            idx = self.privacy.sample_batch()
            units = self.privacy.units_of(idx)  # with patient-level privacy: each row's patient
            idx = copy_indices_to(idx, self.device)
            self.privacy.private_real_gradient(self.loss.augment(self.real_images[idx]), self.real_labels[idx],
                                               r1_weight, self.loss.d_class_weight, units=units)
            # Opacus' summed per-sample gradients are contiguous; give them each parameter's layout
            # (channels_last) so that the fake term's backward accumulates into them in place.
            match_grad_layouts(self.D)
            # Fake images: G's output for noise z and uniformly drawn labels, so this term reads no
            # private data (D's current weights are already DP, and anything computed from them is
            # post-processing). Its gradient therefore needs no noise: clipping bounds one person's
            # influence and noise hides it, and no person influences this term. Its 1/B mean matches
            # the 1/(q*n) scaling Opacus applied to the real term, as in the non-private loss.
            # dp_clip_fakes clips it per sample too, for balance with the clipped real term.
            if self.cfg.train.dp_clip_fakes:
                loss_fake = add_clipped_fake_gradient(self.D, self.loss.augment(fake), fake_labels,
                                                      max_grad_norm=self.privacy.max_grad_norm).mean()
            else:
                with self.accel.autocast():
                    loss_fake = self.loss.discriminator_fake(fake, fake_labels)
                loss_fake.backward()
            # The real loss stays local (engine.last_private_stats): it was computed without noise.
            stats = {"loss_d_fake": loss_fake.detach()}
            if self.public_images is not None and self.cfg.train.public_real_weight > 0:
                with self.accel.autocast():  # public images, not the Poisson sample: no clip, no noise
                    loss_public = public_real_loss(self.loss, self.public_images, r1_weight, self.cfg.train.batch_size)
                (loss_public * self.cfg.train.public_real_weight).backward()
                stats["loss_d_public"] = loss_public.detach()
            # Count the expected number of real images, not the drawn one: the actual Poisson batch
            # size is not part of what the accountant releases.
            seen = int(round(self.privacy.expected_batch_size))
        else:
            real, real_labels = self.real_batch()
            self.d_opt.zero_grad(set_to_none=True)
            with self.accel.autocast():
                loss_fake = self.loss.discriminator_fake(fake, fake_labels)
                loss_real = self.loss.discriminator_real(real, real_labels, r1_weight)
            (loss_fake + loss_real).backward()
            stats = {"loss_d_fake": loss_fake.detach(), "loss_d_real": loss_real.detach()}
            seen = real.shape[0]
        # The FedProx pull towards the global weights is data-independent: it needs no noise.
        self._add_proximal_gradient("D", self.D)
        _sanitize_gradients(self.D)
        self.d_opt.step()
        self.cur_nimg += seen
        return stats

    def _add_proximal_gradient(self, name: str, module: nn.Module) -> None:
        """FedProx: grad += mu * (w - w_global). Data-independent, so it needs no privacy noise."""
        mu = self.cfg.federation.proximal_mu
        if mu <= 0 or self.proximal_reference is None:
            return
        reference = self.proximal_reference[name]
        for pname, p in module.named_parameters():
            if p.grad is not None and pname in reference:
                p.grad.add_(p.detach() - reference[pname].to(p.device), alpha=mu)

    @torch.no_grad()
    def update_ema(self, g_index: int) -> None:
        """G_ema after G update ``g_index``: a half-life of ``ema_kimg`` thousand fakes, ramped up."""
        t = self.cfg.train
        batch = self.g_batch_size
        ema_nimg = t.ema_kimg * 1000
        seen = (g_index + 1) * batch
        if t.ema_rampup is not None:
            ema_nimg = min(ema_nimg, seen * t.ema_rampup)
        beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
        ema_update_(self.G_ema, self.G, beta)

    def train_steps(self, num_steps: int, *, progress: Optional[Callable[[int, dict[str, float]], None]] = None
                    ) -> dict[str, float]:
        """Run ``num_steps`` G+D steps; returns mean losses plus images/s and images seen."""
        running = DeviceStats()
        start, start_nimg = time.perf_counter(), self.cur_nimg
        for _ in range(num_steps):
            stats = self._train_step()
            running.add(stats)
            if progress is not None:
                progress(self.step, as_floats(stats))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        result = running.means()
        # Each step shows one batch of fakes to G and one of fakes + reals to D.
        result["images_per_second"] = num_steps * self.cfg.train.batch_size / max(elapsed, 1e-9)
        result["real_images_seen"] = float(self.cur_nimg - start_nimg)
        result["seconds"] = elapsed
        for key, value in result.items():
            if not np.isfinite(value):
                log.warning("non-finite training statistic %s=%s at step %d", key, value, self.step)
        return result

    # -- weights (what federation exchanges) -----------------------------------------------------
    def network(self, name: str) -> nn.Module:
        return {"G": self.G, "G_ema": self.G_ema, "D": self.D}[name]

    def get_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        # Contiguous whatever the training layout (channels_last): checkpoints and the wire see one format.
        return {name: {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                       for k, v in self.network(name).state_dict().items()}
                for name in NETWORK_NAMES}

    def set_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in NETWORK_NAMES:
            if name in weights:
                load_state_dict_checked(self.network(name), weights[name], what=name)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "config": self.cfg.to_dict(),
            **self.get_weights(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "step": self.step,
            "cur_nimg": self.cur_nimg,
            "pl_mean": self.loss.pl_mean.detach().cpu(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
        }
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        if self.loss.class_guide is not None:  # under DP its steps are in the privacy state's history
            state[STATE_KEY] = guide_to_state(self.loss.class_guide, guide_settings(self.cfg))
        if self.loss.class_moments is not None:  # under DP its release is in the privacy state's history
            state[MOMENTS_KEY] = self.loss.class_moments.to_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_weights(state)
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        self.step, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])
        self.loss.pl_mean = state["pl_mean"].to(self.device)
        self.sampler.load_state_dict(state["sampler"])
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
        set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Everything above in one checkpoint file (``medstylegan2.runfolder.write_checkpoint``: atomic)."""
        return write_checkpoint(path, self.state_dict())


def _sanitize_gradients(module: nn.Module) -> None:
    # As in StyleGAN2-ADA: one non-finite gradient must not destroy the weights of a long run.
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

