"""What travels between the server and the sites, and what both sides agree on.

- **weights on the wire**: the networks' state dicts flattened to ``{"G/<key>": tensor, ...}``,
  the keys that travel (``noise_const`` buffers do not: they are fixed random constants of the
  model, identical on every party because every party builds the networks from ``cfg.seed``), a
  digest of those constants so a site can check it built the same model, and the float16 and int8
  transfer encodings (int8: per-tensor symmetric scales, packed, with the site's error feedback);
- **the payload kinds** of a reply: new weights (float32 transfer) or their difference to what
  the site received (float16, int8);
- **validation** of a site's update (keys, shapes, dtype, NaN/Inf), with messages that name the key;
- **the global weights at the start of a run**, built from ``cfg.seed`` by every party.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import numpy as np
import torch

from medstylegan2.config import RunConfig
from medstylegan2.trainer import NETWORK_NAMES, SiteTrainer

# Weights travel as ``<network>/<state-dict key>``; these state-dict entries never travel.
CONSTANT_SUFFIXES: tuple[str, ...] = ("noise_const",)
# What a reply's arrays hold: the new weights themselves (float32 transfer) or the difference to
# the weights the site received (float16 and int8 transfer: an update is small, so a short format
# keeps far more of its precision than it would keep of the weights).
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
#
# int8: every tensor t travels as q = round(t / s) in [-127, 127] with its own scale
# s = max|t| / 127 (symmetric, per tensor), so |t - q s| <= s / 2. The int8 values of all tensors
# travel as ONE array, in sorted key order, and their scales as a second one: an array costs
# ~160 bytes of framing, which for ~190 tensors is 3% of an int8 payload. Both sides know the keys
# and shapes (they build the same model), so the packing needs no layout on the wire: the
# receiver unpacks with its own shapes (``decode_from_transfer(arrays, shapes)``) and a payload
# whose sizes do not fit is an error naming what is off.

INT8_VALUES_KEY = "int8/values"
INT8_SCALES_KEY = "int8/scales"
INT8_MAX = 127


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q int8 with q * scale ~ t, scale = max|t| / 127 (0 for an all-zero tensor)."""
    t = t.detach().to(torch.float32)
    scale = t.abs().max() / INT8_MAX if t.numel() else torch.zeros([])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(t / safe), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)


def quantize_with_error_feedback(update: Mapping[str, torch.Tensor], residual: Optional[Mapping[str, torch.Tensor]]
                                 ) -> tuple[dict[str, np.ndarray], Flat]:
    """A site's int8 update with error feedback: (payload, residual to keep for the next round).

    What did not fit into int8 last round (``residual``) is added to this round's update before it
    is quantized, and what does not fit now is kept: over rounds the server receives the sum of
    the updates up to one round's rounding, instead of losing every round's rounding for good.
    """
    carried: Flat = {}
    for key, value in update.items():
        value = value.detach().to(torch.float32)
        if residual is not None and key in residual and tuple(residual[key].shape) == tuple(value.shape):
            value = value + residual[key].to(value.device, torch.float32)
        carried[key] = value
    payload = encode_for_transfer(carried, "int8")
    sent = decode_from_transfer(payload, {k: tuple(v.shape) for k, v in carried.items()})
    return payload, {key: carried[key].cpu() - sent[key] for key in carried}


def is_packed_int8(arrays: Mapping[str, np.ndarray]) -> bool:
    return INT8_VALUES_KEY in arrays or INT8_SCALES_KEY in arrays


def _pack_int8(flat: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    keys = sorted(flat)
    parts, scales = [], []
    for key in keys:
        q, scale = quantize_int8(flat[key].cpu())
        parts.append(q.reshape(-1).numpy())
        scales.append(float(scale))
    values = np.concatenate(parts) if parts else np.zeros(0, np.int8)
    return {INT8_VALUES_KEY: values.astype(np.int8), INT8_SCALES_KEY: np.asarray(scales, dtype=np.float32)}


def _unpack_int8(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Flat:
    unexpected = sorted(set(arrays) - {INT8_VALUES_KEY, INT8_SCALES_KEY})
    if INT8_VALUES_KEY not in arrays or INT8_SCALES_KEY not in arrays or unexpected:
        raise ValueError(f"an int8 payload holds exactly the keys {INT8_VALUES_KEY!r} and {INT8_SCALES_KEY!r}"
                         + (f"; unexpected key {unexpected[0]!r}" if unexpected else ""))
    values, scales = np.asarray(arrays[INT8_VALUES_KEY]), np.asarray(arrays[INT8_SCALES_KEY])
    keys = sorted(shapes)
    sizes = [int(np.prod(shapes[k], dtype=np.int64)) for k in keys]
    if values.dtype != np.int8 or values.ndim != 1 or values.size != sum(sizes):
        raise ValueError(f"key {INT8_VALUES_KEY!r} must be 1-d int8 with {sum(sizes)} values (the model's), "
                         f"got {values.dtype} of shape {tuple(values.shape)}")
    if scales.dtype != np.float32 or scales.shape != (len(keys),):
        raise ValueError(f"key {INT8_SCALES_KEY!r} must be float32 of shape ({len(keys)},), "
                         f"got {scales.dtype} of shape {tuple(scales.shape)}")
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError(f"key {INT8_SCALES_KEY!r} holds a negative or non-finite scale")
    out: Flat = {}
    offset = 0
    for key, size, scale in zip(keys, sizes, scales.tolist()):
        q = torch.from_numpy(np.array(values[offset:offset + size], copy=True)).reshape(shapes[key])
        out[key] = dequantize_int8(q, torch.tensor(scale, dtype=torch.float32))
        offset += size
    return out


def encode_for_transfer(flat: Mapping[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    """Tensors -> numpy arrays in the transfer dtype ("float32", "float16" or packed "int8")."""
    if dtype == "int8":
        return _pack_int8(flat)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        array = value.detach().cpu().numpy()
        out[key] = array.astype(np_dtype) if np.issubdtype(array.dtype, np.floating) else array
    return out


def decode_from_transfer(arrays: Mapping[str, np.ndarray],
                         shapes: Optional[Mapping[str, tuple[int, ...]]] = None) -> Flat:
    """Numpy arrays (float16 or float32) -> float32 tensors; other dtypes are kept.

    A packed int8 payload needs ``shapes`` (the receiver's own keys and shapes) and raises
    ``ValueError`` naming the key when it does not fit them.
    """
    if is_packed_int8(arrays):
        if shapes is None:
            raise ValueError("an int8 payload can only be unpacked with the model's keys and shapes")
        return _unpack_int8(arrays, shapes)
    out: Flat = {}
    for key, array in arrays.items():
        array = np.asarray(array)
        dtype = np.float32 if np.issubdtype(array.dtype, np.floating) else array.dtype
        # np.array (not ascontiguousarray, which turns 0-d scalars into 1-d) keeps the shape.
        out[key] = torch.from_numpy(np.array(array, dtype=dtype, order="C", copy=True))
    return out


def as_received(flat: Mapping[str, torch.Tensor], dtype: str) -> Flat:
    """What a site holds after receiving ``flat`` in ``dtype``: the rounding both sides agree on."""
    return decode_from_transfer(encode_for_transfer(flat, dtype), {k: tuple(v.shape) for k, v in flat.items()})


def zero_update_like(received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A delta payload of zeros in the format of ``received`` (float16 arrays or packed int8)."""
    return {key: np.zeros_like(np.asarray(array)) for key, array in received.items()}


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
