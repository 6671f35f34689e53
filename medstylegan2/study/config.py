"""The study's typed config (``configs/study.yaml``), each arm's run-config overrides, and the
public stand-in data set of the warm-started arms."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import yaml

from medstylegan2.config import ConfigError, load_config
from medstylegan2.config_types import build_dataclass
from medstylegan2.privacy.public_term import PUBLIC_LABEL, public_normal_images


@dataclass
class ProfileSpec:
    # Run-config overrides of this profile (resolution, widths, data size, ...).
    overrides: list[str] = field(default_factory=list)
    # Compute per arm: G updates + D updates, summed over the arm's sites. An arm with
    # train.g_steps_per_d = g and train.d_steps_per_g = d takes
    # total_updates / (sites x rounds x (g + d)) local steps a round.
    total_updates: int = 4800
    # Federation rounds of every arm (one site: rounds of total_steps / rounds local steps).
    rounds: int = 10
    # Generated images per class that every arm is evaluated on.
    n_per_class: int = 500
    # Run seeds; an arm's figures are the mean over them.
    seeds: list[int] = field(default_factory=lambda: [0])
    # Steps of the public-data pretraining (arms with public_init); 0: no arm may use it.
    public_steps: int = 0
    # Steps of the classifiers (real-trained domain classifier, train-on-synthetic).
    classifier_steps: int = 300


@dataclass
class ArmSpec:
    sites: int = 3
    partitioner: Literal["iid", "dirichlet", "quantity"] = "iid"
    dirichlet_alpha: float = 0.3
    # DP-SGD at each site's D to this epsilon over the whole run (None: no DP).
    epsilon: Optional[float] = None
    delta: float = 1e-5
    # Start from the checkpoint pretrained on the public stand-in set (Normal-only phantoms of
    # another seed range), then train on the private sites.
    public_init: bool = False
    # Extra run-config overrides of this arm (applied after the profile's).
    overrides: list[str] = field(default_factory=list)
    # Share of the profile's total_updates this arm takes: below 1 for an arm whose batches are
    # larger (0.25 with 4x the batch: as many images, in fewer, less noisy DP-SGD steps).
    update_fraction: float = 1.0
    # What the arm's updates are counted against: "summed" over its sites (the profile's
    # total_updates shared by them), or "per_site" (each site takes total_updates, as many steps as
    # a one-site arm: equal wall clock, since a federation's sites train at the same time).
    compute: Literal["summed", "per_site"] = "summed"
    # Share of each site's trainer steps over which the class push (D's class head's weight and the
    # class guide's) falls linearly to 0: the class first, then each class's variety (docs/recipe.md,
    # session 23). None: the weights stay as the recipe sets them.
    class_decay: Optional[float] = None


@dataclass
class PublicSpec:
    # Normal-only phantoms rendered from this seed: a seed range the private data never uses.
    data_seed: int = 1_000_003
    per_class: int = 2000
    # Batch of the (non-private) public pretraining; null: the arm's own batch. A DP arm's large
    # Poisson batches buy nothing on public data, where there is no noise to average out.
    batch_size: Optional[int] = None


@dataclass
class StudySpec:
    # The run config every arm starts from (relative to the study file).
    base_config: str = "default.yaml"
    overrides: list[str] = field(default_factory=list)
    public: PublicSpec = field(default_factory=PublicSpec)


@dataclass
class StudyConfig:
    spec: StudySpec
    profiles: dict[str, ProfileSpec]
    arms: dict[str, ArmSpec]
    base_config_path: Path

    def arm_names(self, selected: Optional[Sequence[str]] = None) -> list[str]:
        if not selected:
            return list(self.arms)
        unknown = [a for a in selected if a not in self.arms]
        if unknown:
            raise ConfigError(f"unknown arm '{unknown[0]}'; the study defines: {', '.join(self.arms)}")
        return [a for a in self.arms if a in selected]

    def profile(self, name: str) -> ProfileSpec:
        if name not in self.profiles:
            raise ConfigError(f"unknown profile '{name}'; the study defines: {', '.join(self.profiles)}")
        return self.profiles[name]


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; errors name the file and the dotted key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    allowed = ("base_config", "overrides", "public", "profiles", "arms")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; allowed keys here: {', '.join(allowed)}")
    where = str(path)
    spec = build_dataclass(StudySpec, {k: raw[k] for k in ("base_config", "overrides", "public") if k in raw}, "", where)
    profiles = _named(ProfileSpec, raw.get("profiles"), "profiles", where)
    arms = _named(ArmSpec, raw.get("arms"), "arms", where)
    base = (path.parent / spec.base_config).resolve()
    if not base.is_file():
        raise ConfigError(f"{where}: 'base_config' = {spec.base_config!r}: no such file ({base})")
    study = StudyConfig(spec=spec, profiles=profiles, arms=arms, base_config_path=base)
    _validate(study, where)
    return study


def _named(cls: type, raw: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: '{key}' must be a non-empty mapping of name -> settings")
    return {str(name): build_dataclass(cls, value, f"{key}.{name}.", where) for name, value in raw.items()}


def _validate(study: StudyConfig, where: str) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: '{key}' {msg}")

    for name, p in study.profiles.items():
        k = f"profiles.{name}"
        need(p.rounds > 0, f"{k}.rounds", "must be > 0")
        need(p.n_per_class > 1, f"{k}.n_per_class", "must be > 1")
        need(len(p.seeds) > 0, f"{k}.seeds", "must list at least one seed")
        need(p.public_steps >= 0 and p.classifier_steps > 0, f"{k}.public_steps/classifier_steps",
             "must be >= 0 / > 0")
        for arm_name, arm in study.arms.items():
            need(arm_updates(p, arm) >= 2 * arm.sites * p.rounds, f"{k}.total_updates",
                 f"= {p.total_updates} leaves arm {arm_name} less than one local step a round")
            need(not arm.public_init or p.public_steps > 0, f"{k}.public_steps",
                 f"must be > 0: arm {arm_name} starts from the public pretraining")
    b = study.spec.public.batch_size
    need(b is None or b > 0, "public.batch_size", "must be > 0 (or null: the arm's own batch)")
    for name, arm in study.arms.items():
        k = f"arms.{name}"
        need(arm.sites > 0, f"{k}.sites", "must be > 0")
        need(arm.dirichlet_alpha > 0, f"{k}.dirichlet_alpha", "must be > 0")
        need(arm.epsilon is None or arm.epsilon > 0, f"{k}.epsilon", "must be > 0 (or null: no DP)")
        need(0 < arm.delta <= 1e-5, f"{k}.delta", "must be in (0, 1e-5]")
        need(0 < arm.update_fraction <= 1, f"{k}.update_fraction", "must be in (0, 1]")
        need(arm.class_decay is None or 0 < arm.class_decay <= 1, f"{k}.class_decay", "must be in (0, 1] (or null)")
    # Every (profile, arm) must make a valid run config.
    for pname in study.profiles:
        for arm in study.arms:
            load_config(study.base_config_path, arm_overrides(study, pname, arm, seed=0))


# ----------------------------------------------------------------------------------------------
# One arm's run config


INIT_OVERRIDE = "train.init_checkpoint="  # the warm start an arm with public_init gets


def arm_overrides(study: StudyConfig, profile: str, arm: str, *, seed: int,
                  public_checkpoint: Optional[str | Path] = None) -> list[str]:
    """Run-config overrides (on the study's base config) for one seed of one arm."""
    p, a = study.profile(profile), study.arms[arm]
    out = list(study.spec.overrides) + list(p.overrides) + [
        f"name={arm}", f"seed={seed}",
        f"federation.sites={a.sites}", f"federation.rounds={p.rounds}",
        f"federation.partitioner={a.partitioner}", f"federation.dirichlet_alpha={a.dirichlet_alpha}",
        # The study evaluates every arm itself; the run's own evaluation happens once, at the end.
        "federation.evaluate_every=0", f"metrics.classifier_steps={p.classifier_steps}",
    ]
    if a.epsilon is not None:
        # Scientific notation with a dot: YAML reads "1e-05" as a string, "1.000000e-05" as a number.
        out += ["privacy.enabled=true", f"privacy.target_epsilon={a.epsilon:.6e}", f"privacy.delta={a.delta:.6e}",
                f"privacy.budget_epsilon={a.epsilon:.6e}", "model.mbstd_group_size=0"]
    if a.public_init:
        # The same public set for the arm's D term under DP (train.public_real_weight) as for its pretraining.
        out += [f"data.public_normals={study.spec.public.per_class}", f"data.public_seed={study.spec.public.data_seed}"]
    if a.public_init and public_checkpoint is not None:
        out.append(f"{INIT_OVERRIDE}{Path(public_checkpoint).resolve()}")
    out += list(a.overrides)
    train = load_config(study.base_config_path, out).train
    local_steps = max(1, arm_updates(p, a) // (a.sites * p.rounds * (train.g_steps_per_d + train.d_steps_per_g)))
    out.append(f"federation.local_steps={local_steps}")
    if a.class_decay is not None:
        decay_steps = max(1, round(a.class_decay * local_steps * p.rounds))
        out += ["train.class_loss_weight_end=0.0", f"train.class_loss_decay_steps={decay_steps}"]
        if train.class_guide_weight > 0:
            out += ["train.class_guide_weight_end=0.0", f"train.class_guide_decay_steps={decay_steps}"]
    return out


def arm_updates(profile: ProfileSpec, arm: ArmSpec) -> int:
    """G + D updates the arm may take, summed over its sites: its share of the profile's (each
    site's share with ``compute: per_site``)."""
    sites_counted = arm.sites if arm.compute == "per_site" else 1
    return int(profile.total_updates * arm.update_fraction * sites_counted)


def public_overrides(study: StudyConfig, profile: str, arm: str) -> list[str]:
    """Run-config overrides of the public pretraining for ``arm``: its model and recipe, without DP,
    without a warm start, with all of D trained (``train.d_frozen`` only keeps what this taught).

    What an arm chooses for its private training only does not shape the public pretraining: no
    class guide (a guide of the one-class public set knows no class), D's class term at the
    profile's recipe weight and schedule (an arm may turn it off under DP, where it would share D's
    clip, or let it decay), G's diversity term at the recipe's (an arm may add it against the
    narrowing under DP), G's updates per D update and their batch at the recipe's (an arm may give G
    more of them under DP, where they cost no privacy), and no class moments (a release of the
    private sites' data), D's public real term at the recipe's (an arm may add it under DP:
    the pretraining reads the public set in full anyway), and D's input augmentation at the
    recipe's (an arm may add it for its private training, against D's lead under DP)."""
    recipe = load_config(study.base_config_path, list(study.spec.overrides) + list(study.profile(profile).overrides))
    out = arm_overrides(study, profile, arm, seed=0) + [
        "privacy.enabled=false", "train.init_checkpoint=null", "train.d_frozen=[]", "train.class_guide_weight=0.0",
        "train.class_guide_weight_end=null", f"train.class_guide_decay_steps={recipe.train.class_guide_decay_steps}",
        f"train.class_loss_weight={recipe.train.class_loss_weight}", "train.class_loss_weight_end=null",
        f"train.class_loss_decay_steps={recipe.train.class_loss_decay_steps}",
        f"train.lambda_ds={recipe.train.lambda_ds}", f"train.ds_decay_steps={recipe.train.ds_decay_steps}",
        "train.class_moments_weight=0.0", f"train.class_moments_grid={recipe.train.class_moments_grid}",
        f"train.class_moments_noise={recipe.train.class_moments_noise}",
        f"train.class_moments_spread={recipe.train.class_moments_spread}",
        f"train.g_steps_per_d={recipe.train.g_steps_per_d}",
        f"train.g_batch_size={json.dumps(recipe.train.g_batch_size)}",
        f"train.public_real_weight={recipe.train.public_real_weight}",
        f"train.augment={json.dumps(recipe.train.augment)}",
        # json.dumps: an unset weight must reach the override parser as YAML null, not "None"
        f"train.d_class_loss_weight={json.dumps(recipe.train.d_class_loss_weight)}"]
    if study.spec.public.batch_size is not None:
        out.append(f"train.batch_size={study.spec.public.batch_size}")
    return out


def updates_of(cfg) -> int:
    """G + D updates a run takes, summed over its sites (the study's unit of compute)."""
    f = cfg.federation
    return f.sites * f.rounds * f.local_steps * (cfg.train.g_steps_per_d + cfg.train.d_steps_per_g)


# Run-config keys added after studies were run, with the default they were added at. At that default
# they leave the digests below as they were, so upgrading the code does not orphan finished arms.
KEYS_ADDED_LATER: dict[tuple[str, str], Any] = {("train", "augment"): []}


def digest_view(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``RunConfig.to_dict()`` as the digests read it: without ``KEYS_ADDED_LATER`` at their default."""
    view = {section: dict(values) if isinstance(values, Mapping) else values for section, values in config_dict.items()}
    for (section, key), default in KEYS_ADDED_LATER.items():
        if section in view and view[section].get(key, default) == default:
            view[section].pop(key, None)
    return view


def settings_digest(overrides: Sequence[str], extra: Mapping[str, Any]) -> str:
    """What decides an arm's result: a finished arm is reused only when this is unchanged."""
    text = json.dumps({"overrides": list(overrides), **extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Data shared by every arm


def public_images(study: StudyConfig, resolution: int):
    """The public stand-in set: Normal-only phantoms from a seed range the private data never uses."""
    from medstylegan2.images import ImageSet

    images = public_normal_images(study.spec.public.per_class, resolution, study.spec.public.data_seed)
    return ImageSet(images=images.copy(), labels=np.full(len(images), PUBLIC_LABEL, dtype=np.int64))


def check_public_differs(study: StudyConfig, private_seed: int) -> None:
    if study.spec.public.data_seed == private_seed:
        raise ConfigError(f"public.data_seed ({private_seed}) equals the private data.seed: the public set would "
                          "hold the private images; choose another seed")


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
