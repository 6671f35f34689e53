"""The DP-SGD engine of one site's discriminator: Poisson batches, private gradients, accounting.

What it offers the trainer, which owns D's whole step:

- ``bind(D, optimizer, ...)``: validate D (``privacy.validation``) and take note of D's parameters
  and their optimizer, before any training;
- ``sample_batch()``: the indices of the next Poisson-sampled batch of the site's images;
- ``private_real_gradient(real, labels, r1_weight, class_weight)``: set every ``p.grad`` of D to the
  clipped and noised gradient of that batch's real-data loss (class head's term included), and
  account one step.

Three separable pieces, as Opacus itself keeps them:

1. Per-sample gradients (``privacy.per_sample``, with ``torch.func``): exact per-sample gradients
   of ``softplus(-D(x)) + r1_weight * ||grad_x D(x)||^2``.
2. Clipping and noise: Opacus' ``DPOptimizer`` wraps the trainer's Adam for D, reads the
   per-sample gradients from ``p.grad_sample``, clips each sample's whole gradient to
   ``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and divides
   by the expected batch size ``q * n``.
3. Accounting: an Opacus accountant (RDP or PRV) steps once per D update through the optimizer's
   step hook; epsilon is ``accountant.get_epsilon(delta)``. Its ``history`` is part of
   ``state_dict()``, so a site that resumes (checkpoint, Flower ``Context.state``) keeps composing
   the same budget across rounds.

Sampling: every D step draws its real batch by Poisson sampling, each of the site's ``n`` images
independently with probability ``q = batch_size / n``, with Opacus' own
``UniformWithReplacementSampler`` driven by the engine's own ``torch.Generator``. That is the
sampling the accountants assume. Batches vary in size and may be empty: an empty batch is still a
step (noise only) and still counted. Two options make the release independent of the private
``n`` and change the unit of privacy (see docs/privacy.md, "Adjacency"):

- ``nominal_size``: a public constant standing in for ``n``: ``q = batch_size / nominal_size`` and
  the noisy sum is divided by ``q * nominal_size``, so neither depends on ``n``;
- ``groups``: a unit (patient) per image. Units are Poisson-sampled, each sampled unit's images'
  gradients are summed (``sum_per_unit``) and that sum is clipped: epsilon is then per patient.

Randomness: both generators (sampling, noise) are seeded from OS entropy every time an engine is
made and are never saved or restored (``state_dict`` holds the accountant only): a repeated round
draws fresh noise, so two releases can never share noise that their difference would cancel.
``seed`` (``privacy.noise_seed``) makes them reproducible for tests and debugging, at the cost of
the guarantee against anyone who knows the seed.

The threat model (what this protects and what it does not) is in ``docs/privacy.md``.
"""

from __future__ import annotations

import io
import logging
import secrets
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn as nn
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from medstylegan2.errors import PrivacyError
from medstylegan2.privacy.accounting import epsilon_of_history, sigma_for
from medstylegan2.privacy.group_clip import clip_by_group, parameter_groups
from medstylegan2.privacy.per_sample import padded_batch_size, per_sample_real_gradients
from medstylegan2.privacy.units import UnitIndex, sum_per_unit
from medstylegan2.privacy.validation import validate_discriminator

if TYPE_CHECKING:
    from medstylegan2.config import RunConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "medstylegan2-privacy-v1"


def default_delta(num_examples: int) -> float:
    """The default per-site delta: 1 / (10 n), well below the 1/n at which DP stops meaning much."""
    return 1.0 / (10.0 * num_examples)


# ----------------------------------------------------------------------------------------------
# Randomness


def fresh_generator_seeds(seed: Optional[int] = None) -> tuple[torch.Generator, int]:
    """(sampling generator, noise seed), both from OS entropy unless ``seed`` is given (debugging only).

    Called for every new engine, i.e. every round: nothing is ever restored, so no two releases
    share a noise or sampling stream.
    """
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(62)), secrets.randbits(62)
    return torch.Generator().manual_seed(seed), (seed * 2654435761 + 1) % (2**62)


# ----------------------------------------------------------------------------------------------
# The engine


