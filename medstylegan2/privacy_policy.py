"""A site's own privacy policy, and the check of every round the server asks for against it.

The policy is a YAML file the site owns (named in the SuperNode's node config); nothing the server
sends can change it. ``load_policy(path)`` reads and validates it once (errors name the file and
the key; unknown keys are rejected). In a simulation, ``policy_from_run_config`` turns the run
config's ``privacy`` section into the same mapping and sends it through the same validation.

Every round the server sends a ``RoundRequest`` (DP on or off, sigma or a per-run target epsilon,
clip norm, delta, batch size, local steps, accountant, noise seed). ``check_request(policy,
request)`` returns a ``Decision``: either the ``EffectiveSettings`` the site will train with, or
a reason for declining that the server may log. The reason is computed from the policy and the
request only, never from the site's data, so it can leave the site under DP.
``check_budget(policy, settings, ledger)`` then asks the site's lifetime ledger whether this
round still fits the data set's lifetime budget.

Under DP the sample rate is ``batch_size / nominal_size`` and the noisy sum is divided by
``batch_size``: both are public (the policy's nominal size, the server's batch size), so neither
depends on the private number of images (see docs/privacy.md, "Adjacency").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional

import yaml

from medstylegan2.errors import UserError

if TYPE_CHECKING:
    from medstylegan2.config import PrivacyConfig, RunConfig
    from medstylegan2.privacy_ledger import PrivacyLedger

DEFAULT_DELTA = 1e-5
# The largest delta a policy may set: delta is the probability that the guarantee fails outright,
# and 1e-5 is below 1/n for any data set this project is meant for.
MAX_DELTA = 1e-5
UNITS = ("image", "patient")
ACCOUNTANTS = ("rdp", "prv")


class PolicyError(UserError):
    """A privacy policy file (or the run config standing in for one) is invalid; the message names the key."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows. ``source`` names where it came from (for messages)."""

    dp_required: bool
    delta: float = DEFAULT_DELTA
    # Clip norm C fixed by the site; None lets the server choose it (any C > 0 gives the same
    # epsilon: the noise is sigma * C).
    max_grad_norm: Optional[float] = None
    # Noise floor: the smallest sigma the site accepts.
    min_noise_multiplier: Optional[float] = None
    # The largest epsilon one run may plan (and spend, per the ledger's entries of that run).
    epsilon_per_run: Optional[float] = None
    # The budget of this data set over all runs, composed from the ledger.
    lifetime_epsilon: Optional[float] = None
    # Under DP the site refuses to train with fewer units (images or patients) than this.
    min_site_size: int = 1
    unit: Literal["image", "patient"] = "image"
    accountant: Literal["rdp", "prv"] = "rdp"
    # Public stand-in for the number of units (images, or patients with unit: patient): the FedAvg
    # weight, and sample rate = batch_size / nominal_size (batch_size counts units too).
    nominal_size: Optional[int] = None
    # Folder of the lifetime ledger (relative paths: relative to the policy file).
    ledger_dir: Optional[str] = None
    # unit: patient: CSV with columns image,patient_id (relative paths: relative to the policy file).
    patient_csv: Optional[str] = None
    source: str = dataclasses.field(default="policy", compare=False)

    @property
    def dp_ready(self) -> tuple[bool, str]:
        """(whether this policy has everything DP training needs, what is missing)."""
        missing = [key for key in ("lifetime_epsilon", "nominal_size", "ledger_dir") if getattr(self, key) is None]
        if self.min_noise_multiplier is None and self.epsilon_per_run is None:
            missing.append("min_noise_multiplier or epsilon_per_run")
        if self.unit == "patient" and self.patient_csv is None:
            missing.append("patient_csv")
        return not missing, ", ".join(missing)


POLICY_KEYS = tuple(f.name for f in dataclasses.fields(SitePolicy) if f.name != "source")


# ----------------------------------------------------------------------------------------------
# Loading and validation (one path for policy files and run configs)


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site's policy file; relative paths in it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"privacy policy file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: top level must be a mapping of policy keys ({', '.join(POLICY_KEYS)})")
    return policy_from_mapping(raw, where=str(path), base_dir=path.parent)


