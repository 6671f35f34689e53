"""Under DP, D's fake term clipped per sample as the real term is (train.dp_clip_fakes): the same
per-sample gradients as autograd, each clipped to C, averaged over the batch; with a C no gradient
reaches it is the ordinary fake-term gradient. No privacy effect: fakes are not private."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medstylegan2.config import load_config
from medstylegan2.networks import Discriminator
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.fake_term import add_clipped_fake_gradient
from medstylegan2.privacy.per_sample import per_sample_fake_gradients
from medstylegan2.trainer import SiteTrainer


def discriminator() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=0,
                         class_head=True).double()


def fakes():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(6) % 3


def gradient_of(D, loss) -> dict[str, torch.Tensor]:
    D.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in D.named_parameters()}


def test_per_sample_fake_gradients_are_those_of_each_fake_alone():
    D = discriminator()
    images, labels = fakes()
    grads, losses = per_sample_fake_gradients(D, images, labels)
    for i in range(6):
        alone = gradient_of(D, F.softplus(D(images[i:i + 1], labels[i:i + 1])).sum())
        for name, g in alone.items():
            assert torch.allclose(grads[name][i], g, rtol=1e-9, atol=1e-12), (name, i)
    assert torch.allclose(losses, F.softplus(D(images, labels)).reshape(-1).detach())
    assert not grads["epilogue.class_head.weight"].any()  # the fake term never trains the class head


def test_with_a_large_clip_norm_the_fake_term_is_the_ordinary_mean_gradient():
    D = discriminator()
    images, labels = fakes()
    expected = gradient_of(D, F.softplus(D(images, labels)).mean())
    D.zero_grad(set_to_none=True)
    add_clipped_fake_gradient(D, images, labels, max_grad_norm=1e6)
    for name, p in D.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-9, atol=1e-12), name


def test_each_fake_pushes_with_at_most_the_clip_norm_and_adds_to_the_real_term():
    D = discriminator()
    images, labels = fakes()
    per_sample, _ = per_sample_fake_gradients(D, images, labels)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(dim=1) for g in per_sample.values()))
    C = float(norms.min()) / 4  # every fake's gradient is longer than C: each is clipped
    for p in D.parameters():
        p.grad = torch.ones_like(p)  # stands for the private real term already in place
    add_clipped_fake_gradient(D, images, labels, max_grad_norm=C)
    added = {n: p.grad - 1 for n, p in D.named_parameters()}
    factors = C / (norms + 1e-6)  # Opacus' clipping factor, as for the real term
    expected = {n: (g * factors.view(-1, *[1] * (g.dim() - 1))).mean(dim=0) for n, g in per_sample.items()}
    for name in added:
        assert torch.allclose(added[name], expected[name], rtol=1e-7, atol=1e-12), name
    total = torch.sqrt(sum(v.square().sum() for v in added.values()))
    assert total <= C * (1 + 1e-9)


def test_a_dp_site_trains_with_clipped_fakes():
    cfg = load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=16",
                             "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                             "model.mbstd_group_size=0", "model.d_class_head=true", "train.batch_size=4",
                             "train.dp_clip_fakes=true", "privacy.enabled=true", "privacy.noise_multiplier=1.0",
                             "privacy.noise_seed=0"])
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_d_fake"]) and stats["loss_d_fake"] > 0
    assert engine.spent_steps == 2