class DPEngine:
    """One site's DP-SGD for D: Poisson sampling, per-sample grads, Opacus clip+noise, accountant.

    Build it with ``make_privacy_engine`` (from a config) or directly; hand it to ``SiteTrainer``
    (``privacy=engine``), which calls ``bind`` once and, every D step, ``sample_batch`` and
    ``private_real_gradient``. Persist ``state_dict()`` (or ``to_bytes()``) with the site and restore it into the next
    engine so that epsilon keeps composing.
    """

    def __init__(self, *, num_examples: int, batch_size: int, max_grad_norm: float,
                 noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None,
                 planned_steps: Optional[int] = None, planned_also: Sequence[tuple[float, float, int]] = (),
                 delta: Optional[float] = None, accountant: str = "rdp",
                 budget_epsilon: Optional[float] = None, seed: Optional[int] = None,
                 nominal_size: Optional[int] = None, groups: Optional[Sequence[int] | torch.Tensor] = None):
        if num_examples <= 0:
            raise PrivacyError("a site needs at least one training image to train with differential privacy")
        if nominal_size is not None and nominal_size <= 0:
            raise PrivacyError(f"the nominal size must be a positive count, got {nominal_size}")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise PrivacyError("give exactly one of privacy.noise_multiplier and privacy.target_epsilon")
        if target_epsilon is not None and not planned_steps:
            raise PrivacyError("privacy.target_epsilon needs the planned number of D steps (rounds x local steps)")
        if max_grad_norm <= 0:
            raise PrivacyError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}")
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        # The unit of privacy: one image, or (with ``groups``) one patient and all their images.
        self.units = UnitIndex(groups, self.num_examples) if groups is not None else None
        self.num_units = self.units.num_units if self.units is not None else self.num_examples
        self.nominal_size = None if nominal_size is None else int(nominal_size)
        rate_base = self.nominal_size if self.nominal_size is not None else self.num_units
        # Poisson sampling rate. A site with fewer units than a batch samples every unit every
        # step (q = 1): no amplification by subsampling.
        self.sample_rate = min(1.0, self.batch_size / rate_base)
        if self.sample_rate >= 1.0:
            log.warning("%d units <= batch size %d: sample rate is 1, so privacy gets no amplification "
                        "by subsampling", rate_base, self.batch_size)
        if self.nominal_size is not None and not 0.5 <= self.num_units / self.nominal_size <= 2.0:
            log.warning("the site has %d units but its nominal size is %d: the real-data gradient is scaled by "
                        "%.3g (local log only)", self.num_units, self.nominal_size, self.num_units / self.nominal_size)
        # Opacus divides the summed clipped gradients + noise by this (loss_reduction="mean"):
        # the same 1/B the non-private mean loss has, in expectation. It is q * nominal_size when
        # a nominal size is given: a public constant, never the private count.
        self.expected_batch_size = self.sample_rate * rate_base
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta) if delta is not None else default_delta(rate_base)
        self.accountant_name = accountant
        self.accountant = create_accountant(mechanism=accountant)
        self.budget_epsilon = budget_epsilon
        self.target_epsilon = target_epsilon
        self.planned_steps = planned_steps
        self.planned_also = tuple(planned_also)  # releases at fixed settings the target also covers
        self._noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)

        self._debug_seed = seed
        self.sampling_generator, self._noise_seed = fresh_generator_seeds(seed)
        self.sampler = UniformWithReplacementSampler(num_samples=self.num_units, sample_rate=self.sample_rate,
                                                     generator=self.sampling_generator, steps=1)
        # The noise generator lives on D's device (torch.normal needs that); it is made at the first step.
        self.noise_generator: Optional[torch.Generator] = None

        self.D: Optional[nn.Module] = None
        self.pad_to: Optional[int] = None        # set by bind(): fixed padded batch size on GPUs
        self.compile_per_sample = False           # set by bind(): torch.compile on GPUs
        self.layer_gradients = True               # steps without R1: privacy.layer_grads (same values as vmap)
        self.vmap_chunk_size: Optional[int] = None  # set by bind(): R1 steps' vmap in chunks on CPUs
        self.d_optimizer: Optional[torch.optim.Optimizer] = None  # D's own optimizer, wrapped by ``optimizer``
        self.optimizer: Optional[DPOptimizer] = None
        self._named_params: list[tuple[str, nn.Parameter]] = []
        self.clip_groups: list[list[str]] = []    # set by bind(): parameter names clipped apart (group_clip)
        # Statistics computed from real images: for local logs only, never part of a reply.
        self.last_private_stats: dict[str, float] = {}

    # -- noise level ------------------------------------------------------------------------------
    @property
    def noise_multiplier(self) -> float:
        """sigma: given, or computed once for the whole planned run from ``target_epsilon``."""
        if self._noise_multiplier is None:
            self._noise_multiplier = sigma_for(self.target_epsilon, self.delta, self.sample_rate, self.planned_steps,
                                               self.accountant_name, also=self.planned_also)
            log.info("noise multiplier %.4f for epsilon %.3g at delta %.3g after %d steps (q=%.4g)",
                     self._noise_multiplier, self.target_epsilon, self.delta, self.planned_steps, self.sample_rate)
        return self._noise_multiplier

    # -- binding to D ------------------------------------------------------------------------------
    def bind(self, D: nn.Module, optimizer: torch.optim.Optimizer, *, num_examples: int, batch_size: int,
             clip_groups: Sequence[str] = ()) -> None:
        """Validate D and note its parameters and optimizer (the trainer calls this at construction);
        ``clip_groups``: D parameter-name prefixes clipped apart (``privacy.group_clip``).

        Fails here, before any training, if D, the site's image count or the batch size do not fit
        this engine. The ``DPOptimizer`` around ``optimizer`` is made at the first step, so that a
        state restored in between (``load_state_dict``) supplies sigma instead of a fresh
        ``target_epsilon`` search.
        """
        validate_discriminator(D)
        if num_examples != self.num_examples:
            raise PrivacyError(f"the privacy engine was made for {self.num_examples} images but the trainer has "
                               f"{num_examples}; the sample rate depends on it: make the engine with the "
                               "site's own image count")
        if batch_size != self.batch_size:
            raise PrivacyError(f"the privacy engine was made for batch size {self.batch_size} but the trainer uses "
                               f"{batch_size}")
        # DP-SGD covers what the optimizer trains; a frozen parameter (train.d_frozen) never changes.
        opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(name, p) for name, p in D.named_parameters() if id(p) in opt_params]
        if not named or len(named) != len(opt_params):
            raise PrivacyError("the D optimizer must hold D's trainable parameters and nothing else")
        self.D, self.d_optimizer, self._named_params, self.optimizer = D, optimizer, named, None
        self.clip_groups = parameter_groups([name for name, _ in named], list(clip_groups)) if clip_groups else []
        # On a GPU: Poisson batches padded to one fixed size (static shapes, masked blank rows that
        # contribute exactly nothing and change no accounting: per_sample.per_sample_real_gradients)
        # and a compiled per-sample function. On a CPU padding would only add work: exact sizes.
        on_cuda = bool(named) and named[0][1].device.type == "cuda"
        self.pad_to = padded_batch_size(self.expected_batch_size, self.num_examples) if on_cuda else None
        self.compile_per_sample = on_cuda
        # On a CPU the R1 steps' vmap runs over chunks of 64 samples: the same values, a third less
        # peak memory at batch 256 (per_sample_real_gradients). A GPU keeps the whole padded batch.
        self.vmap_chunk_size = None if on_cuda else 64

    def _dp_optimizer(self) -> DPOptimizer:
        if self.optimizer is None:
            assert self.D is not None and self.d_optimizer is not None, "bind(D, optimizer) first"
            self._make_noise_generator(next(self.D.parameters()).device)
            self.optimizer = DPOptimizer(self.d_optimizer, noise_multiplier=self.noise_multiplier,
                                         max_grad_norm=self.max_grad_norm,
                                         expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                         generator=self.noise_generator)
            # Opacus' own accounting hook: one accountant step at this sample rate per noised update.
            self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return self.optimizer

    def _make_noise_generator(self, device: torch.device | str) -> None:
        self.noise_generator = torch.Generator(device=torch.device(device)).manual_seed(self._noise_seed)
        if self.optimizer is not None:
            self.optimizer.generator = self.noise_generator

    # -- one D step (the trainer's) ------------------------------------------------------------------
    def sample_batch(self) -> torch.Tensor:
        """Image indices of one Poisson-sampled batch (may be empty).

        Each unit is taken with probability q: an image, or with ``groups`` a patient with all of
        their images (see ``units_of``).
        """
        units = torch.as_tensor(next(iter(self.sampler)), dtype=torch.long)
        return units if self.units is None else self.units.images_of(units)

    def units_of(self, image_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The unit (patient) of each image index, or None when the unit is the image itself."""
        return None if self.units is None else self.units.unit_of_image[image_indices.cpu()]

    def private_real_gradient(self, real: torch.Tensor, labels: torch.Tensor, r1_weight: float,
                              class_weight: float = 0.0, units: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Set every D ``p.grad`` to the private real-data gradient and count one accountant step.

        That is (sum of per-unit gradients, each clipped to C, + N(0, (sigma C)^2)) / (q n), where
        a unit's gradient is one image's or, with ``units`` (the unit of each row, ``units_of``),
        the sum over that unit's rows. ``real``/``labels`` must be a Poisson-sampled batch
        (``sample_batch``, possibly empty). Returns the per-image real losses (private: for local
        logs only, as ``last_private_stats``).
        """
        assert self.D is not None, "bind(D, optimizer) first"
        grads, losses, order = per_sample_real_gradients(self.D, real, labels, r1_weight, class_weight,
                                                         pad_to=self.pad_to, compile=self.compile_per_sample,
                                                         layer_gradients=self.layer_gradients,
                                                         chunk_size=self.vmap_chunk_size)
        if units is not None:
            m = len(order)  # padded rows (GPU) are nobody's: only the m real rows have a patient
            grads = sum_per_unit({k: g[:m] for k, g in grads.items()}, units.to(order.device)[order])
        self.clip_and_noise(grads)
        self.last_private_stats = {"loss_d_real": float(losses.mean()) if len(losses) else float("nan"),
                                   "real_batch_size": float(len(losses))}
        log.debug("private D stats (not shared): %s", self.last_private_stats)
        return losses

    def clip_and_noise(self, per_sample_grads: dict[str, torch.Tensor]) -> None:
        """Opacus' part: per-sample gradients (``[m, *shape]`` per parameter name) -> ``p.grad``."""
        opt = self._dp_optimizer()
        opt.zero_grad(set_to_none=True)
        # Each group to C / sqrt(G) first: the whole stays within C (privacy.group_clip).
        grads = clip_by_group(per_sample_grads, self.clip_groups, self.max_grad_norm)
        for name, p in self._named_params:
            # A non-finite per-sample gradient would make its clip factor NaN and poison the sum;
            # sanitizing one sample's gradient is a per-sample map, so clipping still bounds it.
            p.grad_sample = torch.nan_to_num(grads[name], nan=0.0, posinf=1e5, neginf=-1e5)
        # Clip, sum, add noise, divide by q*n, then the accountant hook. An empty batch gives
        # noise only and is still a step.
        stepped = opt.pre_step()
        assert stepped, "DPOptimizer skipped a step; step skipping is not used here"

    # -- accounting -------------------------------------------------------------------------------
    @property
    def spent_steps(self) -> int:
        """Noised D updates accounted so far (all rounds)."""
        return int(sum(steps for _, _, steps in self.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at this engine's delta (all rounds), from the Opacus accountant."""
        return epsilon_of(self.accountant, self.delta)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon if ``extra_steps`` more updates were taken (the real accountant is untouched)."""
        extra = [(self.noise_multiplier, self.sample_rate, int(extra_steps))] if extra_steps > 0 else []
        return epsilon_of_history([*self.accountant.history, *extra], self.delta, self.accountant_name)

    def would_exceed_budget(self, next_steps: int) -> bool:
        """True when ``next_steps`` more updates would take epsilon past ``budget_epsilon``."""
        if self.budget_epsilon is None:
            return False
        return self.epsilon_after(next_steps) > self.budget_epsilon

    def round_record(self, round_num: int) -> dict[str, Any]:
        """This site's entry of ``privacy.json`` for a round it trained (cumulative steps)."""
        return {"round": int(round_num), "epsilon": self.epsilon(), "delta": self.delta,
                "sample_rate": self.sample_rate, "steps": self.spent_steps,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm}

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed site needs: the accountant history and sigma.

        Never the noise or sampling generators: a restored generator would replay noise that a
        release already used, and two releases with the same noise reveal their difference.
        """
        return {
            "format": STATE_FORMAT,
            "accountant": self.accountant_name,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "num_examples": self.num_examples,
            "delta": self.delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise PrivacyError(f"not a privacy state (expected format {STATE_FORMAT!r})")
        if state["accountant"] != self.accountant_name:
            raise PrivacyError(f"the saved privacy state used the {state['accountant']!r} accountant but the config "
                               f"says {self.accountant_name!r}; epsilon cannot compose across accountants")
        if int(state["num_examples"]) != self.num_examples:
            log.warning("site had %d images when its privacy state was saved and has %d now",
                        int(state["num_examples"]), self.num_examples)
        self.accountant.load_state_dict({"history": [(float(s), float(q), int(n)) for s, q, n in state["history"]],
                                         "mechanism": self.accountant_name})
        if self.target_epsilon is not None:
            # Computed once for the whole planned run: keep the sigma the run started with.
            self._noise_multiplier = float(state["noise_multiplier"])
        if self._noise_multiplier is not None and self.optimizer is not None:
            self.optimizer.noise_multiplier = self._noise_multiplier
        # Generator states in an older state (keys sampling_generator/noise_generator) are ignored
        # on purpose: see state_dict.
        if self._debug_seed is not None:
            # A debugging seed stays reproducible, but a later round must not replay the streams of
            # an earlier one: mix in how many steps the restored history already holds.
            generator, self._noise_seed = fresh_generator_seeds((self._debug_seed * 1_000_003 + self.spent_steps)
                                                                % (2**62))
            self.sampling_generator.set_state(generator.get_state())
            if self.noise_generator is not None:
                self.noise_generator.manual_seed(self._noise_seed)

    def to_bytes(self) -> bytes:
        """``state_dict()`` as bytes (e.g. for a Flower ``ConfigRecord`` in ``Context.state``)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_bytes(self, data: bytes) -> None:
        self.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))

    def describe(self) -> str:
        budget = "none" if self.budget_epsilon is None else f"{self.budget_epsilon:g}"
        unit = "image" if self.units is None else f"patient ({self.num_units} patients)"
        return (f"DP-SGD on D: n={self.num_examples}, unit={unit}, q={self.sample_rate:.4g}, "
                f"sigma={self.noise_multiplier:.4g}, C={self.max_grad_norm:g}, delta={self.delta:.3g}, "
                f"accountant={self.accountant_name}, "
                f"epsilon so far {self.epsilon():.4g} after {self.spent_steps} steps, budget {budget}")


def epsilon_of(accountant: Any, delta: float) -> float:
    """Epsilon at ``delta`` of an Opacus accountant's history: 0 with no noised step, inf when unbounded."""
    return epsilon_of_history(accountant.history, delta, accountant.mechanism())


def make_privacy_engine(cfg: "RunConfig", num_examples: int, planned_steps: int, seed: int = 0,
                        planned_also: Sequence[tuple[float, float, int]] = ()) -> Optional[DPEngine]:
    """The site's DP engine for ``cfg.privacy``, or None when privacy is off.

    ``planned_steps``: D steps this site may take in the whole run (rounds x local steps), used to
    compute sigma from ``target_epsilon`` once; ``planned_also``: releases at fixed settings
    (sigma, q, steps) that epsilon must cover too. ``seed``: a per-site number (e.g. the partition
    id) mixed with ``privacy.noise_seed`` when that is set; with ``noise_seed`` null the
    generators are seeded from OS entropy and ``seed`` is ignored.
    """
    p = cfg.privacy
    if not p.enabled:
        return None
    generator_seed = None if p.noise_seed is None else (p.noise_seed * 1_000_003 + seed) % (2**62)
    return DPEngine(num_examples=num_examples, batch_size=cfg.train.batch_size, max_grad_norm=p.max_grad_norm,
                    noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon,
                    planned_steps=planned_steps, planned_also=planned_also, delta=p.delta, accountant=p.accountant,
                    budget_epsilon=p.budget_epsilon, seed=generator_seed)
