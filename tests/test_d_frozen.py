"""train.d_frozen: named parts of D keep their (warm-start) values. No optimizer holds them, so they
never change, and under DP the per-sample clipping and the noise cover only the parameters that
train: a frozen parameter releases nothing but what the site received."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medstylegan2.config import load_config
from medstylegan2.errors import UserError
from medstylegan2.networks import Discriminator, freeze_parameters
from medstylegan2.privacy.engine import DPEngine, PrivacyError
from medstylegan2.privacy.fake_term import add_clipped_fake_gradient
from medstylegan2.privacy.per_sample import per_sample_fake_gradients, per_sample_real_gradients
from medstylegan2.trainer import SiteTrainer

TINY = ["model.resolution=16", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.cmap_dim=16", "model.mbstd_group_size=0", "train.batch_size=4"]
HEAD_ONLY = "train.d_frozen=[blocks, epilogue.conv, epilogue.fc]"


def site_data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3


def changed(before: dict[str, torch.Tensor], D: torch.nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], p.detach()) for name, p in D.named_parameters()}


@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp"])
def test_frozen_parts_of_d_keep_their_values_and_the_rest_trains(private):
    extra = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0"] if private else []
    cfg = load_config(None, TINY + [HEAD_ONLY, "train.r1_interval=2"] + extra)
    images, labels = site_data()
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0) if private \
        else None
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    before = {name: p.detach().clone() for name, p in trainer.D.named_parameters()}
    trainer.train_steps(3)  # R1 steps (vmap path) and plain steps (layer path) both
    moved = changed(before, trainer.D)
    frozen = [n for n in moved if n.startswith(("blocks.", "epilogue.conv.", "epilogue.fc."))]
    assert frozen and not any(moved[n] for n in frozen)
    assert moved["epilogue.out.weight"] and moved["class_embedding.embed.weight"]
    assert all(p.requires_grad for p in trainer.d_trainable)


def test_under_dp_the_clip_norm_is_taken_over_the_trained_parameters_only():
    torch.manual_seed(0)
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=0).double()
    trainable = freeze_parameters(D, ["blocks"])
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=0.01, noise_multiplier=0.0, seed=0)
    engine.bind(D, torch.optim.SGD(trainable, lr=0.1), num_examples=24, batch_size=4)
    images = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(5) % 3

    per_sample, _, _ = per_sample_real_gradients(D, images, labels, 0.0)
    names = [n for n, p in D.named_parameters() if p.requires_grad]
    norms = torch.sqrt(sum(per_sample[n].flatten(1).square().sum(dim=1) for n in names))
    factors = (0.01 / (norms + 1e-6)).clamp(max=1.0)
    engine.private_real_gradient(images, labels, 0.0)
    for name, p in D.named_parameters():
        if name in names:
            expected = torch.einsum("b,b...->...", factors, per_sample[name]) / 4  # / (q n), sigma 0
            assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-12), name
        else:
            assert p.grad is None, name  # nothing clipped, noised or released for a frozen parameter
    assert {n for n, _ in engine._named_params} == set(names)


def test_clipped_fakes_are_clipped_over_the_trained_parameters_only_as_the_reals_are():
    torch.manual_seed(0)
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=0).double()
    freeze_parameters(D, ["blocks"])
    fake = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(5) % 3
    per_sample, _ = per_sample_fake_gradients(D, fake, labels)
    names = [n for n, p in D.named_parameters() if p.requires_grad]
    norms = torch.sqrt(sum(per_sample[n].flatten(1).square().sum(dim=1) for n in names))
    factors = (0.01 / (norms + 1e-6)).clamp(max=1.0)
    add_clipped_fake_gradient(D, fake, labels, max_grad_norm=0.01)
    for name, p in D.named_parameters():
        if name in names:
            expected = torch.einsum("b,b...->...", factors, per_sample[name]) / 5
            assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-12), name
        else:
            assert p.grad is None, name


def test_the_privacy_engine_refuses_an_optimizer_with_parameters_outside_d():
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=0)
    stranger = torch.nn.Parameter(torch.zeros(3))
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(PrivacyError, match="trainable parameters and nothing else"):
        engine.bind(D, torch.optim.SGD(list(D.parameters()) + [stranger], lr=0.1), num_examples=24, batch_size=4)


@pytest.mark.parametrize("frozen, message", [
    ("[blocks, epilogue.fcc]", "'epilogue.fcc' names no parameter"),
    ("[blocks, epilogue, class_embedding]", "nothing would train"),
])
def test_a_wrong_frozen_list_is_a_clear_error_naming_the_key(frozen, message):
    cfg = load_config(None, TINY + [f"train.d_frozen={frozen}"])
    images, labels = site_data()
    with pytest.raises(UserError, match=f"^train.d_frozen: .*{message}"):
        SiteTrainer(cfg, images, labels, device="cpu")


def test_a_frozen_d_resumes_from_its_checkpoint(tmp_path):
    cfg = load_config(None, TINY + [HEAD_ONLY])
    images, labels = site_data()
    trainer = SiteTrainer(cfg, images, labels, device="cpu")
    trainer.train_steps(2)
    path = trainer.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = SiteTrainer(cfg, images, labels, device="cpu")
    resumed.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    resumed.train_steps(1)
    assert resumed.step == 3
