"""Site data: partitioning a training set over virtual sites, and loading a site's own images.

The one module under ``medstylegan2/`` that may import Flower's packages: flwr-datasets'
partitioners (IID, Dirichlet label skew, quantity skew) split the training set of a simulation
(``tests/test_architecture.py`` allows it here and nowhere else in the core). Also here: the
site x class table (printed, and ``partition.csv``), a site's name from its node config, and
``load_site_data``: a real site's own folder (deployment) or its partition (simulation).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medstylegan2.config import CLASS_NAMES, RunConfig
from medstylegan2.ingest import site_data_config
from medstylegan2.runfolder import atomic_write, atomic_write_text

log = logging.getLogger(__name__)


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
    header = ["site", *class_names, "total"]
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# A site's data


@dataclass
class SiteData:
    name: str                 # stable site identity: seeds and state folders depend on it
    images: np.ndarray        # uint8 [N, 1, H, W]; never leaves the site
    labels: np.ndarray        # int64 [N]
    groups: Optional[np.ndarray] = None  # int64 [N] patient numbers (ImageSet.groups); never leaves the site
    sources: Optional[list[str]] = None  # each image's path under the data folder (a policy's patient_csv keys)


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
    # The driver partitions once and leaves the indices beside the decoded-image cache: every site
    # process of a simulation then reads a small file instead of importing flwr-datasets (with HF
    # datasets, pyarrow and pandas: ~190 MB and seconds of CPU per process on a crowded machine).
    stored = _partition_file(spec, num_sites, train.labels)
    if stored is not None and stored.is_file():
        try:
            with np.load(stored) as data:
                return tuple(data[f"site_{i}"] for i in range(num_sites))
        except (OSError, KeyError, ValueError):
            pass  # damaged: partition again below and rewrite it
    parts = tuple(partition_indices(train.labels, num_sites, spec["partitioner"], dirichlet_alpha=spec["dirichlet_alpha"],
                                    quantity_alpha=spec["quantity_alpha"], seed=spec["seed"]))
    if stored is not None:
        atomic_write(stored, lambda fh: np.savez(fh, **{f"site_{i}": p for i, p in enumerate(parts)}))
    return parts


def _partition_file(spec: Mapping[str, Any], num_sites: int, labels: np.ndarray) -> Optional[Path]:
    """Where the partition of ``spec`` over ``num_sites`` is kept (None without a data cache folder)."""
    cache_dir = json.loads(spec["data_key"])["data"].get("cache_dir")
    if not cache_dir:
        return None
    digest = hashlib.sha256(json.dumps({**spec, "num_sites": num_sites}, sort_keys=True).encode()
                            + np.ascontiguousarray(labels).tobytes()).hexdigest()[:20]
    return Path(cache_dir) / f"partition-{digest}.npz"


def simulation_partitions(cfg: RunConfig, num_sites: int) -> tuple[Any, tuple[np.ndarray, ...]]:
    """The training split and the indices of every simulated site (same on server and sites)."""
    f = cfg.federation
    key = json.dumps({"data_key": _data_key(cfg), "partitioner": f.partitioner, "dirichlet_alpha": f.dirichlet_alpha,
                      "quantity_alpha": f.quantity_alpha, "seed": cfg.seed}, sort_keys=True)
    train, _ = load_split(cfg)
    return train, _cached_partitions(key, num_sites)


def site_key(name: str) -> str:
    """A site name safe for file names and logs."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-.")
    if not key:
        raise ValueError(f"site name {name!r} has no usable characters")
    return key


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
        # The policy's patient ids group the images before the held-out split: no patient on both sides.
        site_data = dataclasses.replace(site_data_config(cfg.data, node_config),
                                        patient_csv=_policy_patient_csv(node_config, name))
        site_cfg = dataclasses.replace(cfg, data=site_data)
        train = _cached_folder(str(node_config["data-dir"]), _data_key(site_cfg))
        return SiteData(name=name, images=train.images, labels=train.labels, groups=train.groups,
                        sources=train.sources)
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != cfg.federation.sites:
        log.warning("simulation has %d virtual sites but federation.sites is %d; partitioning over %d",
                    num, cfg.federation.sites, num)
    train, parts = simulation_partitions(cfg, num)
    idx = parts[pid]
    return SiteData(name=name, images=train.images[idx], labels=train.labels[idx])


def _policy_patient_csv(node_config: Mapping[str, Any], site: str) -> Optional[str]:
    from medstylegan2.privacy.site import SitePrivacy

    policy = SitePrivacy.of_node(node_config, site).policy
    return None if policy is None else policy.patient_csv


@functools.lru_cache(maxsize=2)
def _cached_folder(data_dir: str, key: str):
    from medstylegan2.config import DataConfig
    from medstylegan2.data import resolve_data_argument

    spec = json.loads(key)
    train, _ = resolve_data_argument(data_dir, spec["resolution"], base=DataConfig(**spec["data"]))
    return train
