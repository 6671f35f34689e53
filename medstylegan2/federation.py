"""Federated training logic that does not need Flower: callable and testable on its own.

The Flower apps in ``client/`` and ``server/`` only convert between Flower records and the plain
dictionaries used here. This module holds:

- **weights on the wire**: the networks' state dicts flattened to ``{"G/<key>": tensor, ...}``,
  the keys that travel (``noise_const`` buffers do not: they are fixed random constants of the
  model, identical on every party because every party builds the networks from ``cfg.seed``), a
  digest of those constants so a site can check it built the same model, and the float16 transfer
  encoding;
- **validation** of a site's update (keys, shapes, dtype, NaN/Inf), with messages that name the key;
- **aggregation**: the example-weighted average of site updates and the server optimizers
  (FedAvg, FedAvgM, FedAdam) applied to that average, with state for exact resume;
- **partitioning** of a training set over sites with flwr-datasets partitioners, and the
  site x class table;
- **one site round**: seeding, loading the global weights into a ``SiteTrainer``, restoring the
  site's local state, K local steps, and the payload and metrics that leave the site;
- **local state**: what a site keeps between rounds (optimizer moments, path-length mean, batch
  sampler, counters, privacy accountant) and its on-disk store for resuming after a crash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from medstylegan2.config import CLASS_NAMES, RunConfig
from medstylegan2.trainer import NETWORK_NAMES, ShuffleSampler, SiteTrainer

log = logging.getLogger(__name__)

# Weights travel as ``<network>/<state-dict key>``; these state-dict entries never travel.
CONSTANT_SUFFIXES: tuple[str, ...] = ("noise_const",)
# What a reply's arrays hold: the new weights themselves (float32 transfer) or the difference to
# the weights the site received (float16 transfer: an update is small, so float16 keeps far more
# of its precision than it would keep of the weights).
PAYLOAD_WEIGHTS = "weights"
PAYLOAD_DELTA = "delta"

Flat = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Weights <-> flat dictionaries


def flatten_weights(weights: Mapping[str, Mapping[str, torch.Tensor]]) -> Flat:
    """{"G": state_dict, "G_ema": ..., "D": ...} -> {"G/key": tensor, ...} (CPU, float32 kept)."""
    flat: Flat = {}
    for name in NETWORK_NAMES:
        for key, value in weights[name].items():
            flat[f"{name}/{key}"] = value.detach().cpu()
    return flat


def unflatten_weights(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {name: {} for name in NETWORK_NAMES}
    for full_key, value in flat.items():
        name, _, key = full_key.partition("/")
        if name not in nested or not key:
            raise KeyError(f"weight key {full_key!r} does not start with one of {', '.join(NETWORK_NAMES)}/")
        nested[name][key] = value
    return nested


def is_constant(key: str) -> bool:
    """True for model constants that never travel (fixed noise images of the synthesis layers)."""
    return key.rsplit(".", 1)[-1] in CONSTANT_SUFFIXES


def transferred(flat: Mapping[str, torch.Tensor]) -> Flat:
    """The entries that travel between server and sites."""
    return {k: v for k, v in flat.items() if not is_constant(k)}


def constants_of(flat: Mapping[str, torch.Tensor]) -> Flat:
    return {k: v for k, v in flat.items() if is_constant(k)}


def constants_digest(flat: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the model constants: equal digests mean both sides built the same model."""
    h = hashlib.sha256()
    for key in sorted(k for k in flat if is_constant(k)):
        h.update(key.encode())
        h.update(flat[key].detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


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


def buffer_keys_of(trainer: SiteTrainer) -> set[str]:
    keys = set()
    for name in NETWORK_NAMES:
        for key, _ in trainer.network(name).named_buffers():
            keys.add(f"{name}/{key}")
    return keys


def encode_for_transfer(flat: Mapping[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    """Tensors -> numpy arrays in the transfer dtype ("float32" or "float16")."""
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        array = value.detach().cpu().numpy()
        out[key] = array.astype(np_dtype) if np.issubdtype(array.dtype, np.floating) else array
    return out


def decode_from_transfer(arrays: Mapping[str, np.ndarray]) -> Flat:
    """Numpy arrays (float16 or float32) -> float32 tensors; other dtypes are kept."""
    out: Flat = {}
    for key, array in arrays.items():
        array = np.asarray(array)
        dtype = np.float32 if np.issubdtype(array.dtype, np.floating) else array.dtype
        # np.array (not ascontiguousarray, which turns 0-d scalars into 1-d) keeps the shape.
        out[key] = torch.from_numpy(np.array(array, dtype=dtype, order="C", copy=True))
    return out


def as_received(flat: Mapping[str, torch.Tensor], dtype: str) -> Flat:
    """What a site holds after receiving ``flat`` in ``dtype``: the rounding both sides agree on."""
    return decode_from_transfer(encode_for_transfer(flat, dtype))


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in a payload (without Flower's framing)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


# ----------------------------------------------------------------------------------------------
# Validation of a site's update


def validate_update(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems with a payload, each naming the key; an empty list means it may be aggregated."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key in sorted(set(arrays) & set(expected)):
        array = np.asarray(arrays[key])
        if tuple(array.shape) != tuple(expected[key]):
            problems.append(f"key {key!r} has shape {tuple(array.shape)}, expected {tuple(expected[key])}")
            continue
        if array.dtype not in (np.float32, np.float16):
            problems.append(f"key {key!r} has dtype {array.dtype}, expected float32 or float16")
            continue
        if not np.all(np.isfinite(array)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            problems.append(f"key {key!r} holds {bad} NaN/Inf value(s)")
    return problems


# ----------------------------------------------------------------------------------------------
# Aggregation


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
# Partitioning (flwr-datasets partitioners over a table of labels)


def partition_indices(labels: np.ndarray, num_sites: int, partitioner: str, *, dirichlet_alpha: float = 0.5,
                      quantity_alpha: float = 1.0, seed: int = 0,
                      min_partition_size: Optional[int] = None) -> list[np.ndarray]:
    """Split example indices over ``num_sites`` sites; deterministic for a seed.

    - ``iid``: IidPartitioner over a shuffled table (near-equal sizes, same class mix);
    - ``dirichlet``: DirichletPartitioner on the label (label skew; smaller alpha, more skew);
    - ``quantity``: site sizes drawn from Dirichlet(quantity_alpha) over sites, then
      SizePartitioner over a shuffled table (same class mix, unequal sizes).
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if n < num_sites:
        raise ValueError(f"cannot split {n} training images over {num_sites} sites")
    if min_partition_size is None:
        min_partition_size = max(1, min(10, n // (2 * num_sites)))
    table = datasets.Dataset.from_dict({"index": np.arange(n), "label": labels})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_sites)
        part.dataset = table.shuffle(seed=seed)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_sites, partition_by="label", alpha=dirichlet_alpha,
                                    min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
                                    seed=seed)
        part.dataset = table
    elif partitioner == "quantity":
        part = SizePartitioner(partition_sizes=quantity_sizes(n, num_sites, quantity_alpha, seed=seed,
                                                               minimum=min_partition_size))
        part.dataset = table.shuffle(seed=seed)
    else:
        raise ValueError(f"partitioner must be one of iid, dirichlet, quantity, got {partitioner!r}")
    return [np.sort(np.asarray(part.load_partition(i)["index"], dtype=np.int64)) for i in range(num_sites)]


def quantity_sizes(n: int, num_sites: int, alpha: float, *, seed: int, minimum: int = 1) -> list[int]:
    """Site sizes summing to ``n``: ``minimum`` each plus Dirichlet(alpha) shares of the rest."""
    minimum = max(1, min(minimum, n // num_sites))
    rest = n - minimum * num_sites
    shares = np.random.default_rng(seed).dirichlet([alpha] * num_sites)
    sizes = np.floor(shares * rest).astype(int)
    # Hand out the remainder of the rounding to the largest fractional parts.
    remainder = rest - int(sizes.sum())
    order = np.argsort(-(shares * rest - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return [int(s) + minimum for s in sizes]


def partition_table(labels: np.ndarray, parts: Sequence[np.ndarray],
                    class_names: Sequence[str] = CLASS_NAMES) -> list[dict[str, int]]:
    """One row per site: {"site": i, "<class>": count, ..., "total": n}."""
    rows = []
    for i, idx in enumerate(parts):
        counts = np.bincount(np.asarray(labels)[idx], minlength=len(class_names))
        row = {"site": i}
        row.update({name: int(c) for name, c in zip(class_names, counts)})
        row["total"] = int(len(idx))
        rows.append(row)
    return rows


def format_partition_table(rows: Sequence[Mapping[str, int]], class_names: Sequence[str] = CLASS_NAMES) -> str:
    header = ["site", *class_names, "total"]
    widths = [max(len(h), 6) for h in header]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for row in rows:
        lines.append("  ".join(str(row[h]).rjust(w) for h, w in zip(header, widths)))
    totals = ["all"] + [str(sum(int(r[h]) for r in rows)) for h in header[1:]]
    lines.append("  ".join(t.rjust(w) for t, w in zip(totals, widths)))
    return "\n".join(lines)


def write_partition_csv(rows: Sequence[Mapping[str, int]], path: str | Path,
                        class_names: Sequence[str] = CLASS_NAMES) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["site", *class_names, "total"]
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# A site's data


@dataclass
class SiteData:
    name: str                 # stable site identity: seeds and state folders depend on it
    images: np.ndarray        # uint8 [N, 1, H, W]; never leaves the site
    labels: np.ndarray        # int64 [N]
    groups: Optional[np.ndarray] = None  # int64 [N] patient numbers (ImageSet.groups); never leaves the site


def _data_key(cfg: RunConfig) -> str:
    return json.dumps({"data": dataclasses.asdict(cfg.data), "resolution": cfg.model.resolution}, sort_keys=True)


@functools.lru_cache(maxsize=2)
def _cached_split(key: str):
    from medstylegan2.config import DataConfig
    from medstylegan2.data import load_dataset

    spec = json.loads(key)
    return load_dataset(DataConfig(**spec["data"]), spec["resolution"])


def load_split(cfg: RunConfig):
    """(train, heldout) ImageSets of ``cfg.data`` at the model resolution (cached per process)."""
    return _cached_split(_data_key(cfg))


@functools.lru_cache(maxsize=4)
def _cached_partitions(key: str, num_sites: int) -> tuple[np.ndarray, ...]:
    spec = json.loads(key)
    train, _ = _cached_split(spec["data_key"])
    return tuple(partition_indices(train.labels, num_sites, spec["partitioner"], dirichlet_alpha=spec["dirichlet_alpha"],
                                   quantity_alpha=spec["quantity_alpha"], seed=spec["seed"]))


def simulation_partitions(cfg: RunConfig, num_sites: int) -> tuple[Any, tuple[np.ndarray, ...]]:
    """The training split and the indices of every simulated site (same on server and sites)."""
    f = cfg.federation
    key = json.dumps({"data_key": _data_key(cfg), "partitioner": f.partitioner, "dirichlet_alpha": f.dirichlet_alpha,
                      "quantity_alpha": f.quantity_alpha, "seed": cfg.seed}, sort_keys=True)
    train, _ = load_split(cfg)
    return train, _cached_partitions(key, num_sites)


def site_name(node_config: Mapping[str, Any]) -> str:
    """A site's name: node config ``site-name``, else its data folder's name, else ``site-<partition-id>``."""
    if node_config.get("site-name"):
        return site_key(str(node_config["site-name"]))
    if node_config.get("data-dir"):
        return site_key(Path(str(node_config["data-dir"])).name)
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    raise ValueError("this SuperNode has neither 'data-dir' nor 'partition-id' in its node config; start it with "
                     "--node-config \"data-dir=/path/to/images site-name=hospital-a\"")


def load_site_data(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteData:
    """This site's training images: its own folder (deployment) or its partition (simulation).

    Deployment: ``data-dir`` is a ``<class>/*.png`` folder, a DICOM archive or a COVID-QU-Ex root,
    read at the model resolution; the site trains on its training split (``data.heldout_fraction``
    stays home). Labels, filters, salt and cache folder come from the node config
    (``ingest.site_data_config``), never from the server.
    Simulation: ``partition-id`` of ``num-partitions`` over the training split of ``cfg.data``.
    """
    name = site_name(node_config)
    if node_config.get("data-dir"):
        from medstylegan2.ingest import site_data_config

        site_cfg = dataclasses.replace(cfg, data=site_data_config(cfg.data, node_config))
        train = _cached_folder(str(node_config["data-dir"]), _data_key(site_cfg))
        return SiteData(name=name, images=train.images, labels=train.labels, groups=train.groups)
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != cfg.federation.sites:
        log.warning("simulation has %d virtual sites but federation.sites is %d; partitioning over %d",
                    num, cfg.federation.sites, num)
    train, parts = simulation_partitions(cfg, num)
    idx = parts[pid]
    return SiteData(name=name, images=train.images[idx], labels=train.labels[idx])


@functools.lru_cache(maxsize=2)
def _cached_folder(data_dir: str, key: str):
    from medstylegan2.config import DataConfig
    from medstylegan2.data import resolve_data_argument

    spec = json.loads(key)
    train, _ = resolve_data_argument(data_dir, spec["resolution"], base=DataConfig(**spec["data"]))
    return train


# ----------------------------------------------------------------------------------------------
# Seeds


def site_seed(seed: int, round_num: int, site: str) -> int:
    """A 63-bit seed that depends only on (run seed, round, site), stable across processes."""
    digest = hashlib.sha256(f"{seed}:{round_num}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def seed_round(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_sites(sites: Sequence[str], fraction: float, min_sites: int, *, seed: int, round_num: int) -> list[str]:
    """The sites that train in a round: ceil(fraction * n), at least ``min_sites``, reproducible."""
    ordered = sorted(sites)
    count = min(len(ordered), max(min_sites, math.ceil(fraction * len(ordered))))
    if count >= len(ordered):
        return ordered
    rng = random.Random(site_seed(seed, round_num, "__sampling__"))
    return sorted(rng.sample(ordered, count))


def site_key(name: str) -> str:
    """A site name safe for file names and logs."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-.")
    if not key:
        raise ValueError(f"site name {name!r} has no usable characters")
    return key


# ----------------------------------------------------------------------------------------------
# Global weights at the start of a run


def initial_weights(cfg: RunConfig) -> tuple[Flat, set[str]]:
    """The global model every party builds from ``cfg.seed`` (constants included) + buffer keys."""
    empty = np.zeros((0, 1, cfg.model.resolution, cfg.model.resolution), dtype=np.uint8)
    trainer = SiteTrainer(cfg, empty, np.zeros(0, dtype=np.int64), device="cpu", seed=cfg.seed)
    return flatten_weights(trainer.get_weights()), buffer_keys_of(trainer)


# ----------------------------------------------------------------------------------------------
# What a site keeps between rounds


def local_state_of(trainer: SiteTrainer) -> dict[str, Any]:
    """Everything local that should carry over to the site's next round (never sent anywhere).

    Kept: both Adam optimizers' moments (a fresh Adam would take a full-size sign step on the first
    step of every round), the path-length running mean, the batch sampler's epoch order, the step
    and image counters (EMA ramp-up and the diversity-loss decay read them) and the privacy
    engine's state (so that epsilon composes over all rounds). Not kept: the networks (they come
    from the server) and the RNG (every round is seeded from (seed, round, site)).
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


def round_numbers_in(folder: str | Path) -> list[int]:
    """Sorted N of every ``round_N.pt`` in a folder (other names ignored; a missing folder has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("round_*.pt"):
        try:
            found.append(int(path.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(found)


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
        return self.folder / f"round_{round_num:03d}.pt"

    def latest_before(self, round_num: int) -> Optional[tuple[int, bytes]]:
        earlier = [r for r in self.rounds() if r < round_num]
        if not earlier:
            return None
        return earlier[-1], self.path(earlier[-1]).read_bytes()

    def save(self, round_num: int, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(round_num).with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.path(round_num))
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
                   privacy_factory: Optional[Any] = None, device: Optional[str] = None,
                   constants_check: Optional[str] = None) -> SiteRoundResult:
    """Train one site for ``cfg.federation.local_steps`` steps from the received global weights.

    ``received`` are the arrays as they arrived (transfer dtype, no constants). A site without
    images returns the received weights unchanged with num-examples 0. ``privacy_factory``, when
    given, is called as ``privacy_factory(cfg, num_examples, planned_steps, seed)`` and returns the
    engine (or None); its restored state decides whether this round would exceed the budget, in
    which case the site declines: no payload, ``declined`` = 1.
    """
    f = cfg.federation
    dtype = f.transfer_dtype
    start = decode_from_transfer(received)
    num_examples = int(len(labels))
    if num_examples == 0:
        # Nothing to learn from: send the weights back unchanged (a zero update under float16).
        if dtype == "float32":
            payload, kind = encode_for_transfer(start, dtype), PAYLOAD_WEIGHTS
        else:
            payload, kind = encode_for_transfer({k: torch.zeros_like(v) for k, v in start.items()}, dtype), PAYLOAD_DELTA
        return SiteRoundResult(payload=payload, payload_kind=kind, metrics={"num-examples": 0.0, "steps": 0.0},
                               local_state=None)

    seed = site_seed(cfg.seed, round_num, site)
    engine = None
    if privacy_factory is not None:
        planned = f.local_steps * f.rounds
        engine = privacy_factory(cfg, num_examples, planned, site_seed(cfg.seed, 0, site))
    # The trainer is built from cfg.seed, as the server built the global model: the constants
    # (fixed noise buffers) are then identical and need not travel.
    trainer = SiteTrainer(cfg, images, labels, device=device, seed=cfg.seed, privacy=engine)
    full = flatten_weights(trainer.get_weights())
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
    else:
        trainer.sampler = ShuffleSampler(num_examples, cfg.train.batch_size, seed=seed % 2**62 + 1)
    if f.proximal_mu > 0:
        nested = unflatten_weights({k: v.to(trainer.device) for k, v in full.items()})
        trainer.proximal_reference = {"G": nested["G"], "D": nested["D"]}

    if engine is not None and hasattr(engine, "would_exceed_budget") and engine.would_exceed_budget(f.local_steps):
        metrics = {"num-examples": 0.0, "declined": 1.0, "steps": 0.0}
        metrics.update(_privacy_metrics(engine, round_num))
        return SiteRoundResult(payload={}, payload_kind=PAYLOAD_WEIGHTS, metrics=metrics,
                               local_state=local_state_of(trainer))

    seed_round(seed)
    stats = trainer.train_steps(f.local_steps)
    new = transferred(flatten_weights(trainer.get_weights()))
    if dtype == "float32":
        payload, kind = encode_for_transfer(new, dtype), PAYLOAD_WEIGHTS
    else:
        payload, kind = encode_for_transfer({k: new[k] - start[k] for k in new}, dtype), PAYLOAD_DELTA
    metrics = {"num-examples": float(num_examples), "steps": float(f.local_steps)}
    for key in ("loss_g", "loss_d_fake", "loss_d_real", "loss_pl", "loss_ds", "loss_r1", "images_per_second",
                "real_images_seen", "seconds"):
        if key in stats:
            metrics[key] = float(stats[key])
    if engine is not None:
        metrics.update(_privacy_metrics(engine, round_num))
    return SiteRoundResult(payload=payload, payload_kind=kind, metrics=metrics, local_state=local_state_of(trainer))


def _privacy_metrics(engine: Any, round_num: int) -> dict[str, float]:
    """Scalar privacy figures for the reply (epsilon, delta, ...), from the engine's round record."""
    if not hasattr(engine, "round_record"):
        return {}
    record = engine.round_record(round_num)
    return {f"dp-{k}": float(v) for k, v in dict(record).items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def json_line(record: Mapping[str, Any]) -> str:
    """One metrics.jsonl line; NaN/Inf become null so every line is valid JSON."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(dict(record)), sort_keys=False)
