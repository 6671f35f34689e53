"""Exact per-sample gradients of D's real-data loss (logistic + R1), with ``torch.func``.

The real-data loss of D is ``softplus(-D(x)) + r1_weight * ||grad_x D(x)||^2``. The R1 term is a
double backward that Opacus' grad-sample hooks do not support (every mode fails or, with ``ew``,
is silently wrong), so each sample's gradient is taken exactly with
``vmap(grad(loss_of_one_sample))`` over ``functional_call(D, params, ...)``, with a nested ``grad``
w.r.t. the input for R1. Clipping, noise and accounting are the engine's (``privacy.engine``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

log = logging.getLogger(__name__)


# Whether a discriminator class can be vmapped over its labels (its forward reads no label values).
_LABELS_VMAP_SAFE: dict[type, bool] = {}


def per_sample_real_gradients(D: nn.Module, images: torch.Tensor, labels: torch.Tensor, r1_weight: float,
                              class_weight: float = 0.0
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
    """
    params = {name: p.detach() for name, p in D.named_parameters()}
    m = images.shape[0]
    if m == 0:
        empty = {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
        return empty, images.new_zeros(0), labels.new_zeros(0)

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

    if _LABELS_VMAP_SAFE.get(type(D), True):
        try:
            grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0))(params, images, labels)
            _LABELS_VMAP_SAFE[type(D)] = True
            return grads, losses, torch.arange(m, device=labels.device)
        except RuntimeError as exc:
            if "vmap" not in str(exc) or type(D) in _LABELS_VMAP_SAFE:
                raise
            _LABELS_VMAP_SAFE[type(D)] = False
            log.debug("%s reads label values in forward (%s); per-sample gradients are taken class by class",
                      type(D).__name__, str(exc).split(".")[0])

    per_class = vmap(grad_and_value(loss_one), in_dims=(None, 0, None))
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
