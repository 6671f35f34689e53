"""The semantic checks of a run config (``RunConfig.validate``): ranges, cross-field rules, label maps.

``medstylegan2.config`` holds the config's shape (dataclasses with defaults) and re-exports the
constants here; the checks read a built config's attributes only, so this module imports no config.
"""

from __future__ import annotations

import math
from typing import Any

from medstylegan2.errors import ConfigError
from medstylegan2.metrics import check_metrics_config  # names only: no heavy imports

CLASS_NAMES: tuple[str, ...] = ("Normal", "COVID-19", "Non-COVID")
# train.class_moments_spread: one spread per class, or one per cell of the coarse picture (privacy/class_moments.py).
SPREAD_KINDS: tuple[str, ...] = ("class", "cell")
# train.augment: the transforms of augment.AUGMENTATIONS (kept equal by a test; this module imports no torch).
AUGMENTATION_NAMES: tuple[str, ...] = ("color", "translation", "cutout")


def check_semantics(cfg: Any) -> None:
    """Every cross-field and range rule of a built ``RunConfig``; the first broken one raises naming its key."""
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
    need(not m.d_class_head or m.arch == "stylegan2", "model.d_class_head",
         "needs model.arch 'stylegan2' (the DCGAN baseline has no class head)")
    need(m.mapping_lr_multiplier > 0, "model.mapping_lr_multiplier", "must be > 0")
    need(t.class_loss_weight >= 0, "train.class_loss_weight", "must be >= 0")
    for key in ("class_loss_weight_end", "d_class_loss_weight"):
        need(getattr(t, key) is None or getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (or null)")
    for key in ("class_loss_decay_steps", "class_guide_decay_steps"):
        need(getattr(t, key) > 0, f"train.{key}", "must be > 0")
    need(t.d_steps_per_g >= 1, "train.d_steps_per_g", "must be >= 1")
    need(t.g_steps_per_d >= 1, "train.g_steps_per_d", "must be >= 1")
    need(t.g_batch_size is None or t.g_batch_size >= 1, "train.g_batch_size", "must be >= 1 (or null: batch_size)")
    for key, example in (("d_frozen", "[blocks, epilogue.fc]"), ("dp_clip_groups", "[epilogue.class_head]")):
        need(all(getattr(t, key)), f"train.{key}",
             f"must not hold an empty name (give D parameter-name prefixes, e.g. {example})")
    need(t.class_guide_weight >= 0, "train.class_guide_weight", "must be >= 0 (0: no class guide)")
    need(min(t.class_guide_steps, t.class_guide_width) >= 1, "train.class_guide_steps/width", "must be >= 1")
    need(min(t.class_guide_lr, t.class_guide_max_grad_norm) > 0, "train.class_guide_lr/max_grad_norm", "must be > 0")
    need(t.class_guide_confidence is None or 0 < t.class_guide_confidence < 1, "train.class_guide_confidence",
         "must be in (0, 1) (or null: the plain cross-entropy)")
    need(t.class_guide_weight_end is None or (t.class_guide_weight_end >= 0 and t.class_guide_weight > 0),
         "train.class_guide_weight_end", "must be >= 0, with train.class_guide_weight > 0 (or null: no schedule)")
    need(t.class_guide_weight == 0 or m.resolution >= 16, "train.class_guide_weight", "needs model.resolution >= 16")
    need(t.class_moments_weight >= 0, "train.class_moments_weight", "must be >= 0 (0: no class moments)")
    need(1 <= t.class_moments_grid <= m.resolution, "train.class_moments_grid", "must be in [1, model.resolution]")
    need(0 < t.class_moments_noise < math.inf, "train.class_moments_noise", "must be a finite noise multiplier > 0")
    need(all(a in AUGMENTATION_NAMES for a in t.augment), "train.augment",
         f"must list only {', '.join(AUGMENTATION_NAMES)} (empty: no augmentation), got {t.augment}")
    need(t.class_moments_spread in SPREAD_KINDS, "train.class_moments_spread", f"must be one of {', '.join(SPREAD_KINDS)}")
    for key in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "cmap_dim"):
        need(getattr(m, key) > 0, f"model.{key}", "must be > 0")
    for key in ("d_channel_base", "d_channel_max"):
        need(getattr(m, key) is None or getattr(m, key) > 0, f"model.{key}", "must be > 0 (or null: G's)")
    need(m.mbstd_group_size >= 0, "model.mbstd_group_size", "must be >= 0 (0 disables it)")
    need(t.batch_size > 0, "train.batch_size", "must be > 0")
    need(t.r1_interval > 0 and t.pl_interval > 0, "train.r1_interval/pl_interval", "must be > 0")
    need(0 <= t.style_mixing_prob <= 1, "train.style_mixing_prob", "must be in [0, 1]")
    need(t.lambda_ds >= 0, "train.lambda_ds", "must be >= 0")
    need(0 < t.truncation_psi <= 1, "train.truncation_psi", "must be in (0, 1]")
    need(0 <= d.heldout_fraction < 1, "data.heldout_fraction", "must be in [0, 1)")
    need(d.source == "phantoms" or d.root is not None, "data.root", f"is required when data.source is '{d.source}'")
    need(d.phantoms_per_class > 0, "data.phantoms_per_class", "must be > 0")
    need(t.public_real_weight >= 0, "train.public_real_weight", "must be >= 0 (0: off)")
    need(d.public_normals > 0, "data.public_normals", "must be > 0")
    need(t.public_real_weight == 0 or d.source != "phantoms" or d.public_seed != d.seed, "data.public_seed",
         f"must differ from data.seed ({d.seed}): the public set would hold the private phantoms")
    check_label_map(d.label_map)
    need(min(f.sites, f.rounds, f.local_steps) > 0, "federation.sites/rounds/local_steps", "must all be > 0")
    need(0 < f.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
    need(1 <= f.min_sites <= f.sites, "federation.min_sites", f"must be in [1, federation.sites={f.sites}]")
    need(min(f.dirichlet_alpha, f.quantity_alpha) > 0, "federation.dirichlet_alpha/quantity_alpha", "must be > 0")
    need(f.proximal_mu >= 0, "federation.proximal_mu", "must be >= 0")
    need(f.evaluate_every >= 0, "federation.evaluate_every", "must be >= 0 (0: only at the end)")
    need(f.server_lr > 0, "federation.server_lr", "must be > 0")
    need(0 <= f.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)")
    need(f.outlier_factor == 0 or f.outlier_factor > 1, "federation.outlier_factor",
         "must be > 1 (or 0 to turn the check off)")
    need(0 <= f.server_momentum < 1, "federation.server_momentum", "must be in [0, 1)")
    need(0 <= f.server_beta2 < 1, "federation.server_beta2", "must be in [0, 1)")
    need(f.server_tau > 0, "federation.server_tau", "must be > 0")
    need(f.client_num_cpus > 0, "federation.client_num_cpus", "must be > 0")
    need(f.client_num_gpus >= 0, "federation.client_num_gpus", "must be >= 0")
    need(min(f.connect_timeout_s, f.round_timeout_s) > 0, "federation.connect_timeout_s/round_timeout_s", "must be > 0")
    need(f.keep_checkpoints >= 0, "federation.keep_checkpoints", "must be >= 0 (0 keeps every round)")
    check_metrics_config(cfg.metrics)
    if p.enabled:
        need((p.noise_multiplier is None) != (p.target_epsilon is None), "privacy.noise_multiplier",
             "or privacy.target_epsilon: give exactly one when privacy.enabled is true")
        need(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        need(m.mbstd_group_size == 0 or m.mbstd_reference, "model.mbstd_group_size",
             "must be 0 when privacy.enabled is true, unless model.mbstd_reference is true: minibatch-stddev "
             "over the batch mixes samples of a batch, so per-sample gradients are undefined")
        need(m.arch == "stylegan2", "model.arch", "must be 'stylegan2' when privacy.enabled is true")
    need(p.delta is None or 0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
    need(p.noise_multiplier is None or p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    for key in ("target_epsilon", "budget_epsilon"):
        need(getattr(p, key) is None or getattr(p, key) > 0, f"privacy.{key}", "must be > 0")
    need(p.noise_seed is None or p.noise_seed >= 0, "privacy.noise_seed", "must be >= 0 (or null for OS entropy)")
    need(p.policy is None or bool(str(p.policy).strip()), "privacy.policy", "must be a file path (or null)")


LABEL_SKIP = "skip"


def check_label_map(label_map: dict[str, str]) -> None:
    """Every site word maps to a class name (exact spelling) or "skip"; no word twice ignoring case."""
    seen: dict[str, str] = {}
    for word, target in label_map.items():
        key = f"data.label_map.{word}"
        if not word.strip():
            raise ConfigError(f"'{key}': a label word must not be empty")
        if target not in (*CLASS_NAMES, LABEL_SKIP):
            raise ConfigError(f"'{key}' = {target!r} is not a class; use one of: {', '.join(CLASS_NAMES)}, "
                              f"or {LABEL_SKIP!r} to leave these images out")
        folded = word.strip().casefold()
        if folded in seen and seen[folded] != word:
            raise ConfigError(f"'{key}': the same word as '{seen[folded]}' (labels match ignoring case)")
        seen[folded] = word
