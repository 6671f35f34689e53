"""First-order per-sample gradients from the layers' inputs and output gradients (privacy.layer_grads):
the same per-sample gradients and losses as the vmap path for D's real loss without R1, with the
class head's cross-entropy included, in both memory layouts."""

from __future__ import annotations

import pytest
import torch

from medstylegan2.networks import Discriminator
from medstylegan2.privacy import per_sample
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.layer_grads import first_order_per_sample_gradients
from medstylegan2.privacy.per_sample import per_sample_real_gradients


def discriminator(class_head: bool, layout: str) -> Discriminator:
    torch.manual_seed(0)
    # 32 px: three residual blocks (1x1 fromrgb, 3x3 convs, stride-2 box-filtered convs, pooled 1x1
    # skips), the epilogue's conv and dense layers, the class embedding and the class head.
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, cmap_dim=16, mbstd_group_size=0,
                      class_head=class_head).double()
    with torch.no_grad():  # non-zero biases, so that a wrong bias gradient shows
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return D.to(memory_format=torch.channels_last) if layout == "channels_last" else D


def batch(layout: str):
    images = torch.randn(6, 1, 32, 32, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    return (images.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else images), labels


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("class_head,class_weight", [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_layer_gradients_equal_the_vmap_per_sample_gradients(class_head, class_weight, layout):
    D = discriminator(class_head, layout)
    images, labels = batch(layout)
    fast = first_order_per_sample_gradients(D, images, labels, class_weight)
    assert fast is not None, "every parameter of D is in a Conv2dLayer or FullyConnectedLayer"
    grads, losses = fast
    expected, expected_losses, order = per_sample_real_gradients(D, images, labels, 0.0, class_weight,
                                                                 layer_gradients=False)
    assert order.tolist() == list(range(6))
    assert set(grads) == set(expected) == {name for name, _ in D.named_parameters()}
    assert torch.allclose(losses, expected_losses, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        assert g.shape == expected[name].shape, name
        assert torch.allclose(g, expected[name], rtol=1e-9, atol=1e-11), (name, (g - expected[name]).abs().max())
    if class_head:
        head = grads["epilogue.class_head.weight"]
        assert bool(head.any()) == (class_weight > 0)  # the class term, and only it, reaches the head


def test_per_sample_gradients_take_the_layer_path_without_r1_only(monkeypatch):
    calls = []
    real = per_sample.first_order_per_sample_gradients

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(per_sample, "first_order_per_sample_gradients", counting)
    D = discriminator(True, "contiguous")
    images, labels = batch("contiguous")
    per_sample_real_gradients(D, images, labels, 0.0, 0.7)
    assert len(calls) == 1
    per_sample_real_gradients(D, images, labels, 0.8, 0.7)  # R1: a double backward, vmap
    per_sample_real_gradients(D, images, labels, 0.0, 0.7, pad_to=8)  # GPU padding: vmap
    per_sample_real_gradients(D, images, labels, 0.0, 0.7, layer_gradients=False)
    assert len(calls) == 1


def test_a_private_step_sets_the_same_gradient_either_way():
    """Clipped, summed and noised by the engine (same noise seed): the same D gradient."""
    images, labels = batch("channels_last")
    result = {}
    for layer_gradients in (True, False):
        D = discriminator(True, "channels_last")
        engine = DPEngine(num_examples=60, batch_size=6, max_grad_norm=0.05, noise_multiplier=0.5, seed=3)
        engine.bind(D, torch.optim.Adam(D.parameters()), num_examples=60, batch_size=6)
        engine.layer_gradients = layer_gradients
        engine.private_real_gradient(images, labels, 0.0, 0.7)
        result[layer_gradients] = {name: p.grad.clone() for name, p in D.named_parameters()}
    for name, g in result[True].items():
        assert torch.allclose(g, result[False][name], rtol=1e-9, atol=1e-12), name
