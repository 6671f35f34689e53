"""One typed configuration for every entry point, loaded from YAML and validated once.

Every section is a dataclass with defaults; ``load_config`` reads a YAML file, rejects unknown keys
(naming the full dotted key and the keys that are allowed), checks types and allowed values, and
applies ``key.path=value`` overrides from the command line before validation.

A config file may extend another: ``base: other.yaml`` (a path relative to the file that names it)
takes every key of ``other.yaml`` (which may have a base of its own) and the file's own keys win,
section by section and key by key; a list (e.g. ``metrics.metrics``) is replaced as a whole. Each
file's keys are checked on their own, so a mistake in a base names the base file; a cycle of
bases is an error naming the chain.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml

from medstylegan2.errors import UserError

CLASS_NAMES: tuple[str, ...] = ("Normal", "COVID-19", "Non-COVID")
# The key of a config file that names the file it extends.
BASE_KEY = "base"


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


@dataclass
class ModelConfig:
    arch: Literal["stylegan2", "dcgan"] = "stylegan2"
    resolution: int = 64
    channels: int = 1
    num_classes: int = 3
    z_dim: int = 128
    w_dim: int = 128
    mapping_layers: int = 4
    # Feature maps at resolution r: min(channel_base // r, channel_max). The defaults are sized for
    # CPU runs on the embedded phantoms; configs/covidqu-256.yaml uses paper-scale widths.
    channel_base: int = 1024
    channel_max: int = 64
    # Minibatch standard deviation in D; 0 disables it (required under differential privacy,
    # since it mixes samples of one batch).
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    # Dimension of the class embedding that D projects its features onto.
    cmap_dim: int = 64
    # Seed paper's high-pass filter weight (StarGAN v2 ``w_hpf``); 0 disables the filter branch.
    w_hpf: float = 0.0


@dataclass
class TrainConfig:
    batch_size: int = 16
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    beta1: float = 0.0
    beta2: float = 0.99
    # R1 weight gamma; lazily applied every r1_interval D steps (0 disables).
    r1_gamma: float = 0.1
    r1_interval: int = 16
    # Path-length regularization weight; lazily applied every pl_interval G steps (0 disables).
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    style_mixing_prob: float = 0.9
    # EMA half-life in thousands of images, ramped up over the first steps (fraction of images seen).
    ema_kimg: float = 1.0
    ema_rampup: Optional[float] = 0.05
    # Seed paper's diversity-sensitive ("style difference") loss weight (StarGAN v2 ``lambda_ds``,
    # seed value 2), linearly decayed to zero over ds_decay_steps G steps; 0 disables it.
    lambda_ds: float = 0.0
    ds_decay_steps: int = 10000
    truncation_psi: float = 1.0
    grid_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    # How fast, not what (medstylegan2/acceleration.py): "auto" = bf16 autocast on CUDA GPUs with
    # bf16 (weights, optimizer state and losses stay fp32), fp32 on CPU; "bf16" forces autocast.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Layout of activations and conv weights; "auto" = channels_last on every device.
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    # torch.compile G's synthesis and D where no double backward runs (R1, path length stay eager).
    compile: bool = False


@dataclass
class DataConfig:
    # "phantoms": the embedded procedural generator; "folder": DIR/<class>/*.png;
    # "covidqu": a COVID-QU-Ex root (Kaggle layout, nested or not).
    source: Literal["phantoms", "folder", "covidqu"] = "phantoms"
    root: Optional[str] = None
    # Phantom images generated per class (training + held-out).
    phantoms_per_class: int = 300
    # Fraction of every class kept apart as the held-out set (folder/phantom sources; COVID-QU-Ex
    # uses its own Test split).
    heldout_fraction: float = 0.2
    # Cap on images per class read from disk (None: all).
    max_per_class: Optional[int] = None
    cache_dir: Optional[str] = ".cache/medstylegan2"
    seed: int = 0


@dataclass
class FederationConfig:
    sites: int = 3
    rounds: int = 10
    local_steps: int = 50
    fraction_train: float = 1.0
    min_sites: int = 1
    partitioner: Literal["iid", "dirichlet", "quantity"] = "iid"
    dirichlet_alpha: float = 0.5
    # Quantity skew: site sizes drawn from a Dirichlet with this concentration.
    quantity_alpha: float = 1.0
    aggregation: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    server_lr: float = 1.0
    # FedAvgM momentum; FedAdam's beta1.
    server_momentum: float = 0.9
    # FedAdam only: second-moment decay and the adaptivity floor tau.
    server_beta2: float = 0.99
    server_tau: float = 0.001
    # FedProx-style proximal term on local G and D weights; 0 disables.
    proximal_mu: float = 0.0
    # float16/int8: the sites send their update (int8: per-tensor scale, error feedback kept at
    # the site) and receive the weights in that format; float32 sends weights as they are.
    transfer_dtype: Literal["float32", "float16", "int8"] = "float32"
    evaluate_every: int = 1
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    # Seconds the server waits for federation.sites sites to connect before it starts with the
    # ones present (at least min_sites), and for the replies of one round.
    connect_timeout_s: float = 600.0
    round_timeout_s: float = 3600.0
    # Round checkpoints kept in the run folder (the newest N); 0 keeps every round.
    keep_checkpoints: int = 0


@dataclass
class PrivacyConfig:
    enabled: bool = False
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    # None: 1 / (10 * n_site) for each site.
    delta: Optional[float] = None
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    budget_epsilon: Optional[float] = None
    # Seed of the DP noise and Poisson sampling. None (default): fresh OS entropy per site, kept
    # only in the site's own state. An integer makes runs reproducible (tests, debugging) but
    # voids the guarantee against anyone who knows it: they can subtract the noise.
    noise_seed: Optional[int] = None


@dataclass
class MetricsConfig:
    # Folder with feature-network weights; falls back to $TORCH_HOME/hub/checkpoints.
    weights_dir: Optional[str] = None
    n_per_class: int = 200
    metrics: list[str] = field(default_factory=lambda: ["fd_domain", "kid_domain", "pr_domain", "lpips"])
    classifier_steps: int = 300
    batch_size: int = 64


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        _check_semantics(self)
        return self


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply ``a.b=value`` overrides, return a validated config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_config_mapping(path)
    for item in overrides or []:
        _apply_override(raw, item)
    where = str(path) if path is not None else "config"
    cfg = from_dict(raw, where=where)
    return cfg.validate()


def from_dict(raw: dict[str, Any], where: str = "config") -> RunConfig:
    return _build(RunConfig, raw, prefix="", where=where)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file with its ``base:`` chain merged in (without the ``base`` key)."""
    return _read_with_bases(Path(path), chain=())


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    raw = _read_yaml_mapping(path)
    base = raw.pop(BASE_KEY, None)
    _build(RunConfig, raw, prefix="", where=str(path))  # this file's own keys and types, named by this file
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: '{BASE_KEY}' must be the path of the config file this one extends "
                          f"(relative to {path.parent}), got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: '{BASE_KEY}' names {base_path}, which is not a file")
    seen = (*chain, path)
    if any(base_path.resolve() == p.resolve() for p in seen):
        raise ConfigError("config files extend each other in a cycle: "
                          + " -> ".join(str(p) for p in (*seen, base_path)))
    return _merged(_read_with_bases(base_path, seen), raw)


