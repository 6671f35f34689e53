"""How a site trainer runs fast on its device, without changing what it computes.

Everything here is a choice of arithmetic, not of model or loss: the parameters, their
state-dict keys, the optimizer and the losses are the same on every path. From ``cfg.train``:

- ``precision``: ``auto`` is bf16 autocast for G and D on CUDA GPUs that support bf16, and fp32
  everywhere else (so CPU runs are untouched); ``bf16`` forces autocast (on CPU too, slowly: for
  tests); ``fp32`` turns it off. Under autocast the weights, their gradients, Adam's state and the
  losses stay fp32 (master weights); only the operations autocast lists run in bf16. bf16 has
  fp32's exponent range, so no loss scaling is needed.
- ``memory_format``: ``channels_last`` keeps activations and conv weights NHWC, the layout
  cuDNN's and oneDNN's convolutions prefer; ``auto`` uses it on every device (measured faster on
  CPU too, DP included: see README, Benchmarks). Weights still leave the trainer contiguous.
- ``compile``: ``torch.compile`` the G synthesis and D calls that no double backward runs through
  (compiled graphs do not support one): G's main step, the fakes for D, and D's steps without R1.
  Off by default; worth trying on a GPU.

Also: Adam is fused on CUDA and foreach (one kernel per op over all tensors) elsewhere; the G_ema
update is one ``torch._foreach_lerp_``; and per-step statistics stay on the device as tensors
(``DeviceStats``), read once per ``train_steps`` call, so that a CUDA step queues its kernels
without waiting for the GPU (a ``.item()`` per loss would stall the queue every step).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """The resolved choices for one trainer on one device."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype]   # None: no autocast (fp32)
    channels_last: bool
    compile: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for G and D's forward passes (a no-op context under fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        return (f"{self.device.type}: {self.precision}, "
                f"{'channels_last' if self.channels_last else 'contiguous'}, compile {'on' if self.compile else 'off'}")


def resolve_acceleration(train_cfg: Any, device: torch.device) -> Acceleration:
    """``Acceleration`` from ``cfg.train.precision/memory_format/compile`` for ``device``."""
    precision = getattr(train_cfg, "precision", "auto")
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        bf16 = precision == "bf16"
    if bf16 and device.type == "cpu":
        log.warning("train.precision=bf16 on CPU: bf16 autocast runs, but slower than fp32 on most CPUs")
    memory_format = getattr(train_cfg, "memory_format", "auto")
    return Acceleration(device=device, autocast_dtype=torch.bfloat16 if bf16 else None,
                        channels_last=memory_format in ("auto", "channels_last"),
                        compile=bool(getattr(train_cfg, "compile", False)))


# ----------------------------------------------------------------------------------------------
# Memory layout


def to_memory_format(modules: Iterable[nn.Module], channels_last: bool) -> None:
    """Conv weights (every 4-d parameter and buffer) in channels_last; activations follow them."""
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)


def match_grad_layouts(module: nn.Module) -> None:
    """Every ``.grad`` in its parameter's memory layout (a copy only where they differ)."""
    for p in module.parameters():
        if p.grad is not None and p.grad.stride() != p.stride():
            p.grad = torch.empty_like(p).copy_(p.grad)


def images_in_format(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


# ----------------------------------------------------------------------------------------------
# Optimizer and EMA


def make_adam(params: Iterable[nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
              device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel on CUDA and foreach (multi-tensor) elsewhere: same update rule."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


@torch.no_grad()
def ema_update_(ema: nn.Module, source: nn.Module, beta: float) -> None:
    """ema = source + beta * (ema - source) for every parameter; buffers copied (w_avg).

    One foreach lerp over all parameters instead of a lerp and a copy per tensor.
    """
    ema_params = list(ema.parameters())
    params = [p.detach() for p in source.parameters()]
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), source.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------
# torch.compile


def maybe_compile(fn: Callable, enabled: bool, *, backend: Optional[str] = None) -> Callable:
    """``torch.compile(fn)`` when enabled, else ``fn`` itself (same parameters either way).

    Only for calls that no double backward goes through: R1 and path length stay eager.
    ``backend`` is for tests (``aot_eager`` exercises the wiring on CPU without a C++ toolchain).
    """
    if not enabled:
        return fn
    kwargs = {"backend": backend} if backend else {}
    return torch.compile(fn, **kwargs)


# ----------------------------------------------------------------------------------------------
# Statistics without host syncs


@dataclass
class DeviceStats:
    """Running sums of per-step statistics (tensors on the device or numbers), read once."""

    sums: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            else:
                value = float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """Means as Python floats: the one host sync of a ``train_steps`` call."""
        keys = list(self.sums)
        tensors = [self.sums[k] for k in keys if isinstance(self.sums[k], torch.Tensor)]
        values = iter(torch.stack(tensors).cpu().tolist()) if tensors else iter(())
        out = {}
        for key in keys:
            total = next(values) if isinstance(self.sums[key], torch.Tensor) else self.sums[key]
            out[key] = total / self.counts[key]
        return out


def as_floats(stats: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items()}


def copy_indices_to(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU indices to ``device`` without a host sync (pinned memory, asynchronous copy on CUDA)."""
    if device.type == "cuda":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)
