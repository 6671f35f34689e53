"""One site's round, and what a site keeps between rounds; callable without Flower.

- **one site round** (``run_site_round``): seeding, loading the global weights into a
  ``SiteTrainer``, restoring the site's local state, K local steps, and the payload and metrics
  that leave the site (``client/client_app.py`` converts them to Flower records);
- **local state**: what a site keeps between rounds (optimizer moments, path-length mean, batch
  sampler, counters, privacy accountant) and its on-disk store for resuming after a crash.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch

from medstylegan2.config import RunConfig
from medstylegan2.faults import fault_point
from medstylegan2.fl.seeds import seed_round, site_seed
from medstylegan2.fl.wire import (PAYLOAD_DELTA, PAYLOAD_WEIGHTS, PRIVACY_PREFIX, constants_digest,
                                  decode_from_transfer, encode_for_transfer, flatten_weights, is_constant,
                                  quantize_with_error_feedback, transferred, unflatten_weights, zero_update_like)
from medstylegan2.runfolder import atomic_write_bytes, round_file, round_numbers_in
from medstylegan2.shuffle_sampler import ShuffleSampler
from medstylegan2.privacy.class_guide import (STATE_KEY, guide_from_state, guide_settings, guide_to_state,
                                              train_from_settings)
from medstylegan2.privacy.class_moments import ClassMoments, release_from_config
from medstylegan2.privacy.public_term import public_images_of
from medstylegan2.trainer import SiteTrainer, resolve_device
from medstylegan2.privacy.reply import reply_metrics

if TYPE_CHECKING:
    from medstylegan2.privacy.site import RoundPrivacy

log = logging.getLogger(__name__)

# The local-state entry of int8 transfer's error feedback: what of the last update did not fit int8.
TRANSFER_RESIDUAL = "transfer_residual"
# Reply metric of a site that declines because it has fewer training images than one batch.
TOO_FEW_IMAGES = "too_few_images"


# ----------------------------------------------------------------------------------------------
# What a site keeps between rounds


def local_state_of(trainer: SiteTrainer) -> dict[str, Any]:
    """Everything local that should carry over to the site's next round (never sent anywhere).

    Kept: both Adam optimizers' moments (a fresh Adam would take a full-size sign step on the first
    step of every round), the path-length running mean, the batch sampler's epoch order, the step
    and image counters (EMA ramp-up and the diversity-loss decay read them) and the privacy
    engine's state (so that epsilon composes over all rounds); under int8 transfer ``run_site_round``
    adds the quantization residual (error feedback). Not kept: the networks (they come from the
    server) and the RNG (every round is seeded from (seed, round, site)).
    """
    state = {
        "g_opt": trainer.g_opt.state_dict()["state"],
        "d_opt": trainer.d_opt.state_dict()["state"],
        "pl_mean": trainer.loss.pl_mean.detach().cpu().clone(),
        "sampler": trainer.sampler.state_dict(),
        "step": trainer.step,
        "cur_nimg": trainer.cur_nimg,
    }
    if trainer.privacy is not None:
        state["privacy"] = trainer.privacy.state_dict()
    return state


def restore_local_state(trainer: SiteTrainer, state: Mapping[str, Any]) -> None:
    for name, opt in (("g_opt", trainer.g_opt), ("d_opt", trainer.d_opt)):
        full = opt.state_dict()
        full["state"] = state[name]
        opt.load_state_dict(full)
    trainer.loss.pl_mean = state["pl_mean"].to(trainer.device)
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.step, trainer.cur_nimg = int(state["step"]), int(state["cur_nimg"])
    if trainer.privacy is not None and "privacy" in state:
        trainer.privacy.load_state_dict(state["privacy"])


def local_state_to_bytes(state: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def local_state_from_bytes(data: bytes) -> dict[str, Any]:
    # Written by this site itself (Context.state or its own state folder), never received.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class LocalStateStore:
    """A site's own folder of ``round_XXX.pt`` local states, for resuming after a crash.

    After round r it keeps round r and the newest older round: if the server dies after this site
    finished r but before the server saved r, the resumed server repeats r and the site needs the
    state from before r.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def rounds(self) -> list[int]:
        return round_numbers_in(self.folder)

    def path(self, round_num: int) -> Path:
        return round_file(self.folder, round_num, ".pt")

    def latest_before(self, round_num: int) -> Optional[tuple[int, bytes]]:
        earlier = [r for r in self.rounds() if r < round_num]
        if not earlier:
            return None
        return earlier[-1], self.path(earlier[-1]).read_bytes()

    def save(self, round_num: int, data: bytes) -> None:
        atomic_write_bytes(self.path(round_num), data)
        older = [r for r in self.rounds() if r < round_num]
        for r in self.rounds():
            if r > round_num or (older and r < older[-1]):
                self.path(r).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# One site round