def _merged(base: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``derived``: mappings merge key by key (the derived value wins), anything else
    (numbers, strings, lists) is replaced. A section left empty in the derived file keeps the base's."""
    out = dict(base)
    for key, value in derived.items():
        if isinstance(out.get(key), dict) and (isinstance(value, dict) or value is None):
            out[key] = _merged(out[key], value or {})
        else:
            out[key] = value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def _build(cls: type, raw: Any, prefix: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{where}: unknown key '{key}'; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, where: str):
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.", where=where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, where)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' = {value!r} is not allowed; use one of: "
                              f"{', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item_type,) = get_args(hint)
        return [_coerce(item_type, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    return value


def _check_semantics(cfg: RunConfig) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"'{key}' {msg}")

    m, t, d, f, p = cfg.model, cfg.train, cfg.data, cfg.federation, cfg.privacy
    need(m.resolution >= 8 and (m.resolution & (m.resolution - 1)) == 0, "model.resolution",
         f"must be a power of two >= 8 (e.g. 32, 64, 128, 256), got {m.resolution}")
    need(m.channels == 1, "model.channels", "must be 1: chest X-rays are grayscale")
    need(m.num_classes == len(CLASS_NAMES), "model.num_classes",
         f"must be {len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)})")
    need(m.w_hpf >= 0, "model.w_hpf", "must be >= 0")
    for key in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "cmap_dim"):
        need(getattr(m, key) > 0, f"model.{key}", "must be > 0")
    need(m.mbstd_group_size >= 0, "model.mbstd_group_size", "must be >= 0 (0 disables it)")
    need(t.batch_size > 0, "train.batch_size", "must be > 0")
    need(t.r1_interval > 0 and t.pl_interval > 0, "train.r1_interval/pl_interval", "must be > 0")
    need(0 <= t.style_mixing_prob <= 1, "train.style_mixing_prob", "must be in [0, 1]")
    need(t.lambda_ds >= 0, "train.lambda_ds", "must be >= 0")
    need(0 < t.truncation_psi <= 1, "train.truncation_psi", "must be in (0, 1]")
    need(0 <= d.heldout_fraction < 1, "data.heldout_fraction", "must be in [0, 1)")
    need(d.source == "phantoms" or d.root is not None, "data.root",
         f"is required when data.source is '{d.source}'")
    need(d.phantoms_per_class > 0, "data.phantoms_per_class", "must be > 0")
    need(f.sites > 0 and f.rounds > 0 and f.local_steps > 0, "federation.sites/rounds/local_steps",
         "must all be > 0")
    need(0 < f.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
    need(1 <= f.min_sites <= f.sites, "federation.min_sites", f"must be in [1, federation.sites={f.sites}]")
    need(f.dirichlet_alpha > 0 and f.quantity_alpha > 0, "federation.dirichlet_alpha/quantity_alpha",
         "must be > 0")
    need(f.proximal_mu >= 0, "federation.proximal_mu", "must be >= 0")
    need(f.evaluate_every >= 0, "federation.evaluate_every", "must be >= 0 (0: only at the end)")
    need(f.server_lr > 0, "federation.server_lr", "must be > 0")
    need(0 <= f.server_momentum < 1, "federation.server_momentum", "must be in [0, 1)")
    need(0 <= f.server_beta2 < 1, "federation.server_beta2", "must be in [0, 1)")
    need(f.server_tau > 0, "federation.server_tau", "must be > 0")
    need(f.client_num_cpus > 0, "federation.client_num_cpus", "must be > 0")
    need(f.client_num_gpus >= 0, "federation.client_num_gpus", "must be >= 0")
    need(f.connect_timeout_s > 0 and f.round_timeout_s > 0, "federation.connect_timeout_s/round_timeout_s",
         "must be > 0")
    need(f.keep_checkpoints >= 0, "federation.keep_checkpoints", "must be >= 0 (0 keeps every round)")
    if p.enabled:
        need((p.noise_multiplier is None) != (p.target_epsilon is None), "privacy.noise_multiplier",
             "or privacy.target_epsilon: give exactly one when privacy.enabled is true")
        need(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        need(m.mbstd_group_size == 0, "model.mbstd_group_size",
             "must be 0 when privacy.enabled is true: minibatch-stddev mixes samples of a batch, "
             "so per-sample gradients are undefined")
        need(m.arch == "stylegan2", "model.arch", "must be 'stylegan2' when privacy.enabled is true")
    if p.delta is not None:
        need(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
    if p.noise_multiplier is not None:
        need(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    if p.target_epsilon is not None:
        need(p.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
    if p.budget_epsilon is not None:
        need(p.budget_epsilon > 0, "privacy.budget_epsilon", "must be > 0")
    if p.noise_seed is not None:
        need(p.noise_seed >= 0, "privacy.noise_seed", "must be >= 0 (or null for OS entropy)")
