"""What the server asks a site for each round, and the site's answer under its own policy.

Every round the server's run config implies a ``RoundRequest`` (``request_from_run_config``: DP on
or off, sigma or a per-run target epsilon, clip norm, delta, batch size, D steps per round,
accountant, noise seed). ``check_request(policy, request)`` returns a ``Decision``: either the
``EffectiveSettings`` the site will train with, or a reason for refusing that the server may log.
The reason is computed from the policy and the request only, never from the site's data, so it
can leave the site under DP. ``check_budget(policy, settings, ledger)`` then asks the site's
lifetime ledger whether this round still fits the data set's lifetime budget.

Under DP the sample rate is ``batch_size / nominal_size`` and the noisy sum is divided by
``batch_size``: both are public (the policy's nominal size, the server's batch size), so neither
depends on the private number of images (see docs/privacy.md, "Adjacency").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from medstylegan2.privacy.accounting import epsilon_of_history, gaussian_release, sigma_for
from medstylegan2.privacy.policy import PolicyError, SitePolicy

if TYPE_CHECKING:
    from medstylegan2.config import RunConfig
    from medstylegan2.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class RoundRequest:
    """The privacy-relevant settings a server asks one site to train a round with."""

    dp: bool
    local_steps: int
    batch_size: int
    noise_multiplier: Optional[float] = None
    # Per-run target: sigma is computed for planned_rounds * local_steps steps.
    target_epsilon: Optional[float] = None
    planned_rounds: Optional[int] = None
    max_grad_norm: Optional[float] = None
    delta: Optional[float] = None
    accountant: Optional[str] = None
    unit: Optional[str] = None
    noise_seed: Optional[int] = None
    # DP-SGD steps of the site's class guide (privacy.class_guide), trained once per run: part of
    # the planned run and of the site's epsilon. None or 0: no guide.
    guide_steps: Optional[int] = None
    # Noise multiplier of the site's class-moments release (privacy.class_moments), made once per
    # run: one Gaussian step at sample rate 1, part of the planned run. None: no class moments.
    moments_noise: Optional[float] = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RoundRequest":
        """Parse a request as it arrived (untrusted): unknown keys or wrong types raise ``PolicyError``."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            raise PolicyError(f"request has unknown key {unknown[0]!r}")
        kinds = {"dp": bool, "local_steps": int, "batch_size": int, "planned_rounds": int, "noise_seed": int,
                 "guide_steps": int, "noise_multiplier": float, "moments_noise": float, "target_epsilon": float,
                 "max_grad_norm": float, "delta": float, "accountant": str, "unit": str}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            kind = kinds[key]
            if value is None:
                if key in ("dp", "local_steps", "batch_size"):
                    raise PolicyError(f"request lacks {key}")
                values[key] = None
            elif kind is bool and isinstance(value, bool):
                values[key] = value
            elif kind is int and isinstance(value, int) and not isinstance(value, bool):
                values[key] = value
            elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
            elif kind is str and isinstance(value, str):
                values[key] = value
            else:
                raise PolicyError(f"request key {key!r} must be {kind.__name__}, got {value!r}")
        missing = [k for k in ("dp", "local_steps", "batch_size") if k not in values]
        if missing:
            raise PolicyError(f"request lacks {', '.join(missing)}")
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """The request as plain values (e.g. for a Flower ConfigRecord); None entries are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def request_from_run_config(cfg: "RunConfig") -> RoundRequest:
    """What a server running ``cfg`` asks every site for (the server half of the run config).

    ``local_steps`` counts noised D updates per round (``federation.local_steps`` trainer steps x
    ``train.d_steps_per_g``): the accountant's steps, which the budget check adds to the ledger.
    ``guide_steps``: the class guide's DP-SGD steps (``train.class_guide_steps``) when it is on;
    ``moments_noise``: the class moments' noise multiplier (``train.class_moments_noise``) when
    they are on under DP.
    """
    p = cfg.privacy
    d_steps = cfg.federation.local_steps * cfg.train.d_steps_per_g
    guide_steps = cfg.train.class_guide_steps if cfg.train.class_guide_weight > 0 else None
    moments_noise = cfg.train.class_moments_noise if p.enabled and cfg.train.class_moments_weight > 0 else None
    return RoundRequest(dp=p.enabled, local_steps=d_steps, batch_size=cfg.train.batch_size,
                        noise_multiplier=p.noise_multiplier if p.enabled else None,
                        target_epsilon=p.target_epsilon if p.enabled else None,
                        planned_rounds=cfg.federation.rounds if p.enabled else None,
                        max_grad_norm=p.max_grad_norm if p.enabled else None,
                        delta=p.delta if p.enabled else None, accountant=p.accountant if p.enabled else None,
                        noise_seed=p.noise_seed, guide_steps=guide_steps, moments_noise=moments_noise)


@dataclass(frozen=True)
class EffectiveSettings:
    """What the site trains this round with: the server's request as the policy allows it."""

    dp: bool
    local_steps: int
    batch_size: int
    unit: str = "image"
    noise_multiplier: Optional[float] = None
    max_grad_norm: Optional[float] = None
    delta: Optional[float] = None
    # q = batch_size / nominal_size, and the public divisor of the noisy sum, q * nominal_size.
    sample_rate: Optional[float] = None
    nominal_size: Optional[int] = None
    nominal_batch_size: Optional[float] = None
    accountant: Optional[str] = None
    guide_steps: int = 0
    moments_noise: Optional[float] = None   # the class moments' sigma under DP (None: no release)


