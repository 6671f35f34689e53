"""One typed configuration for every entry point, loaded from YAML and validated once.

Every section is a dataclass with defaults; ``load_config`` reads a YAML file, rejects unknown keys
(naming the full dotted key and the keys that are allowed), checks types and allowed values, and
applies ``key.path=value`` overrides from the command line before validation.

A config file may extend another (``base: other.yaml``): ``medstylegan2.config_files`` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

# The semantic checks, and the constants they hold, live in config_checks; re-exported here.
from medstylegan2.config_checks import CLASS_NAMES, LABEL_SKIP, SPREAD_KINDS, check_label_map, check_semantics  # noqa: F401
from medstylegan2.config_files import apply_override, read_with_bases
from medstylegan2.config_types import build_dataclass
from medstylegan2.errors import ConfigError  # noqa: F401  (re-exported: callers catch it from here)


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
    # D's own widths (null: the same as G's). Under DP the noise added to D's gradient grows with
    # the square root of D's parameter count, while the clipped signal does not: a narrower D
    # keeps more of it (Bie et al. 2023).
    d_channel_base: Optional[int] = None
    d_channel_max: Optional[int] = None
    # Minibatch standard deviation in D; 0 disables it. Over the batch it mixes the samples of a
    # batch, which DP forbids; with mbstd_reference each sample is grouped with group_size - 1
    # fresh fakes instead (no other real image), the form allowed under differential privacy.
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    mbstd_reference: bool = False
    cmap_dim: int = 64  # dimension of the class embedding that D projects its features onto
    # Auxiliary-classifier head on D's features (AC-GAN, Odena et al. 2017): D also learns to
    # classify real images, and G is pushed to make fakes that D classifies as their conditioning
    # class (weight: train.class_loss_weight). Projection alone learns the classes slowly.
    d_class_head: bool = False
    # Learning-rate multiplier of the mapping network (StyleGAN2: 0.01).
    mapping_lr_multiplier: float = 0.01
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
    # Path-length regularization weight; lazily applied every pl_interval G updates (0 disables).
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    style_mixing_prob: float = 0.9
    # EMA half-life in thousands of images, ramped up over the first steps (fraction of images seen).
    ema_kimg: float = 1.0
    ema_rampup: Optional[float] = 0.05
    # Seed paper's diversity-sensitive ("style difference") loss weight (StarGAN v2 ``lambda_ds``,
    # seed value 2), linearly decayed to zero over ds_decay_steps trainer steps; 0 disables it.
    lambda_ds: float = 0.0
    ds_decay_steps: int = 10000
    truncation_psi: float = 1.0
    # Weight of D's class head's cross-entropy (model.d_class_head): on reals in D's loss, on fakes in G's.
    class_loss_weight: float = 1.0
    # If set, the weight moves linearly from class_loss_weight to this over the first
    # class_loss_decay_steps trainer steps of the site (class first, then variety: docs/recipe.md).
    class_loss_weight_end: Optional[float] = None
    class_loss_decay_steps: int = 1000
    # The head's weight on reals in D's loss alone, held all run (null: as G's, schedule included):
    # D keeps learning the classes while G's push decays (a trade, not a gain: docs/recipe.md).
    d_class_loss_weight: Optional[float] = None
    # D updates per G update (each on a fresh real and fake batch); more helps under DP.
    d_steps_per_g: int = 1
    # G updates per step, before the step's D updates, and G's batch (null: batch_size). G reads no
    # real image: under DP its updates cost no privacy, so G can take more, smaller ones than D.
    g_steps_per_d: int = 1
    g_batch_size: Optional[int] = None
    # Under DP: clip each fake image's gradient of D's loss to privacy.max_grad_norm, as the real
    # ones are: both terms push D equally (fakes are not private; privacy/fake_term.py).
    dp_clip_fakes: bool = False
    # Differentiable augmentation of every image D judges (augment.py: color, translation, cutout),
    # drawn per image; G's gradient flows through it. Empty: off.
    augment: list[str] = field(default_factory=list)
    # Under DP: weight of D's real loss on a public set of normal chests (data.public_normals),
    # added outside the clip and the noise: it reads no private record (privacy/public_term.py).
    # Off without DP, where D reads the site's own images at full strength. 0: off.
    public_real_weight: float = 0.0
    # D parameters that keep their warm-start values, by name prefix (e.g. [blocks, epilogue.fc]):
    # no optimizer holds them, so under DP no noise is spent on them (no gain: docs/recipe.md).
    d_frozen: list[str] = field(default_factory=list)
    # Under DP: D parameter-name prefixes clipped apart (e.g. [epilogue.class_head]): each prefix's
    # parameters, and the rest, get an equal share of privacy.max_grad_norm per sample, so that the
    # largest gradients (the conv features') cannot take all of it. Same sensitivity, same epsilon
    # (privacy/group_clip.py). Empty: one flat clip, as Opacus does.
    dp_clip_groups: list[str] = field(default_factory=list)
    # Class guide (privacy/class_guide.py): a classifier each site trains once per run (under DP with
    # DP-SGD, inside the site's epsilon), frozen; G's loss adds class_guide_weight x its cross-entropy
    # on the fakes. Under DP it learns the classes far better than D's class head. 0: off.
    class_guide_weight: float = 0.0
    class_guide_steps: int = 250
    class_guide_lr: float = 0.002
    class_guide_max_grad_norm: float = 1.0
    class_guide_width: int = 16
    # If set (e.g. 0.9): no push on fakes the guide gives this probability of their class. null: none.
    class_guide_confidence: Optional[float] = None
    # If set, the guide's weight moves to this value as class_loss_weight_end does for D's head.
    class_guide_weight_end: Optional[float] = None
    class_guide_decay_steps: int = 1000
    # Class moments (privacy/class_moments.py): each site releases once per run each class's mean coarse
    # picture (grid x grid) and spread, under DP with Gaussian noise class_moments_noise (inside its
    # epsilon); G's loss adds class_moments_weight x how far each class's fakes are from them. 0: off.
    class_moments_weight: float = 0.0
    class_moments_grid: int = 8
    class_moments_noise: float = 5.0
    # What the spread says: "class", one figure per class (the per-cell variance averaged over the
    # cells); "cell", one per cell (where in the picture a class varies, e.g. a dense lobe that is in
    # a different lobe from image to image). The same sensitivity, so the same noise and epsilon.
    class_moments_spread: str = "class"
    # Warm start: a checkpoint (train-local or a federated round) whose G, G_ema and D weights replace
    # the fresh ones (e.g. pretrained on public data); not its optimizer state, counters or constants.
    init_checkpoint: Optional[str] = None
    grid_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    # How fast, not what (acceleration.py): "auto" = bf16 autocast on bf16 CUDA GPUs (fp32 weights and
    # losses), fp32 on CPU, channels_last everywhere; compile: where no double backward runs (not R1, PL).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
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
    # --- A site's own archive (DICOM or images; see docs/data.md). A federated site takes these
    # from its node config, never from the server.
    # The site's label words -> one of CLASS_NAMES, or "skip" to leave a label's images out on
    # purpose (counted). Applies to class folder names and to labels_csv; matched case-insensitively.
    label_map: dict[str, str] = field(default_factory=dict)
    # CSV with a header row ``file,label`` (file relative to root): labels without class folders.
    labels_csv: Optional[str] = None
    # DICOM: keep only frontal views (ViewPosition PA or AP; files without ViewPosition are kept).
    frontal_only: bool = True
    # DICOM: secret salt for hashing PatientID into the per-patient grouping key; created (0600,
    # OS entropy) on first use. None: ~/.config/medstylegan2/patient-id.salt.
    patient_salt_file: Optional[str] = None
    # A folder's ``image,patient_id`` CSV (paths as under the data root): the held-out split then
    # holds out whole patients. A deployed site sets it from its privacy policy's patient_csv.
    patient_csv: Optional[str] = None
    # The public set of train.public_real_weight: the Normal images of phantoms rendered with
    # public_normals per class from public_seed, a seed the private data must not use.
    public_normals: int = 2000
    public_seed: int = 1_000_003


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
    # How the sites' updates are combined before the server optimizer: the example-weighted mean,
    # or (robust to a few hostile sites, unweighted) the coordinate-wise median or trimmed mean,
    # which cuts int(trim_fraction * n) values off each end.
    aggregation_rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = 0.2
    # Reject an update whose norm (distance to the global model) exceeds outlier_factor x the median
    # of the round's updates; needs >= 3 valid updates; 0 disables.
    outlier_factor: float = 10.0
    server_lr: float = 1.0
    # FedAvgM momentum; FedAdam's beta1.
    server_momentum: float = 0.9
    # FedAdam only: second-moment decay and the adaptivity floor tau.
    server_beta2: float = 0.99
    server_tau: float = 0.001
    # FedProx-style proximal term on local G and D weights; 0 disables.
    proximal_mu: float = 0.0
    # float16/int8: weights go out and updates come back so (int8: error feedback kept at the site).
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
    # Simulation only: the policy file each virtual site takes as its own (null: this section).
    # The keys above are what the server asks for; a site's own policy decides (docs/privacy.md).
    policy: Optional[str] = None


@dataclass
class MetricsConfig:
    # Folder with feature-network weights; falls back to $TORCH_HOME/hub/checkpoints.
    weights_dir: Optional[str] = None
    n_per_class: int = 200
    metrics: list[str] = field(default_factory=lambda: ["fd_domain", "kid_domain", "pr_domain", "lpips"])
    # Also measured after the last round (the slow ones); when and what each costs: docs/evaluation.md.
    final_metrics: list[str] = field(default_factory=list)
    fid_n_per_class: Optional[int] = None  # the first N images per class go through Inception (None: all)
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
        check_semantics(self)
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
        apply_override(raw, item)
    where = str(path) if path is not None else "config"
    cfg = from_dict(raw, where=where)
    return cfg.validate()


def from_dict(raw: dict[str, Any], where: str = "config") -> RunConfig:
    return build_dataclass(RunConfig, raw, prefix="", where=where)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file with its ``base:`` chain merged in (without the ``base`` key)."""
    return read_with_bases(Path(path), check_keys=lambda raw, where: build_dataclass(RunConfig, raw, prefix="", where=where))
