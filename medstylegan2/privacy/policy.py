"""A site's own privacy policy, and the check of every round the server asks for against it.

The policy is a YAML file the site owns (named in the SuperNode's node config); nothing the server
sends can change it. ``load_policy(path)`` reads and validates it once (errors name the file and
the key; unknown keys are rejected). In a simulation, ``policy_from_run_config`` turns the run
config's ``privacy`` section into the same mapping and sends it through the same validation.

What the server asks for each round is checked against the policy in ``privacy.request``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional

import yaml

from medstylegan2.errors import UserError

if TYPE_CHECKING:
    from medstylegan2.config import PrivacyConfig

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
    # unit: patient: CSV with columns image,patient_id (relative paths: relative to the policy file);
    # without it, the patients are the DICOM PatientIDs (hashed at the site).
    patient_csv: Optional[str] = None
    source: str = dataclasses.field(default="policy", compare=False)

    @property
    def dp_ready(self) -> tuple[bool, str]:
        """(whether this policy has everything DP training needs, what is missing)."""
        missing = [key for key in ("lifetime_epsilon", "nominal_size", "ledger_dir") if getattr(self, key) is None]
        if self.min_noise_multiplier is None and self.epsilon_per_run is None:
            missing.append("min_noise_multiplier or epsilon_per_run")
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
    ``budget_epsilon`` (else ``target_epsilon``) -> ``lifetime_epsilon``, ``target_epsilon`` -> ``epsilon_per_run``,
    ``noise_multiplier`` -> ``min_noise_multiplier``, ``delta`` (null: the policy default),
    ``max_grad_norm``, ``accountant``. What the run config cannot know about a site (its ledger
    folder, its nominal size, ``unit``, ``min_site_size``, ``patient_csv``) comes as keywords,
    with the same names and rules as in a policy file.
    """
    raw = _run_config_mapping(privacy)
    for policy_key, value in (("ledger_dir", None if ledger_dir is None else str(ledger_dir)),
                              ("nominal_size", nominal_size)):
        if value is not None:
            raw[policy_key] = value
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
# Simulated sites: one policy file each


def write_site_policies(folder: str | Path, site_sizes: Mapping[str, int], *, ledger_root: str | Path,
                        policy_file: Optional[str | Path] = None, privacy: Optional["PrivacyConfig"] = None
                        ) -> dict[str, Path]:
    """Write ``folder/<site>.yaml`` for every simulated site; returns site -> path.

    A simulation's driver plays every hospital's operator. Each site's policy is the file
    ``policy_file`` (``privacy.policy`` of the run config), else the run config's ``privacy``
    section (``policy_from_run_config``), with what only a site can know filled in: its own ledger
    folder (``<policy's ledger_dir or ledger_root>/<site>``: one ledger per data set) and, when
    the policy fixes none, its own image count as nominal size. Every file goes through
    ``policy_from_mapping`` (errors name the policy and the site) before it is written.
    """
    from medstylegan2.runfolder import atomic_write_text

    if policy_file is not None:
        base_path = Path(policy_file)
        if not base_path.is_file():
            raise PolicyError(f"privacy policy file not found: {base_path}")
        raw_base = yaml.safe_load(base_path.read_text())
        if not isinstance(raw_base, dict):
            raise PolicyError(f"{base_path}: top level must be a mapping of policy keys ({', '.join(POLICY_KEYS)})")
        where_base, base_dir = str(base_path), base_path.parent
    elif privacy is not None:
        raw_base = _run_config_mapping(privacy)
        where_base, base_dir = "run config privacy section", None
    else:
        raise ValueError("give policy_file or privacy")
    written = {}
    for site, size in site_sizes.items():
        raw = dict(raw_base)
        ledgers = Path(raw["ledger_dir"]) if raw.get("ledger_dir") else Path(ledger_root)
        if base_dir is not None and not ledgers.is_absolute() and raw.get("ledger_dir"):
            ledgers = base_dir / ledgers
        raw["ledger_dir"] = str((ledgers / site).resolve())
        if raw.get("nominal_size") is None and size > 0:
            raw["nominal_size"] = int(size)
        if raw.get("patient_csv") and base_dir is not None:
            raw["patient_csv"] = str((base_dir / raw["patient_csv"]).resolve())
        policy_from_mapping(raw, where=f"{where_base} (site {site})", base_dir=base_dir)
        written[site] = atomic_write_text(Path(folder) / f"{site}.yaml", yaml.safe_dump(raw, sort_keys=False))
    return written


def _run_config_mapping(privacy: "PrivacyConfig") -> dict[str, Any]:
    """The run config's privacy section as policy keys (see ``policy_from_run_config``); the lifetime
    budget is ``budget_epsilon``, else ``target_epsilon``."""
    raw: dict[str, Any] = {"dp_required": privacy.enabled, "max_grad_norm": privacy.max_grad_norm,
                           "accountant": privacy.accountant}
    lifetime = privacy.budget_epsilon if privacy.budget_epsilon is not None else privacy.target_epsilon
    for key, value in (("delta", privacy.delta), ("lifetime_epsilon", lifetime),
                       ("epsilon_per_run", privacy.target_epsilon), ("min_noise_multiplier", privacy.noise_multiplier)):
        if value is not None:
            raw[key] = value
    return raw
