"""What travels between the server and the sites, and what both sides agree on.

- **weights on the wire**: the networks' state dicts flattened to ``{"G/<key>": tensor, ...}``,
  the keys that travel (``noise_const`` buffers do not: they are fixed random constants of the
  model, identical on every party because every party builds the networks from ``cfg.seed``), a
  digest of those constants so a site can check it built the same model, and the float16 transfer
  encoding;
- **the payload kinds** of a reply: new weights (float32 transfer) or their difference to what
  the site received (float16);
- **validation** of a site's update (keys, shapes, dtype, NaN/Inf), with messages that name the key;
- **the global weights at the start of a run**, built from ``cfg.seed`` by every party.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch

from medstylegan2.config import RunConfig
from medstylegan2.trainer import NETWORK_NAMES, SiteTrainer

# Weights travel as ``<network>/<state-dict key>``; these state-dict entries never travel.
CONSTANT_SUFFIXES: tuple[str, ...] = ("noise_const",)
# What a reply's arrays hold: the new weights themselves (float32 transfer) or the difference to
# the weights the site received (float16 transfer: an update is small, so float16 keeps far more
# of its precision than it would keep of the weights).
PAYLOAD_WEIGHTS = "weights"
PAYLOAD_DELTA = "delta"
# Every metric and record key is snake_case (``num_examples``, ``loss_g``); a site's privacy
# figures travel as ``dp_<key of DPEngine.round_record>`` (``dp_epsilon``, ``dp_steps``, ...).
PRIVACY_PREFIX = "dp_"

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


def buffer_keys_of(trainer: SiteTrainer) -> set[str]:
    keys = set()
    for name in NETWORK_NAMES:
        for key, _ in trainer.network(name).named_buffers():
            keys.add(f"{name}/{key}")
    return keys


# ----------------------------------------------------------------------------------------------
# Transfer encoding


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
# Global weights at the start of a run


def initial_weights(cfg: RunConfig) -> tuple[Flat, set[str]]:
    """The global model every party builds from ``cfg.seed`` (constants included) + buffer keys."""
    empty = np.zeros((0, 1, cfg.model.resolution, cfg.model.resolution), dtype=np.uint8)
    trainer = SiteTrainer(cfg, empty, np.zeros(0, dtype=np.int64), device="cpu", seed=cfg.seed)
    if cfg.train.init_checkpoint:
        from medstylegan2.warm_start import load_init_weights

        load_init_weights(trainer, cfg.train.init_checkpoint)
    return flatten_weights(trainer.get_weights()), buffer_keys_of(trainer)