@dataclass
class SiteRoundResult:
    payload: dict[str, np.ndarray]     # what leaves the site (transfer dtype)
    payload_kind: str                  # PAYLOAD_WEIGHTS or PAYLOAD_DELTA
    metrics: dict[str, float]          # counts, losses, speed (and privacy figures under DP)
    local_state: Optional[dict[str, Any]]


def run_site_round(cfg: RunConfig, images: np.ndarray, labels: np.ndarray, received: Mapping[str, np.ndarray], *,
                   round_num: int, site: str, local_state: Optional[Mapping[str, Any]] = None,
                   privacy: Optional["RoundPrivacy"] = None, device: Optional[str] = None,
                   constants_check: Optional[str] = None) -> SiteRoundResult:
    """Train one site for ``cfg.federation.local_steps`` steps from the received global weights.

    ``received`` are the arrays as they arrived (transfer dtype, no constants). A site without
    images returns the received weights unchanged with num_examples 0. ``privacy`` is this round's
    decision under the site's own policy (``medstylegan2.privacy.site``, taken under the ledger's
    lock): declined (budget) -> no payload, ``declined`` = 1, the ledger unchanged; under DP the
    engine comes from it with the ledger's history, and the release is recorded in the ledger
    (fsynced) before this function returns, i.e. before anything of the round can leave the site.
    Under DP the metrics are the allow-list of ``privacy.reply`` (no count, timing or real loss).
    """
    f = cfg.federation
    dtype = f.transfer_dtype
    num_examples = int(len(labels))
    if num_examples == 0:
        # Nothing to learn from: send the weights back unchanged (a zero update under float16/int8).
        if dtype == "float32":
            payload, kind = encode_for_transfer(decode_from_transfer(received), dtype), PAYLOAD_WEIGHTS
        else:
            payload, kind = zero_update_like(received), PAYLOAD_DELTA
        return SiteRoundResult(payload=payload, payload_kind=kind, metrics={"num_examples": 0.0, "steps": 0.0},
                               local_state=None)

    dp = privacy is not None and privacy.dp
    if num_examples < cfg.train.batch_size and not dp:
        # Every batch would repeat images: decline, say why. (Under DP the sample rate comes from
        # the policy's public nominal size, and the policy's min_site_size is the rule: saying
        # "fewer than one batch" would tell the server something about n.)
        log.warning("site %s: %d training image(s), fewer than one batch (train.batch_size=%d): declining round %d",
                    site, num_examples, cfg.train.batch_size, round_num)
        return SiteRoundResult(payload={}, payload_kind=PAYLOAD_WEIGHTS, local_state=None,
                               metrics={"num_examples": 0.0, "declined": 1.0, TOO_FEW_IMAGES: 1.0, "steps": 0.0})

    if privacy is not None and privacy.declined:
        return _declined(privacy, site, round_num, local_state)
    if cfg.privacy.enabled and not dp:
        # The trainer refuses too; say it here, before any set-up.
        raise RuntimeError("the run asks for DP but no DP settings were decided for this site round")

    seed = site_seed(cfg.seed, round_num, site)
    guide = site_class_guide(cfg, images, labels, privacy, local_state, device=device, seed=seed)
    declined = privacy is not None and privacy.declined  # by the guide's release and this round
    moments = None if declined else site_class_moments(cfg, images, labels, privacy, device=device)
    if privacy is not None and privacy.declined:  # the guide or the moments would take the round past the budget
        return _declined(privacy, site, round_num, local_state)
    engine = privacy.make_engine(num_examples) if privacy is not None else None
    # The trainer is built from cfg.seed, as the server built the global model: the constants
    # (fixed noise buffers) are then identical and need not travel.
    trainer = SiteTrainer(cfg, images, labels, device=device, seed=cfg.seed, privacy=engine, class_guide=guide,
                          class_moments=moments, public_images=public_images_of(cfg) if dp else None)
    full = flatten_weights(trainer.get_weights())
    # A packed int8 payload is unpacked with this site's own keys and shapes.
    start = decode_from_transfer(received, {k: tuple(v.shape) for k, v in transferred(full).items()})
    if constants_check is not None and constants_digest(full) != constants_check:
        raise RuntimeError("this site built different model constants than the server (noise buffers differ): "
                           "check that both use the same model config and seed")
    missing = [k for k in full if not is_constant(k) and k not in start]
    if missing:
        raise KeyError(f"global weights lack {missing[0]!r}")
    full.update({k: v.to(full[k].dtype) for k, v in start.items() if k in full})
    trainer.set_weights(unflatten_weights(full))
    if local_state is not None:
        restore_local_state(trainer, local_state)
        if dp:
            privacy.restore(engine)  # the ledger, not the local state, says what was spent
    else:
        trainer.sampler = ShuffleSampler(num_examples, cfg.train.batch_size, seed=seed % 2**62 + 1)
    if f.proximal_mu > 0:
        nested = unflatten_weights({k: v.to(trainer.device) for k, v in full.items()})
        trainer.proximal_reference = {"G": nested["G"], "D": nested["D"]}

    steps_before = engine.spent_steps if engine is not None else 0
    seed_round(seed)
    stats = trainer.train_steps(f.local_steps)
    new = transferred(flatten_weights(trainer.get_weights()))
    residual = None
    if dtype == "float32":
        payload, kind = encode_for_transfer(new, dtype), PAYLOAD_WEIGHTS
    elif dtype == "int8":
        previous = local_state.get(TRANSFER_RESIDUAL) if local_state is not None else None
        payload, residual = quantize_with_error_feedback({k: new[k] - start[k] for k in new}, previous)
        kind = PAYLOAD_DELTA
    else:
        payload, kind = encode_for_transfer({k: new[k] - start[k] for k in new}, dtype), PAYLOAD_DELTA
    metrics = {"num_examples": float(num_examples), "steps": float(f.local_steps)}
    for key in ("loss_g", "loss_d_fake", "loss_d_real", "loss_pl", "loss_ds", "loss_r1", "images_per_second",
                "real_images_seen", "seconds"):
        if key in stats:
            metrics[key] = float(stats[key])
    state = local_state_of(trainer)
    if guide is not None and not dp:  # under DP it is kept beside the ledger (privacy.class_guide)
        state[STATE_KEY] = guide_to_state(guide, guide_settings(cfg))
    if engine is not None:
        fault_point("site_trained", round_num=round_num, site=site)  # trained, not yet recorded
        metrics.update(_privacy_metrics(privacy.record(engine.spent_steps - steps_before)))
        fault_point("site_recorded", round_num=round_num, site=site)  # recorded, reply not yet built
        metrics = reply_metrics(metrics, dp=True, nominal_size=privacy.nominal_size)
    if residual is not None:
        state[TRANSFER_RESIDUAL] = residual
    return SiteRoundResult(payload=payload, payload_kind=kind, metrics=metrics, local_state=state)


