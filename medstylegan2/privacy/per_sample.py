"""Exact per-sample gradients of D's real-data loss (logistic + R1 + class head), with ``torch.func``.

The real-data loss of D is ``softplus(-D(x)) + r1_weight * ||grad_x D(x)||^2`` (+ the class
head's cross-entropy when D has one). The R1 term is a
double backward that Opacus' grad-sample hooks do not support (every mode fails or, with ``ew``,
is silently wrong), so each sample's gradient is taken exactly with
``vmap(grad(loss_of_one_sample))`` over ``functional_call(D, params, ...)``, with a nested ``grad``
w.r.t. the input for R1. Clipping, noise and accounting are the engine's (``privacy.engine``).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from medstylegan2.privacy.layer_grads import first_order_per_sample_gradients

log = logging.getLogger(__name__)

# Compiled per-sample functions per D architecture, R1 weight, class-loss weight and padded size (``_masked_function``).
_COMPILED: dict[tuple, Callable] = {}


def padded_batch_size(expected_batch_size: float, num_examples: int, *, multiple: int = 8) -> int:
    """A fixed batch size for Poisson batches: the mean plus 4 standard deviations, rounded up.

    A Poisson batch of expected size B = q n has size ~ Binomial(n, q): above B + 4 sqrt(B (1 - q))
    in about 3 of 100,000 steps, which then take a second padded chunk. Rounded up to a multiple
    of ``multiple`` (tensor-core and kernel-tile friendly).
    """
    q = min(1.0, expected_batch_size / max(num_examples, 1))
    size = expected_batch_size + 4.0 * math.sqrt(expected_batch_size * (1.0 - q))
    size = min(float(num_examples), size)
    return max(multiple, int(math.ceil(size / multiple)) * multiple)


# Whether a discriminator class can be vmapped over its labels (its forward reads no label values).
_LABELS_VMAP_SAFE: dict[type, bool] = {}


def per_sample_real_gradients(D: nn.Module, images: torch.Tensor, labels: torch.Tensor, r1_weight: float,
                              class_weight: float = 0.0, *, pad_to: Optional[int] = None, compile: bool = False,
                              layer_gradients: bool = True, chunk_size: Optional[int] = None
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Exact per-sample gradients of ``softplus(-D(x)) + r1_weight * ||grad_x D(x)||^2``
    (+ ``class_weight * CE(head(x), y)`` with D's class head: the same loss as
    ``losses.discriminator_real_loss_per_sample``, so the class term is clipped and noised too).

    Returns ``(grads, losses, order)``: ``grads[name]`` has shape ``[m, *param.shape]`` for every
    named parameter of D, ``losses`` has shape ``[m]``, and row ``i`` of both belongs to sample
    ``order[i]`` of the input. ``m = 0`` gives empty tensors of the right shapes.

    The order matters because ``vmap`` cannot batch ``F.one_hot`` (it reads the labels' values),
    which D's class embedding calls. For such a D the samples are grouped by class and each group
    is one ``vmap`` call with its label held constant; the order of per-sample gradients does not
    matter to clipping and summing. A D whose forward is vmap-safe in the labels gets one call
    over the whole batch (found out once per D class).

    ``pad_to`` (for GPUs): every ``vmap`` call gets exactly ``pad_to`` rows, the batch padded
    with blank rows whose loss is multiplied by a mask of 0, so shapes are static (one compiled
    graph, no per-size recompilation or kernel re-tuning). Then ``grads[name]`` has a multiple of
    ``pad_to`` rows: rows ``m`` and beyond are padding with gradients of exactly 0 (``0 * g`` for a
    finite ``g``), which per-sample clipping leaves at 0 and the sum ignores; ``losses`` and
    ``order`` cover the m real samples only. This changes nothing about privacy: which images are
    in the batch is still decided by Poisson sampling alone, the noise and the 1/(q n) scaling do
    not depend on the batch size, and the accountant only sees (sigma, q, steps). A padded row
    holds no one's data and contributes exactly nothing. ``compile``: ``torch.compile`` the
    per-sample function (CUDA; needs a label-vmap-safe D).

    ``layer_gradients``: without R1 and padding, take the gradients from one batched pass
    (``privacy.layer_grads``: the same values) when D's layers allow it; False forces ``vmap``.

    ``chunk_size`` (for CPUs): ``vmap`` over at most this many samples at a time. Each sample's
    gradient is computed alone either way, so the values are the same; the double backward's
    intermediates are held for one chunk instead of the whole batch (at batch 256, 32 px: a peak
    of 1.0 GB instead of 1.5 GB, ``bench/dp_memory.py``).
    """
    params = {name: p.detach() for name, p in D.named_parameters()}
    m = images.shape[0]
    if m == 0:
        rows = pad_to or 0
        empty = {name: p.new_zeros((rows, *p.shape)) for name, p in params.items()}
        return empty, images.new_zeros(0), labels.new_zeros(0)
    if layer_gradients and r1_weight <= 0 and pad_to is None:
        # Without R1 (15 of 16 steps): from the layers' inputs and output gradients of one batched
        # pass (privacy.layer_grads), the same values as vmap, faster (bench/dp_overhead.py).
        fast = first_order_per_sample_gradients(D, images, labels, class_weight)
        if fast is not None:
            return fast[0], fast[1], torch.arange(m, device=labels.device)

    def logit(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return functional_call(D, p, (x.unsqueeze(0), label.view(1))).reshape(())

    if class_weight > 0:
        loss_one = _loss_with_class_term(D, r1_weight, class_weight)
    elif r1_weight > 0:
        def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            # Nested grad w.r.t. this sample's image: the R1 penalty of this sample alone.
            image_grad, value = grad_and_value(logit, argnums=1)(p, x, label)
            return F.softplus(-value) + r1_weight * image_grad.square().sum()
    else:
        def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return F.softplus(-logit(p, x, label))

    if pad_to is not None and _LABELS_VMAP_SAFE.get(type(D), True):
        return _padded_per_sample(D, loss_one, params, images, labels, r1_weight, class_weight, pad_to, compile)

    if _LABELS_VMAP_SAFE.get(type(D), True):
        try:
            grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(
                params, images, labels)
            _LABELS_VMAP_SAFE[type(D)] = True
            return grads, losses, torch.arange(m, device=labels.device)
        except RuntimeError as exc:
            if "vmap" not in str(exc) or type(D) in _LABELS_VMAP_SAFE:
                raise
            _LABELS_VMAP_SAFE[type(D)] = False
            log.debug("%s reads label values in forward (%s); per-sample gradients are taken class by class",
                      type(D).__name__, str(exc).split(".")[0])

    per_class = vmap(grad_and_value(loss_one), in_dims=(None, 0, None), chunk_size=chunk_size)
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    chunks_grads: list[dict[str, torch.Tensor]] = []
    chunks_loss: list[torch.Tensor] = []
    start = 0
    for label, count in zip(classes, counts.tolist()):
        g, value = per_class(params, images[order[start:start + count]], label)
        start += count
        chunks_grads.append(g)
        chunks_loss.append(value)
    if len(chunks_grads) == 1:
        return chunks_grads[0], chunks_loss[0], order
    grads = {name: torch.cat([g[name] for g in chunks_grads]) for name in params}
    return grads, torch.cat(chunks_loss), order


def per_sample_fake_gradients(D: nn.Module, images: torch.Tensor, labels: torch.Tensor
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients of D's fake-image loss ``softplus(D(x))`` and the per-sample losses
    (rows in input order). Fakes are not private: this only serves to clip them as the real
    ones are (``privacy.fake_term``)."""
    fast = first_order_per_sample_gradients(D, images, labels, fake=True)
    if fast is not None:
        return fast
    params = {name: p.detach() for name, p in D.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.softplus(functional_call(D, p, (x.unsqueeze(0), label.view(1))).reshape(()))

    return vmap(grad_and_value(loss_one), in_dims=(None, 0, 0))(params, images, labels)


def _padded_per_sample(D: nn.Module, loss_one: Callable, params: dict[str, torch.Tensor], images: torch.Tensor,
                       labels: torch.Tensor, r1_weight: float, class_weight: float, pad_to: int, compile: bool
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients in fixed chunks of ``pad_to`` rows, blank rows masked out (see above)."""
    m = images.shape[0]
    chunks = max(1, math.ceil(m / pad_to))
    rows = chunks * pad_to
    padded_images = images.new_zeros((rows, *images.shape[1:]))
    padded_images[:m] = images
    padded_labels = labels.new_zeros(rows)
    padded_labels[:m] = labels
    mask = torch.zeros(rows, device=images.device, dtype=images.dtype)
    mask[:m] = 1.0
    fn = _masked_function(D, loss_one, r1_weight, class_weight, pad_to, compile)
    parts = [fn(params, padded_images[i:i + pad_to], padded_labels[i:i + pad_to], mask[i:i + pad_to])
             for i in range(0, rows, pad_to)]
    if len(parts) == 1:
        grads, losses = parts[0]
    else:
        grads = {name: torch.cat([g[name] for g, _ in parts]) for name in params}
        losses = torch.cat([value for _, value in parts])
    return grads, losses[:m], torch.arange(m, device=labels.device)


def _masked_function(D: nn.Module, loss_one: Callable, r1_weight: float, class_weight: float, pad_to: int,
                     compile: bool) -> Callable:
    """vmap(grad(mask * loss)) over a chunk of ``pad_to`` rows; torch.compile'd if asked."""
    def masked_loss(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor, keep: torch.Tensor
                    ) -> torch.Tensor:
        # keep is 1 for a real sample (its loss and gradient unchanged, exactly) and 0 for padding
        # (gradient exactly 0: the blank image gives finite values).
        return loss_one(p, x, label) * keep

    fn = vmap(grad_and_value(masked_loss), in_dims=(None, 0, 0, 0))
    if not compile:
        return fn
    # One compiled function per D architecture, not per D object: every round builds a new D,
    # and D is a pure function of its parameters (no buffers: privacy.validation), which are
    # passed in, so the first D of an architecture serves as the template for all of them.
    key = (type(D).__qualname__, tuple((n, tuple(p.shape)) for n, p in D.named_parameters()),
           float(r1_weight), float(class_weight), int(pad_to))
    if key not in _COMPILED:
        _COMPILED[key] = _EagerOnFailure(torch.compile(fn, dynamic=False), fn)
    return _COMPILED[key]


class _EagerOnFailure:
    """The compiled function, or the eager one from the first failure of compilation on (logged once)."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # a compiler limitation must not stop training: same maths eagerly
                self.failed = True
                log.warning("torch.compile of the per-sample gradient failed (%s: %s); using eager vmap",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return self.eager(*args)


def _loss_with_class_term(D: nn.Module, r1_weight: float, class_weight: float):
    """One sample's real loss with D's class head: logistic + R1 (on the adversarial logit only)
    + class_weight * cross-entropy of the head on the sample's label."""

    def logit_and_class_loss(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor
                             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        value, class_logits = functional_call(D, p, (x.unsqueeze(0), label.view(1)), {"with_class_logits": True})
        # Cross-entropy through a one-hot by comparison: vmap cannot index by a batched label.
        target = (label.view(1) == torch.arange(class_logits.shape[1], device=label.device)).to(x.dtype)
        class_loss = -(F.log_softmax(class_logits.reshape(-1), dim=0) * target).sum()
        value = value.reshape(())
        return value, (value, class_loss)

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if r1_weight > 0:
            image_grad, (value, class_loss) = grad(logit_and_class_loss, argnums=1, has_aux=True)(p, x, label)
            r1 = r1_weight * image_grad.square().sum()
        else:
            _, (value, class_loss) = logit_and_class_loss(p, x, label)
            r1 = 0.0
        return F.softplus(-value) + r1 + class_weight * class_loss

    return loss_one