@dataclass(frozen=True)
class Decision:
    """``ok``: train with ``settings``. Otherwise decline; ``reason`` may go to the server's log."""

    ok: bool
    reason: str = ""
    settings: Optional[EffectiveSettings] = None


def _decline(reason: str) -> Decision:
    return Decision(ok=False, reason=reason)


def check_request(policy: SitePolicy, request: RoundRequest | Mapping[str, Any]) -> Decision:
    """Whether the site trains this round as asked, and with what (see the module docstring).

    Declined: DP off when the policy requires it; any noise seed under DP (whoever knows it can
    subtract the noise); sigma (D's, or the class moments') that is not finite, 0 or below the
    noise floor; a per-run epsilon above the policy's (asked for, or implied by sigma over the
    planned steps and the class moments' release); a delta above the policy's; another clip norm,
    accountant or unit than the policy fixes; a batch larger than the nominal size. Nothing here
    reads the site's data.
    """
    if not isinstance(request, RoundRequest):
        try:
            request = RoundRequest.from_mapping(request)
        except PolicyError as exc:
            return _decline(f"malformed request: {exc}")
    if request.local_steps < 1 or request.batch_size < 1:
        return _decline(f"local_steps and batch_size must be >= 1 (got {request.local_steps}, {request.batch_size})")
    guide_steps = request.guide_steps or 0
    if guide_steps < 0:
        return _decline(f"guide_steps must be >= 0 (got {guide_steps})")
    if not request.dp:
        if policy.dp_required:
            return _decline("this site's policy requires differential privacy; a round without DP is refused")
        return Decision(ok=True, settings=EffectiveSettings(dp=False, local_steps=request.local_steps,
                                                            batch_size=request.batch_size, unit=policy.unit,
                                                            guide_steps=guide_steps))

    ready, missing = policy.dp_ready
    if not ready:
        return _decline(f"this site's policy is not set up for DP training (it lacks {missing})")
    if request.noise_seed is not None:
        return _decline("a noise seed from the server is refused under DP: whoever knows it can remove the noise")
    if request.unit is not None and request.unit != policy.unit:
        return _decline(f"this site's unit of privacy is '{policy.unit}', not '{request.unit}'")
    if request.accountant is not None and request.accountant != policy.accountant:
        return _decline(f"this site accounts with '{policy.accountant}', not '{request.accountant}': "
                        "its lifetime epsilon composes under one accountant")
    if request.delta is not None and not 0 < request.delta <= policy.delta:
        return _decline(f"delta {request.delta:g} is above this site's delta {policy.delta:g}")
    delta = policy.delta if request.delta is None else request.delta

    clip = request.max_grad_norm if request.max_grad_norm is not None else policy.max_grad_norm
    if clip is None:
        return _decline("no clip norm: the request gives no max_grad_norm and the site's policy fixes none")
    if not (math.isfinite(clip) and clip > 0):
        return _decline(f"clip norm {clip!r} is not a positive finite number")
    if policy.max_grad_norm is not None and not math.isclose(clip, policy.max_grad_norm, rel_tol=1e-9):
        return _decline(f"this site clips at max_grad_norm {policy.max_grad_norm:g}, not {clip:g}")

    sample_rate = request.batch_size / policy.nominal_size
    if sample_rate > 1:
        return _decline(f"batch size {request.batch_size} is larger than this site's nominal size")
    # The class guide's steps run at the same sigma and q as D's: one more part of the planned run.
    planned_steps = request.local_steps * (request.planned_rounds or 1) + guide_steps
    # The class moments' release is one Gaussian step at its own sigma: a fixed part of the plan.
    moments = request.moments_noise
    if moments is not None:
        if not (math.isfinite(moments) and moments > 0):
            return _decline(f"class moments' noise multiplier {moments!r} gives no privacy: it must be > 0")
        if policy.min_noise_multiplier is not None and moments < policy.min_noise_multiplier:
            return _decline(f"class moments' noise multiplier {moments:.4g} is below this site's floor "
                            f"{policy.min_noise_multiplier:g}")
    fixed = [gaussian_release(moments)] if moments is not None else []

    if (request.noise_multiplier is None) == (request.target_epsilon is None):
        return _decline("give exactly one of noise_multiplier and target_epsilon under DP")
    if request.target_epsilon is not None:
        target = request.target_epsilon
        if not (math.isfinite(target) and target > 0):
            return _decline(f"target epsilon {target!r} is not a positive finite number")
        if policy.epsilon_per_run is not None and target > policy.epsilon_per_run:
            return _decline(f"target epsilon {target:g} is above this site's epsilon per run "
                            f"{policy.epsilon_per_run:g}")
        if request.planned_rounds is None or request.planned_rounds < 1:
            return _decline("a target epsilon needs planned_rounds (the run's length) to compute sigma")
        try:
            sigma = sigma_for(target, delta, sample_rate, planned_steps, policy.accountant, also=fixed)
        except ValueError as exc:
            return _decline(f"target epsilon {target:g} cannot be met with the class moments' release: {exc}")
    else:
        sigma = request.noise_multiplier
        if not (math.isfinite(sigma) and sigma > 0):
            return _decline(f"noise multiplier {sigma!r} gives no privacy: it must be > 0")
    if policy.min_noise_multiplier is not None and sigma < policy.min_noise_multiplier:
        return _decline(f"noise multiplier {sigma:.4g} is below this site's floor {policy.min_noise_multiplier:g}")
    if policy.epsilon_per_run is not None:
        planned_epsilon = epsilon_of_history([(sigma, sample_rate, planned_steps), *fixed], delta, policy.accountant)
        if planned_epsilon > policy.epsilon_per_run * (1 + 1e-9):
            also = f" and the class moments' release at sigma {moments:.4g}" if fixed else ""
            return _decline(f"the planned run ({planned_steps} steps at sigma {sigma:.4g}, q {sample_rate:.4g}{also}) "
                            f"reaches epsilon {planned_epsilon:.4g}, above this site's epsilon per run "
                            f"{policy.epsilon_per_run:g}")
    return Decision(ok=True, settings=EffectiveSettings(
        dp=True, local_steps=request.local_steps, batch_size=request.batch_size, unit=policy.unit,
        noise_multiplier=float(sigma), max_grad_norm=float(clip), delta=float(delta), sample_rate=sample_rate,
        nominal_size=policy.nominal_size, nominal_batch_size=sample_rate * policy.nominal_size,
        accountant=policy.accountant, guide_steps=guide_steps, moments_noise=moments))