def site_class_guide(cfg: RunConfig, images: np.ndarray, labels: np.ndarray, privacy: Optional["RoundPrivacy"],
                     local_state: Optional[Mapping[str, Any]], *, device: Optional[str], seed: int) -> Optional[Any]:
    """The frozen class guide G trains with this round (``train.class_guide_weight``; None when off).

    Under DP: the run's guide from the site's ledger folder, or trained now with DP-SGD and
    recorded (``RoundPrivacy.class_guide``; None if that would pass the budget, the round then
    declined). Without DP: the one in the local state, or trained now without noise.
    """
    if cfg.train.class_guide_weight <= 0:
        return None
    device = device or str(resolve_device(cfg.device))
    if privacy is not None and privacy.dp:
        return privacy.class_guide(cfg, images, labels, device=device, seed=seed % 2**31)
    settings = guide_settings(cfg)
    if local_state is not None and STATE_KEY in local_state:
        return guide_from_state(local_state[STATE_KEY], settings, "the site's local state").to(device)
    return train_from_settings(images, labels, settings, seed=seed % 2**31, device=device)


def site_class_moments(cfg: RunConfig, images: np.ndarray, labels: np.ndarray, privacy: Optional["RoundPrivacy"],
                       *, device: Optional[str]) -> Optional[ClassMoments]:
    """The class moments G matches this round (``train.class_moments_weight``; None when off).

    Under DP: the run's release from the site's ledger folder, or made now and recorded
    (``RoundPrivacy.class_moments``; None if that would pass the budget, the round then declined).
    Without DP: the exact statistics of the site's images (cheap: one pass over coarse pictures).
    """
    if cfg.train.class_moments_weight <= 0:
        return None
    device = device or str(resolve_device(cfg.device))
    if privacy is not None and privacy.dp:
        return privacy.class_moments(cfg, images, labels, device=device)
    return release_from_config(cfg, images, labels, noise_multiplier=None).to(device)


def _declined(privacy: "RoundPrivacy", site: str, round_num: int, local_state: Optional[Mapping[str, Any]]
              ) -> SiteRoundResult:
    """The reply of a round the site declines under its budget: no payload, its privacy figures."""
    log.info("site %s: declining round %d: %s", site, round_num, privacy.declined_reason)
    metrics = {"num_examples": 0.0, "declined": 1.0, "steps": 0.0}
    metrics.update(_privacy_metrics(privacy.figures()))
    return SiteRoundResult(payload={}, payload_kind=PAYLOAD_WEIGHTS, metrics=metrics,
                           local_state=None if local_state is None else dict(local_state))


def _privacy_metrics(figures: Mapping[str, float]) -> dict[str, float]:
    """The reply's privacy figures (``dp_epsilon``, ...): the site's lifetime spend from its ledger."""
    return {f"{PRIVACY_PREFIX}{k}": float(v) for k, v in figures.items()}
