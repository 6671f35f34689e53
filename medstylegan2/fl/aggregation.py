"""The server's arithmetic: which sites train, how their updates are checked and combined.

- **site sampling**: the sites of a round, reproducible from (seed, round);
- **aggregation**: how site updates are combined (``federation.aggregation_rule``: the
  example-weighted mean, or, robust to a few hostile sites, the coordinate-wise median or trimmed
  mean, with Flower's FedMedian / FedTrimmedAvg arithmetic in plain torch), the rejection of update
  norms far outside the cohort (``federation.outlier_factor``), the server optimizers (FedAvg,
  FedAvgM, FedAdam) applied to the combined update, with state for exact resume, and the
  example-weighted mean of the sites' metrics;
- **one server round** (``aggregate_round``): every site's reply (plain data: name, metrics,
  arrays, payload kind, error) checked, the valid updates averaged and applied to the global
  weights, with a status per site. ``server/strategy.py`` converts Flower messages to
  ``SiteReply`` and calls it.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from medstylegan2.config import RunConfig
from medstylegan2.fl.seeds import site_seed
from medstylegan2.fl.wire import (PAYLOAD_DELTA, PAYLOAD_WEIGHTS, PRIVACY_PREFIX, Flat, decode_from_transfer,
                                  transferred, validate_update)


# ----------------------------------------------------------------------------------------------
# Which sites train


def sample_sites(sites: Sequence[str], fraction: float, min_sites: int, *, seed: int, round_num: int) -> list[str]:
    """The sites that train in a round: ceil(fraction * n), at least ``min_sites``, reproducible."""
    ordered = sorted(sites)
    count = min(len(ordered), max(min_sites, math.ceil(fraction * len(ordered))))
    if count >= len(ordered):
        return ordered
    rng = random.Random(site_seed(seed, round_num, "__sampling__"))
    return sorted(rng.sample(ordered, count))


# ----------------------------------------------------------------------------------------------
# Aggregation


def averaged_only_keys(flat: Mapping[str, torch.Tensor], buffer_keys: Iterable[str]) -> set[str]:
    """Keys the server averages without its optimizer: all of G_ema and G's non-trainable buffers.

    G_ema is an exponential moving average of G's iterates. Every site starts its EMA from the
    global G_ema and moves it towards its own iterates; because the EMA is linear, the weighted
    average of the sites' EMAs is the EMA of the averaged local trajectories. Applying server
    momentum or Adam to it as well would make it drift away from G, so it is averaged as is. The
    same holds for tracked statistics (``mapping.w_avg``).
    """
    buffers = set(buffer_keys)
    return {k for k in flat if k.startswith("G_ema/") or k in buffers}


def weighted_average(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Optional[Flat]:
    """Example-weighted mean of updates; entries with weight 0 contribute nothing.

    Returns None when no update has a positive weight. The sum runs in the given order; callers
    sort their updates (by site) so that a run is reproducible bit for bit.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    pairs = [(u, float(w)) for u, w in zip(updates, weights) if w > 0]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    keys = list(pairs[0][0].keys())
    out: Flat = {}
    for key in keys:
        acc = torch.zeros_like(pairs[0][0][key], dtype=torch.float64)
        for update, w in pairs:
            acc += update[key].to(torch.float64) * (w / total)
        out[key] = acc.to(torch.float32)
    return out