def check_budget(policy: SitePolicy, settings: EffectiveSettings, ledger: "PrivacyLedger", *,
                 run: Optional[str] = None, also: Sequence[tuple[float, float, int]] = ()) -> Decision:
    """Whether one more round with ``settings`` keeps the ledger within the policy's budgets.

    ``also``: releases (sigma, q, steps) the round makes besides D's (the class guide's or the
    class moments', when they are made in this round).

    Lifetime: all releases in the ledger plus this round, at the policy's delta (the hard limit).
    Per run: the ledger's releases tagged with ``run`` plus this round (``run`` is the server's
    token, so this cap is only as good as the server's honesty; the lifetime budget is not).
    """
    if not settings.dp:
        return Decision(ok=True, settings=settings)
    extra = [*also, (settings.noise_multiplier, settings.sample_rate, settings.local_steps)]
    lifetime = ledger.epsilon_after(extra, delta=policy.delta, accountant=policy.accountant)
    if policy.lifetime_epsilon is not None and lifetime > policy.lifetime_epsilon:
        return _decline("this round would take the data set past its lifetime privacy budget")
    if policy.epsilon_per_run is not None and run is not None:
        per_run = ledger.epsilon_after(extra, delta=settings.delta, accountant=policy.accountant, run=run)
        if per_run > policy.epsilon_per_run:
            return _decline("this round would take this run past the site's epsilon per run")
    return Decision(ok=True, settings=settings)