def policy_from_mapping(raw: Mapping[str, Any], *, where: str, base_dir: Optional[Path] = None) -> SitePolicy:
    """Validate a policy mapping (from a file or a run config); every error names ``where`` and the key."""

    def fail(key: str, message: str) -> PolicyError:
        return PolicyError(f"{where}: '{key}' {message}")

    unknown = sorted(k for k in raw if k not in POLICY_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(POLICY_KEYS)}")
    if "dp_required" not in raw:
        raise fail("dp_required", "is required (true or false): say whether this site may ever train without DP")

    def number(key: str, *, positive: bool = True) -> Optional[float]:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(key, f"must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise fail(key, f"must be > 0, got {value!r}")
        return float(value)

    def integer(key: str) -> Optional[int]:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(key, f"must be a whole number >= 1, got {value!r}")
        return value

    def choice(key: str, allowed: tuple[str, ...], default: str) -> str:
        value = raw.get(key, default)
        if value not in allowed:
            raise fail(key, f"= {value!r} is not allowed; use one of: {', '.join(allowed)}")
        return value

    def path(key: str) -> Optional[str]:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"must be a path, got {value!r}")
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return str(p)

    dp_required = raw["dp_required"]
    if not isinstance(dp_required, bool):
        raise fail("dp_required", f"must be true or false, got {dp_required!r}")
    delta = number("delta")
    delta = DEFAULT_DELTA if delta is None else delta
    if delta > MAX_DELTA:
        raise fail("delta", f"= {delta:g} is above the largest allowed delta {MAX_DELTA:g}")
    min_site_size = integer("min_site_size")
    policy = SitePolicy(
        dp_required=dp_required, delta=delta, max_grad_norm=number("max_grad_norm"),
        min_noise_multiplier=number("min_noise_multiplier"), epsilon_per_run=number("epsilon_per_run"),
        lifetime_epsilon=number("lifetime_epsilon"), min_site_size=1 if min_site_size is None else min_site_size,
        unit=choice("unit", UNITS, "image"), accountant=choice("accountant", ACCOUNTANTS, "rdp"),
        nominal_size=integer("nominal_size"), ledger_dir=path("ledger_dir"), patient_csv=path("patient_csv"),
        source=where)
    if dp_required:
        ready, missing = policy.dp_ready
        if not ready:
            first = missing.split(", ")[0]
            raise fail(first, f"is required when dp_required is true (missing: {missing}); "
                              "a site that must train with DP needs a lifetime budget, a public nominal size, "
                              "somewhere to keep its ledger, and a noise floor or per-run epsilon")
    if (policy.epsilon_per_run is not None and policy.lifetime_epsilon is not None
            and policy.epsilon_per_run > policy.lifetime_epsilon):
        raise fail("epsilon_per_run", f"= {policy.epsilon_per_run:g} is larger than lifetime_epsilon "
                                      f"= {policy.lifetime_epsilon:g}")
    if policy.nominal_size is not None and policy.min_site_size > policy.nominal_size:
        raise fail("min_site_size", f"= {policy.min_site_size} is larger than nominal_size = {policy.nominal_size}")
    return policy


def policy_from_run_config(privacy: "PrivacyConfig", *, ledger_dir: Optional[str | Path] = None,
                           nominal_size: Optional[int] = None, where: str = "run config privacy section",
                           **site_keys: Any) -> SitePolicy:
    """A simulated site's policy from the run config's ``privacy`` section, through ``policy_from_mapping``.

    The run config stands in for the site's policy file: ``enabled`` -> ``dp_required``,
    ``budget_epsilon`` -> ``lifetime_epsilon``, ``target_epsilon`` -> ``epsilon_per_run``,
    ``noise_multiplier`` -> ``min_noise_multiplier``, ``delta`` (null: the policy default),
    ``max_grad_norm``, ``accountant``. What the run config cannot know about a site (its ledger
    folder, its nominal size, ``unit``, ``min_site_size``, ``patient_csv``) comes as keywords,
    with the same names and rules as in a policy file.
    """
    raw: dict[str, Any] = {"dp_required": privacy.enabled, "max_grad_norm": privacy.max_grad_norm,
                           "accountant": privacy.accountant}
    for policy_key, config_value in (("delta", privacy.delta), ("lifetime_epsilon", privacy.budget_epsilon),
                                     ("epsilon_per_run", privacy.target_epsilon),
                                     ("min_noise_multiplier", privacy.noise_multiplier),
                                     ("ledger_dir", None if ledger_dir is None else str(ledger_dir)),
                                     ("nominal_size", nominal_size)):
        if config_value is not None:
            raw[policy_key] = config_value
    raw.update({k: v for k, v in site_keys.items() if v is not None})
    return policy_from_mapping(raw, where=where)


def check_site_size(policy: SitePolicy, num_units: int) -> None:
    """Under DP, refuse (locally, at start-up) a site with fewer units than ``min_site_size``.

    Raises ``PolicyError`` for the site's operator. What the server sees is that the site does not
    take part: the policy makes "at least min_site_size units" public, nothing more.
    """
    if policy.dp_required and num_units < policy.min_site_size:
        raise PolicyError(f"{policy.source}: this site has {num_units} {policy.unit}s, fewer than "
                          f"min_site_size = {policy.min_site_size}: it does not train under this policy")