AGGREGATION_RULES = ("mean", "median", "trimmed_mean")


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> Flat:
    """Coordinate-wise median, unweighted (Flower's FedMedian: ``np.median`` over the stacked arrays).

    For an even count it is the mean of the two middle values, computed as numpy does, so the
    result is bit for bit FedMedian's on the same arrays (``torch.median`` would take the lower one).
    """
    n = len(updates)
    out: Flat = {}
    for key in updates[0]:
        ordered = torch.sort(torch.stack([u[key] for u in updates]), dim=0).values
        middle = ordered[n // 2]
        out[key] = middle.clone() if n % 2 else (ordered[n // 2 - 1] + middle) / 2
    return out


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> Flat:
    """Coordinate-wise mean after cutting ``int(trim_fraction * n)`` values off each end, unweighted
    (Flower's FedTrimmedAvg ``trim_mean``, scipy's rule). With a cut of 0 it is the plain mean."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(updates)
    cut = int(trim_fraction * n)
    out: Flat = {}
    for key in updates[0]:
        kept = torch.sort(torch.stack([u[key] for u in updates]), dim=0).values[cut:n - cut]
        out[key] = kept.sum(dim=0) / kept.shape[0]
    return out


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update (all keys): its distance to the global model it started from."""
    return math.sqrt(sum(float(torch.sum(v.to(torch.float64) ** 2)) for v in update.values()))


def norm_outliers(norms: Mapping[str, float], factor: float) -> dict[str, str]:
    """Sites whose update norm exceeds ``factor`` x the median norm of the cohort, with the reason.

    Needs at least 3 updates: with two, the median is their mean and cannot tell which of them is
    far off (the robust rules still apply). A zero median (nobody moved) rejects nothing either.
    """
    if factor <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return {}
    return {name: (f"update norm {norm:.4g} is {norm / median:.1f} x the cohort's median {median:.4g} "
                   f"(federation.outlier_factor {factor:g})")
            for name, norm in norms.items() if norm > factor * median}


def combine_updates(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rule: str,
                    trim_fraction: float = 0.2) -> Optional[Flat]:
    """The round's update by ``rule``: ``mean`` (example-weighted), ``median``, ``trimmed_mean`` (unweighted)."""
    if rule == "mean":
        return weighted_average(updates, weights)
    if not updates:
        return None
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        return trimmed_mean(updates, trim_fraction)
    raise ValueError(f"aggregation rule must be one of {', '.join(AGGREGATION_RULES)}, got {rule!r}")


class ServerOptimizer:
    """Applies the averaged site update to the global weights.

    - ``fedavg``:  w += lr * u                                (lr 1: plain FedAvg)
    - ``fedavgm``: m = beta * m + u;  w += lr * m             (Hsu et al. 2019)
    - ``fedadam``: m = b1 m + (1-b1) u;  v = b2 v + (1-b2) u^2;  w += lr * m / (sqrt(v) + tau)
                                                              (Reddi et al. 2021, no bias correction)

    ``u`` is the averaged pseudo-gradient (mean site weights minus global weights). Keys in
    ``plain_keys`` (G_ema, buffers) always get w += u: see ``averaged_only_keys``.
    """

    def __init__(self, kind: str, *, lr: float = 1.0, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        if kind not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"aggregation must be one of fedavg, fedavgm, fedadam, got {kind!r}")
        self.kind, self.lr, self.momentum, self.beta2, self.tau = kind, lr, momentum, beta2, tau
        self.m: Flat = {}
        self.v: Flat = {}

    def step(self, weights: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor],
             plain_keys: set[str]) -> Flat:
        new: Flat = dict(weights)
        for key, u in update.items():
            w = weights[key]
            if key in plain_keys:
                new[key] = w + u
            elif self.kind == "fedavg":
                new[key] = w + self.lr * u
            elif self.kind == "fedavgm":
                m = self.m.get(key)
                m = u.clone() if m is None else self.momentum * m + u
                self.m[key] = m
                new[key] = w + self.lr * m
            else:
                m = self.m.get(key, torch.zeros_like(u))
                v = self.v.get(key, torch.zeros_like(u))
                m = self.momentum * m + (1 - self.momentum) * u
                v = self.beta2 * v + (1 - self.beta2) * u * u
                self.m[key], self.v[key] = m, v
                new[key] = w + self.lr * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "m": {k: v.clone() for k, v in self.m.items()},
                "v": {k: v.clone() for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"server optimizer state is for {state.get('kind')!r}, this run uses {self.kind!r}")
        self.m = {k: v.clone() for k, v in state["m"].items()}
        self.v = {k: v.clone() for k, v in state["v"].items()}


def make_server_optimizer(cfg: RunConfig) -> ServerOptimizer:
    f = cfg.federation
    return ServerOptimizer(f.aggregation, lr=f.server_lr, momentum=f.server_momentum, beta2=f.server_beta2,
                           tau=f.server_tau)


def site_update(payload: Mapping[str, torch.Tensor], kind: str, start: Mapping[str, torch.Tensor]) -> Flat:
    """A site's pseudo-gradient: new weights minus the weights it started from."""
    if kind == PAYLOAD_DELTA:
        return dict(payload)
    if kind == PAYLOAD_WEIGHTS:
        return {k: payload[k] - start[k] for k in payload}
    raise ValueError(f"payload kind must be {PAYLOAD_WEIGHTS!r} or {PAYLOAD_DELTA!r}, got {kind!r}")


def weighted_metrics(per_site: Sequence[Mapping[str, float]], weights: Sequence[float],
                     keys: Iterable[str]) -> dict[str, float]:
    """Example-weighted mean of the given metric keys over sites that report them."""
    out: dict[str, float] = {}
    for key in keys:
        pairs = [(m[key], w) for m, w in zip(per_site, weights) if key in m and w > 0 and math.isfinite(m[key])]
        total = sum(w for _, w in pairs)
        if total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    return out


# ----------------------------------------------------------------------------------------------
# One server round

LOSS_KEYS = ("loss_g", "loss_d_fake", "loss_d_real", "loss_pl", "loss_ds", "loss_r1")


@dataclass
class SiteReply:
    """One site's answer to a training round, as plain data."""

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)   # the reply's MetricRecord
    arrays: Optional[dict[str, np.ndarray]] = None          # None: the reply carried no weights
    payload_kind: str = PAYLOAD_WEIGHTS                      # PAYLOAD_WEIGHTS or PAYLOAD_DELTA
    error: Optional[str] = None                              # the site failed: why (no content then)
    bytes_down: int = 0                                      # sent to the site (transport's count)
    bytes_up: int = 0                                        # received from it


@dataclass
class RoundOutcome:
    """What ``aggregate_round`` decided."""

    weights: Optional[Flat]                  # new transferred global weights; None: unchanged
    sites: dict[str, dict[str, Any]]         # per site: bytes, its scalar metrics, "status"
    aggregated: dict[str, float]             # example-weighted losses, num_examples, sites, images/s
    privacy: dict[str, dict[str, float]]     # per site that reported them: its privacy figures
    real_images_seen: int                    # by D, over all contributing sites
    replies: int
    declined: int
    contributing: int
    # Log lines for the caller's logger, in order: (logging level, text).
    events: list[tuple[int, str]] = field(default_factory=list)

    @property
    def all_declined(self) -> bool:
        """Every site that replied declined (privacy budgets spent): the run should end."""
        return self.replies > 0 and self.declined == self.replies


def aggregate_round(replies: Sequence[SiteReply], *, round_num: int, global_weights: Mapping[str, torch.Tensor],
                    sent: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]],
                    optimizer: ServerOptimizer, plain_keys: set[str], min_sites: int,
                    known_sites: int, rule: str = "mean", trim_fraction: float = 0.2,
                    outlier_factor: float = 0.0) -> RoundOutcome:
    """Check every reply, average the valid updates weighted by examples, apply the server optimizer.

    A reply is left out, with a status and a log line naming the site (and the key), when it is an
    error, lacks a valid ``num_examples``, declines (privacy budget), has no examples, carries no
    weights, or fails ``validate_update`` (keys, shapes, dtype, NaN/Inf) or names an unknown
    payload kind, or its update norm is more than ``outlier_factor`` x the cohort's median (with at
    least 3 valid updates; ``norm_outliers``). The valid updates are combined by ``rule``
    (``combine_updates``). The global weights move only when at least ``min(min_sites, known_sites)``
    updates are valid. ``global_weights``: the full global weights (constants included);
    ``sent``: the weights as the sites received them (what a float32 payload is a difference to);
    ``optimizer`` keeps its state across rounds (it is updated in place).
    """
    outcome = RoundOutcome(weights=None, sites={}, aggregated={}, privacy={}, real_images_seen=0,
                           replies=len(replies), declined=0, contributing=0)
    events = outcome.events
    accepted: list[tuple[str, Flat, float, dict[str, Any]]] = []
    for reply in replies:
        name = reply.name
        entry: dict[str, Any] = {"bytes_down": reply.bytes_down}
        outcome.sites[name] = entry
        if reply.error is not None:
            entry["status"] = f"error: {reply.error}"
            events.append((logging.WARNING, f"round {round_num}: site {name} failed: {reply.error}"))
            continue
        metrics = dict(reply.metrics)
        entry.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        entry["bytes_up"] = reply.bytes_up
        if "num_examples" not in metrics or float(metrics["num_examples"]) < 0:
            entry["status"] = "rejected: no valid num_examples"
            events.append((logging.WARNING, f"round {round_num}: rejected the update of site {name}: "
                                            "key 'num_examples' is missing or negative"))
            continue
        figures = {k[len(PRIVACY_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(PRIVACY_PREFIX)}
        if figures:
            outcome.privacy[name] = figures
        if float(metrics.get("too_few_images", 0)) > 0:
            entry["status"] = "declined: fewer training images than one batch"
            events.append((logging.WARNING, f"round {round_num}: site {name} declined: it has fewer training "
                                            "images than one batch (train.batch_size)"))
            continue
        if float(metrics.get("declined", 0)) > 0:
            outcome.declined += 1
            entry["status"] = "declined"
            epsilon = float(metrics.get(PRIVACY_PREFIX + "epsilon", float("nan")))
            events.append((logging.INFO, f"round {round_num}: site {name} declined: one more round would exceed "
                                         f"its privacy budget (epsilon {epsilon:.3g})"))
            continue
        weight = float(metrics["num_examples"])
        if weight == 0:
            entry["status"] = "no examples"
            events.append((logging.INFO, f"round {round_num}: site {name} has no training images; "
                                         "it contributes nothing"))
            continue
        if reply.arrays is None:
            entry["status"] = "rejected: no weights"
            events.append((logging.WARNING, f"round {round_num}: rejected the update of site {name}: "
                                            "key 'arrays' (the weights) is missing"))
            continue
        problems = validate_update(reply.arrays, expected_shapes)
        if reply.payload_kind not in (PAYLOAD_WEIGHTS, PAYLOAD_DELTA):
            problems.append(f"key 'payload' is {reply.payload_kind!r}")
        if problems:
            entry["status"] = "rejected: " + "; ".join(problems)
            events.append((logging.WARNING, f"round {round_num}: rejected the update of site {name}: "
                                            + "; ".join(problems)))
            continue
        update = site_update(decode_from_transfer(reply.arrays), reply.payload_kind, sent)
        accepted.append((name, update, weight, metrics))
        entry["status"] = "ok"

    accepted.sort(key=lambda item: item[0])  # summation order fixed: resumable bit for bit
    outliers = norm_outliers({name: update_norm(u) for name, u, _, _ in accepted}, outlier_factor)
    for name, reason in outliers.items():
        outcome.sites[name]["status"] = f"rejected: {reason}"
        events.append((logging.WARNING, f"round {round_num}: rejected the update of site {name}: {reason}"))
    accepted = [item for item in accepted if item[0] not in outliers]
    contributing = outcome.contributing = len(accepted)
    if contributing and contributing >= min(min_sites, known_sites):
        combined = combine_updates([u for _, u, _, _ in accepted], [w for _, _, w, _ in accepted], rule,
                                   trim_fraction)
        outcome.weights = optimizer.step(transferred(global_weights), combined, plain_keys)
    elif contributing:
        events.append((logging.WARNING, f"round {round_num}: only {contributing} valid update(s), fewer than "
                                        f"min_sites={min_sites}: global weights unchanged"))
    else:
        events.append((logging.WARNING, f"round {round_num}: no valid update: global weights unchanged"))

    aggregated = weighted_metrics([m for *_, m in accepted], [w for _, _, w, _ in accepted], LOSS_KEYS)
    aggregated["num_examples"] = sum(w for _, _, w, _ in accepted)
    aggregated["sites"] = contributing
    speeds = [m["images_per_second"] for *_, m in accepted if "images_per_second" in m]
    if speeds:  # sites under DP report no timing: no figure rather than a throughput of 0
        aggregated["images_per_second"] = sum(speeds)
    outcome.aggregated = aggregated
    outcome.real_images_seen = int(sum(m.get("real_images_seen", 0.0) for *_, m in accepted))
    return outcome
