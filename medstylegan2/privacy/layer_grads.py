"""Exact per-sample gradients of D's real loss without R1 (logistic + class head) from one batched pass.

For a loss without a double-backward term, a layer's per-sample weight gradient is a function of
that layer's input and of the loss gradient at its output, sample by sample: for ``y = conv(x, W)``
it is the correlation of ``x[b]`` with ``dL/dy[b]``, for ``y = x W^T`` the outer product. So:

1. one batched forward of D, with forward hooks keeping every layer's input and output;
2. one backward for the gradients at those outputs only (``autograd.grad`` w.r.t. the outputs:
   no weight gradients are formed, summed or thrown away);
3. per layer, the per-sample weight and bias gradients: a grouped convolution (one group per
   sample) for convolutions, an outer product for dense layers, and the chain rule through the
   layer's weight scaling (equalized learning rate, folded gains, the 2x2 box filter of fused
   down-convolutions).

That is the same arithmetic as ``vmap(grad(...))`` without its per-sample bookkeeping
(``bench/per_sample_speed.py``: 1.2-1.45x faster for the per-sample part on 2 shared CPU cores at
64 px, batch 32; a few percent of a whole DP D step). It covers D when every parameter belongs
to a ``Conv2dLayer`` or ``FullyConnectedLayer`` that runs at most once per forward and no layer
mixes samples (validation rejects minibatch-stddev and BatchNorm under DP); otherwise
``per_sample`` falls back to ``vmap``.
The class head's cross-entropy (``class_weight``) is part of the loss, as in the vmap path. The R1
term (a double backward) always goes through ``vmap``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medstylegan2.networks import LRELU_SLOPE, Conv2dLayer, FullyConnectedLayer, activation_gain, downsample2x

_LAYER_TYPES = (Conv2dLayer, FullyConnectedLayer)


def covered_layers(D: nn.Module) -> Optional[dict[str, nn.Module]]:
    """D's layers by name prefix, or None when some parameter is outside them (use vmap then)."""
    layers = {name: m for name, m in D.named_modules() if isinstance(m, _LAYER_TYPES)}
    covered = {f"{name}.{p}" if name else p for name, m in layers.items() for p, _ in m.named_parameters()}
    if covered != {name for name, _ in D.named_parameters()}:
        return None
    return layers


def first_order_per_sample_gradients(D: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                     class_weight: float = 0.0, *, fake: bool = False
                                     ) -> Optional[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(per-sample gradients of softplus(-D(x)) [+ class_weight * CE(head(x), y)] by parameter
    name, per-sample losses), or None when D is not covered (see module docstring); rows are the
    input's samples, in order. The loss is ``losses.discriminator_real_loss_per_sample``'s without R1.
    ``fake``: the fake-image loss softplus(D(x)) instead (no class term)."""
    layers = covered_layers(D)
    if layers is None or images.shape[0] == 0:
        return None
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[name].append((inputs[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            # Parameters as fresh leaves: every layer output is then part of the graph, and
            # autograd.grad w.r.t. those outputs forms no weight gradient at all.
            params = {name: p.detach().requires_grad_(True) for name, p in D.named_parameters()}
            if fake:
                losses = F.softplus(torch.func.functional_call(D, params, (images.detach(), labels)).reshape(-1))
            elif class_weight > 0:
                logits, class_logits = torch.func.functional_call(D, params, (images.detach(), labels),
                                                                  {"with_class_logits": True})
                losses = (F.softplus(-logits.reshape(-1))
                          + class_weight * F.cross_entropy(class_logits, labels.long(), reduction="none"))
            else:
                losses = F.softplus(-torch.func.functional_call(D, params, (images.detach(), labels)).reshape(-1))
            if any(len(calls) > 1 for calls in seen.values()):
                return None  # a layer ran twice: not the structure assumed here
            ran = [name for name in layers if seen[name]]
            grads_out = torch.autograd.grad(losses.sum(), [seen[name][0][1] for name in ran], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    grads: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if not seen[name]:
            # A layer this loss does not run (the class head without its term): gradient 0, as vmap gives.
            prefix = f"{name}." if name else ""
            grads.update({prefix + p: v.new_zeros((images.shape[0], *v.shape))
                          for p, v in layer.named_parameters()})
    for name, grad_out in zip(ran, grads_out):
        x, y = seen[name][0]
        if grad_out is None:
            grad_out = torch.zeros_like(y)
        grads.update(_layer_per_sample_grads(name, layers[name], x, y.detach(), grad_out))
    return grads, losses.detach()


def _pre_activation_grad(layer: nn.Module, y: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    # leaky_relu(z) > 0 exactly when z > 0, so its output tells which slope the backward takes:
    # PyTorch's own backward from the result (self_is_result=True), one fused pass.
    if layer.activation == "lrelu":
        return torch.ops.aten.leaky_relu_backward(grad_out, y, LRELU_SLOPE, True)
    return grad_out


def _layer_per_sample_grads(name: str, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, grad_out: torch.Tensor
                            ) -> dict[str, torch.Tensor]:
    prefix = f"{name}." if name else ""
    g = _pre_activation_grad(layer, y, grad_out)
    out: dict[str, torch.Tensor] = {}
    if isinstance(layer, FullyConnectedLayer):
        # y = x (W * weight_gain)^T + b * bias_gain (the activation gain folded in both).
        out[prefix + "weight"] = torch.einsum("bo,bi->boi", g, x) * layer.weight_gain
        if layer.bias is not None:
            out[prefix + "bias"] = g * layer.bias_gain
        return out
    out_gain = activation_gain(layer.activation) * layer.gain
    scale = layer.weight_gain * out_gain
    k = layer.weight.shape[-1]
    if not layer.down:
        grad_w = _per_sample_conv_weight(x, g, k, stride=1, padding=layer.padding)
    elif k == 1:
        grad_w = _per_sample_conv_weight(downsample2x(x), g, 1, stride=1, padding=0)
    else:
        # y = conv(x, box_filtered_kernel(W * scale), stride 2): the adjoint of the box filter
        # averages the 2x2 neighbourhoods of the (k+1)x(k+1) kernel gradient.
        g4 = _per_sample_conv_weight(x, g, k + 1, stride=2, padding=layer.padding)
        rows = g4[..., :-1, :] + g4[..., 1:, :]
        grad_w = rows[..., :-1] + rows[..., 1:]
        scale = 0.25 * scale
    out[prefix + "weight"] = grad_w * scale
    if layer.bias is not None:
        out[prefix + "bias"] = g.sum(dim=(2, 3)) * out_gain
    return out


def _per_sample_conv_weight(x: torch.Tensor, g: torch.Tensor, k: int, *, stride: int, padding: int) -> torch.Tensor:
    """[B, Cout, Cin, k, k]: each sample's conv weight gradient.

    One grouped convolution (a group per sample) for contiguous (NCHW) tensors; for channels_last
    ones, whose [1, B*C, H, W] view would be a full copy, one weight gradient per sample.
    """
    batch, cin = x.shape[:2]
    cout = g.shape[1]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.stack([torch.nn.grad.conv2d_weight(x[b:b + 1], (cout, cin, k, k), g[b:b + 1], stride=stride,
                                                        padding=padding) for b in range(batch)])
    grad = torch.nn.grad.conv2d_weight(x.reshape(1, batch * cin, *x.shape[2:]), (batch * cout, cin, k, k),
                                       g.reshape(1, batch * cout, *g.shape[2:]), stride=stride, padding=padding,
                                       groups=batch)
    return grad.view(batch, cout, cin, k, k)