# ----------------------------------------------------------------------------------------------
# What the server asks for, and what the site does


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

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RoundRequest":
        """Parse a request as it arrived (untrusted): unknown keys or wrong types raise ``PolicyError``."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            raise PolicyError(f"request has unknown key {unknown[0]!r}")
        kinds = {"dp": bool, "local_steps": int, "batch_size": int, "planned_rounds": int, "noise_seed": int,
                 "noise_multiplier": float, "target_epsilon": float, "max_grad_norm": float, "delta": float,
                 "accountant": str, "unit": str}
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
    """What a server running ``cfg`` asks every site for (the server half of the run config)."""
    p = cfg.privacy
    return RoundRequest(dp=p.enabled, local_steps=cfg.federation.local_steps, batch_size=cfg.train.batch_size,
                        noise_multiplier=p.noise_multiplier if p.enabled else None,
                        target_epsilon=p.target_epsilon if p.enabled else None,
                        planned_rounds=cfg.federation.rounds if p.enabled else None,
                        max_grad_norm=p.max_grad_norm if p.enabled else None,
                        delta=p.delta if p.enabled else None, accountant=p.accountant if p.enabled else None,
                        noise_seed=p.noise_seed)


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
    subtract the noise); sigma that is not finite, 0 or below the noise floor; a per-run epsilon
    above the policy's (asked for, or implied by sigma over the planned steps); a delta above the
    policy's; another clip norm, accountant or unit than the policy fixes; a batch larger than
    the nominal size. Nothing here reads the site's data.
    """
    if not isinstance(request, RoundRequest):
        try:
            request = RoundRequest.from_mapping(request)
        except PolicyError as exc:
            return _decline(f"malformed request: {exc}")
    if request.local_steps < 1 or request.batch_size < 1:
        return _decline(f"local_steps and batch_size must be >= 1 (got {request.local_steps}, {request.batch_size})")
    if not request.dp:
        if policy.dp_required:
            return _decline("this site's policy requires differential privacy; a round without DP is refused")
        return Decision(ok=True, settings=EffectiveSettings(dp=False, local_steps=request.local_steps,
                                                            batch_size=request.batch_size, unit=policy.unit))

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
    planned_steps = request.local_steps * (request.planned_rounds or 1)

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
        sigma = _sigma_for(target, delta, sample_rate, planned_steps, policy.accountant)
    else:
        sigma = request.noise_multiplier
        if not (math.isfinite(sigma) and sigma > 0):
            return _decline(f"noise multiplier {sigma!r} gives no privacy: it must be > 0")
    if policy.min_noise_multiplier is not None and sigma < policy.min_noise_multiplier:
        return _decline(f"noise multiplier {sigma:.4g} is below this site's floor {policy.min_noise_multiplier:g}")
    if policy.epsilon_per_run is not None:
        planned_epsilon = epsilon_of_history([(sigma, sample_rate, planned_steps)], delta, policy.accountant)
        if planned_epsilon > policy.epsilon_per_run * (1 + 1e-9):
            return _decline(f"the planned run ({planned_steps} steps at sigma {sigma:.4g}, q {sample_rate:.4g}) "
                            f"reaches epsilon {planned_epsilon:.4g}, above this site's epsilon per run "
                            f"{policy.epsilon_per_run:g}")
    return Decision(ok=True, settings=EffectiveSettings(
        dp=True, local_steps=request.local_steps, batch_size=request.batch_size, unit=policy.unit,
        noise_multiplier=float(sigma), max_grad_norm=float(clip), delta=float(delta), sample_rate=sample_rate,
        nominal_size=policy.nominal_size, nominal_batch_size=sample_rate * policy.nominal_size,
        accountant=policy.accountant))


def check_budget(policy: SitePolicy, settings: EffectiveSettings, ledger: "PrivacyLedger", *,
                 run: Optional[str] = None) -> Decision:
    """Whether one more round with ``settings`` keeps the ledger within the policy's budgets.

    Lifetime: all releases in the ledger plus this round, at the policy's delta (the hard limit).
    Per run: the ledger's releases tagged with ``run`` plus this round (``run`` is the server's
    token, so this cap is only as good as the server's honesty; the lifetime budget is not).
    """
    if not settings.dp:
        return Decision(ok=True, settings=settings)
    extra = (settings.noise_multiplier, settings.sample_rate, settings.local_steps)
    lifetime = ledger.epsilon_after([extra], delta=policy.delta, accountant=policy.accountant)
    if policy.lifetime_epsilon is not None and lifetime > policy.lifetime_epsilon:
        return _decline("this round would take the data set past its lifetime privacy budget")
    if policy.epsilon_per_run is not None and run is not None:
        per_run = ledger.epsilon_after([extra], delta=settings.delta, accountant=policy.accountant, run=run)
        if per_run > policy.epsilon_per_run:
            return _decline("this round would take this run past the site's epsilon per run")
    return Decision(ok=True, settings=settings)


# ----------------------------------------------------------------------------------------------
# Opacus accounting shared by the policy and the ledger


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a list of (sigma, q, steps) with Opacus' accountant; inf if unbounded."""
    from opacus.accountants import create_accountant

    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")


def _sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
