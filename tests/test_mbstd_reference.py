"""Minibatch-stddev against reference fakes (model.mbstd_reference): the form of minibatch-stddev
that DP-SGD allows. Each sample is grouped with fakes of its own class, never with another sample
of its batch, so per-sample gradients exist and equal those of the sample alone; a collapsed
generator shows as a std near 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.config import ConfigError, load_config
from medstylegan2.losses import discriminator_real_loss_per_sample
from medstylegan2.networks import Discriminator, build_networks
from medstylegan2.privacy.audit import reference_fakes, white_box_scores
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.per_sample import per_sample_real_gradients
from medstylegan2.privacy.validation import validate_discriminator
from medstylegan2.trainer import SiteTrainer


def reference_discriminator(class_head: bool = True) -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=4,
                         class_head=class_head, mbstd_reference=True).double()


def batch(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(n) % 3


def references(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 1, 16, 16, generator=g, dtype=torch.float64)  # [classes, group - 1, C, H, W]


def one_sample_gradient(D, image, label, r1_weight, class_weight):
    D.zero_grad(set_to_none=True)
    discriminator_real_loss_per_sample(D, image[None], label[None], r1_weight, class_weight).sum().backward()
    return {name: p.grad.clone() for name, p in D.named_parameters()}


@pytest.mark.parametrize("r1_weight", [0.0, 0.5])
@pytest.mark.parametrize("layer_gradients", [True, False])
def test_per_sample_gradients_equal_each_sample_alone_with_its_references(r1_weight, layer_gradients):
    D = reference_discriminator()
    images, labels = batch()
    with D.mbstd_reference(references()):
        grads, losses, order = per_sample_real_gradients(D, images, labels, r1_weight, 0.7,
                                                         layer_gradients=layer_gradients)
        for row, i in enumerate(order.tolist()):
            alone = one_sample_gradient(D, images[i], labels[i], r1_weight, 0.7)
            for name, g in alone.items():
                assert torch.allclose(grads[name][row], g, rtol=1e-9, atol=1e-11), (name, i)


def test_a_samples_gradient_does_not_depend_on_the_rest_of_its_batch():
    D = reference_discriminator()
    images, labels = batch()
    other = images.clone()
    other[1:] = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    with D.mbstd_reference(references()):
        first, _, order_a = per_sample_real_gradients(D, images, labels, 0.0, 0.7)
        second, _, order_b = per_sample_real_gradients(D, other, labels, 0.0, 0.7)
    row_a, row_b = order_a.tolist().index(0), order_b.tolist().index(0)
    for name in first:
        assert torch.equal(first[name][row_a], second[name][row_b]), name


def test_the_references_do_change_the_output_and_are_cleared_after_the_block():
    D = reference_discriminator(class_head=False)
    images, labels = batch()
    with torch.no_grad():
        without = D(images, labels)
        with D.mbstd_reference(references()):
            with_refs = D(images, labels)
            assert D.epilogue.mbstd.reference is not None
        after = D(images, labels)
    assert not torch.allclose(without, with_refs)
    assert torch.equal(without, after) and D.epilogue.mbstd.reference is None
    assert "epilogue.mbstd.reference" not in D.state_dict()  # never saved, never sent


def test_a_sample_identical_to_its_references_has_a_std_near_zero():
    D = reference_discriminator(class_head=False)
    layer = D.epilogue.mbstd
    features = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    other = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    layer.reference = features.expand(3, 3, 16, 4, 4)  # every class: 3 copies of one image
    collapsed = layer(features, torch.tensor([1]))[:, -1]
    varied = layer(other, torch.tensor([1]))[:, -1]
    assert collapsed.abs().max() < 1e-3 and varied.min() > 0.1


def test_each_sample_is_grouped_with_the_references_of_its_own_class():
    D = reference_discriminator(class_head=False)
    layer = D.epilogue.mbstd
    sample = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    reference = torch.randn(3, 3, 16, 4, 4, dtype=torch.float64)
    reference[2] = sample  # class 2's references are copies of the sample
    layer.reference = reference
    std = layer(sample.expand(3, 16, 4, 4), torch.tensor([0, 1, 2]))[:, -1, 0, 0]
    assert std[2] < 1e-3 < std[0] and std[1] > 1e-3


def test_wrongly_shaped_references_are_refused():
    D = reference_discriminator()
    with pytest.raises(ValueError, match="num_classes=3, mbstd_group_size - 1=3"):
        with D.mbstd_reference(torch.zeros(3, 4, 1, 16, 16, dtype=torch.float64)):
            pass


def test_dp_accepts_reference_mbstd_and_still_refuses_batch_mbstd():
    validate_discriminator(reference_discriminator())
    batch_mode = Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=4)
    with pytest.raises(Exception, match="mixes the samples of a batch"):
        validate_discriminator(batch_mode)
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "model.mbstd_group_size=4"]
    assert load_config(None, dp + ["model.mbstd_reference=true"]).model.mbstd_reference
    with pytest.raises(ConfigError, match="model.mbstd_reference"):
        load_config(None, dp)


def tiny_config(*extra: str):
    return load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=16",
                              "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                              "model.mbstd_group_size=4", "model.mbstd_reference=true", "model.d_class_head=true",
                              "train.batch_size=4", "train.r1_interval=2", *extra])


def test_a_dp_site_trains_with_reference_mbstd_and_accounts_every_step():
    cfg = tiny_config("privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_g"]) and np.isfinite(stats["loss_d_fake"])
    assert engine.spent_steps == 2 * cfg.train.d_steps_per_g
    assert any(not torch.equal(before[k], v) for k, v in trainer.D.state_dict().items())
    assert trainer.D.epilogue.mbstd.reference is None


def test_the_audit_scores_a_reference_discriminator_with_fixed_references():
    cfg = tiny_config()
    G, D = build_networks(cfg.model)
    reference = reference_fakes(G.eval(), D, seed=0)
    assert reference.shape == (3, 3, 1, 16, 16)
    assert reference_fakes(G, Discriminator(img_resolution=16, channel_base=256, channel_max=16,
                                            mbstd_group_size=0)) is None
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 1, 16, 16), dtype=np.uint8), np.arange(6) % 3
    together = white_box_scores(D, images, labels, reference=reference)
    one_by_one = np.concatenate([white_box_scores(D, images[i:i + 1], labels[i:i + 1], reference=reference)
                                 for i in range(6)])
    assert np.allclose(together, one_by_one, atol=1e-5)  # no candidate's score depends on another
    assert not np.allclose(together, white_box_scores(D, images, labels))  # the references are used
