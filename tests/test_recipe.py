"""The recipe's levers: D's class head (AC-GAN) in both losses and under DP, several D updates per G
update, and the warm start from another checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medstylegan2.config import ConfigError, load_config
from medstylegan2.losses import class_weight_of, d_class_weight_of, discriminator_real_loss_per_sample
from medstylegan2.networks import Discriminator
from medstylegan2.privacy.engine import make_privacy_engine
from medstylegan2.privacy.per_sample import per_sample_real_gradients
from medstylegan2.trainer import SiteTrainer
from medstylegan2.warm_start import load_init_weights, planned_d_steps

TINY = ["model.resolution=16", "model.channel_base=256", "model.channel_max=32", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.cmap_dim=16", "train.batch_size=4", "train.r1_interval=2",
        "train.pl_weight=0", "model.d_class_head=true"]


def random_site(n: int = 24, resolution: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8), rng.integers(0, 3, n)


@pytest.mark.parametrize("r1_weight", [0.0, 0.8])
def test_class_head_per_sample_grads_match_autograd_loop(r1_weight):
    torch.manual_seed(0)
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, mbstd_group_size=0,
                      class_head=True).double()
    images = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    grads, losses, order = per_sample_real_gradients(D, images, labels, r1_weight, class_weight=0.7)
    for row, i in enumerate(order.tolist()):
        D.zero_grad()
        loss = discriminator_real_loss_per_sample(D, images[i:i + 1], labels[i:i + 1], r1_weight, 0.7).sum()
        loss.backward()
        assert abs(losses[row].item() - loss.item()) < 1e-10
        assert D.epilogue.class_head.weight.grad.abs().sum() > 0  # the class term reaches the head
        for name, p in D.named_parameters():
            assert (grads[name][row] - p.grad).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("r1_weight", [0.0, 0.8])
def test_class_head_term_is_in_the_padded_per_sample_gradients(r1_weight):
    """The GPU path (fixed-size padded chunks with a mask) clips the same loss as the plain one: the
    class head's cross-entropy included, blank rows exactly 0."""
    torch.manual_seed(0)
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, mbstd_group_size=0,
                      class_head=True).double()
    images = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0])
    plain, plain_losses, order = per_sample_real_gradients(D, images, labels, r1_weight, class_weight=0.7)
    padded, padded_losses, padded_order = per_sample_real_gradients(D, images, labels, r1_weight, class_weight=0.7,
                                                                    pad_to=4)
    without_class, _, _ = per_sample_real_gradients(D, images, labels, r1_weight, pad_to=4)
    assert padded_order.tolist() == [0, 1, 2, 3, 4]
    by_sample = {i: row for row, i in enumerate(order.tolist())}
    for i in range(5):
        assert abs(padded_losses[i].item() - plain_losses[by_sample[i]].item()) < 1e-10
    for name, g in padded.items():
        assert g.shape[0] == 8 and not g[5:].any(), name
        for i in range(5):
            assert (g[i] - plain[name][by_sample[i]]).abs().max().item() < 1e-10, name
    assert padded["epilogue.class_head.weight"][:5].abs().sum() > 0
    assert not without_class["epilogue.class_head.weight"].any()  # without the term the head gets nothing


def test_class_loss_pushes_the_head_towards_the_real_label():
    torch.manual_seed(0)
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, class_head=True)
    images, labels = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with_class = discriminator_real_loss_per_sample(D, images, labels, 0.0, class_weight=1.0)
    without = discriminator_real_loss_per_sample(D, images, labels, 0.0, class_weight=0.0)
    _, class_logits = D(images, labels, with_class_logits=True)
    ce = torch.nn.functional.cross_entropy(class_logits, labels, reduction="none")
    assert torch.allclose(with_class - without, ce, atol=1e-6)


def test_generator_loss_adds_the_class_term_only_with_a_head():
    cfg = load_config(None, TINY)
    trainer = SiteTrainer(cfg, *random_site(), device="cpu")
    _, stats = trainer.loss.generator_main(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    assert "loss_g_class" in stats and np.isfinite(float(stats["loss_g_class"]))
    plain = load_config(None, TINY + ["model.d_class_head=false"])
    trainer = SiteTrainer(plain, *random_site(), device="cpu")
    assert trainer.loss.class_weight == 0.0
    assert "loss_g_class" not in trainer.loss.generator_main(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))[1]


def test_private_training_with_the_class_head_runs_and_accounts_every_d_update():
    cfg = load_config(None, TINY + ["model.mbstd_group_size=0", "privacy.enabled=true",
                                    "privacy.noise_multiplier=1.0", "train.d_steps_per_g=3"])
    images, labels = random_site()
    engine = make_privacy_engine(cfg, len(labels), planned_d_steps(cfg, 2))
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_g"]) and np.isfinite(stats["loss_g_class"])
    assert engine.spent_steps == 6  # 2 G steps x 3 private D steps


def test_d_steps_per_g_shows_d_that_many_real_batches():
    cfg = load_config(None, TINY + ["train.d_steps_per_g=2"])
    trainer = SiteTrainer(cfg, *random_site(), device="cpu")
    trainer.train_steps(3)
    assert trainer.step == 3 and trainer.cur_nimg == 3 * 2 * cfg.train.batch_size


def test_g_steps_per_d_takes_that_many_g_updates_on_g_batches_and_no_more_private_steps():
    cfg = load_config(None, TINY + ["model.mbstd_group_size=0", "privacy.enabled=true", "privacy.noise_multiplier=1.0",
                                    "train.g_steps_per_d=3", "train.g_batch_size=5"])
    images, labels = random_site()
    engine = make_privacy_engine(cfg, len(labels), planned_d_steps(cfg, 2))
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    g_batches: list[int] = []
    generator_main = trainer.loss.generator_main

    def counting(z, labels, **kwargs):
        g_batches.append(z.shape[0])
        return generator_main(z, labels, **kwargs)

    trainer.loss.generator_main = counting
    trainer.train_steps(2)
    assert g_batches == [5] * 6              # 2 steps x 3 G updates of 5 fakes
    assert engine.spent_steps == 2           # D (the only private part) steps once a step
    assert trainer.g_opt.state[next(trainer.G.parameters())]["step"] == 6


def test_one_g_update_of_d_batch_size_per_step_is_the_default():
    cfg = load_config(None, TINY)
    trainer = SiteTrainer(cfg, *random_site(), device="cpu")
    trainer.train_steps(2)
    assert trainer.g_batch_size == cfg.train.batch_size
    assert trainer.g_opt.state[next(trainer.G.parameters())]["step"] == 2


def test_warm_start_takes_the_networks_but_keeps_this_runs_constants(tmp_path):
    cfg = load_config(None, TINY)
    donor = SiteTrainer(dataclasses.replace(cfg, seed=5), *random_site(), device="cpu", seed=5)
    donor.train_steps(1)
    path = donor.save_checkpoint(tmp_path / "public.pt")
    trainer = SiteTrainer(cfg, *random_site(seed=1), device="cpu", seed=0)
    own_noise = {k: v.clone() for k, v in trainer.G.state_dict().items() if k.endswith("noise_const")}
    load_init_weights(trainer, path)
    for name in ("G", "G_ema", "D"):
        mine, theirs = trainer.network(name).state_dict(), donor.network(name).state_dict()
        for key in mine:
            if key.endswith("noise_const"):
                assert name != "G" or torch.equal(mine[key], own_noise[key])
            else:
                assert torch.equal(mine[key], theirs[key]), (name, key)
    assert trainer.step == 0  # counters and optimizers start fresh


def test_warm_start_from_another_model_size_is_a_clear_error(tmp_path):
    from medstylegan2.errors import CheckpointError

    donor = SiteTrainer(load_config(None, TINY + ["model.channel_max=16"]), *random_site(), device="cpu")
    path = donor.save_checkpoint(tmp_path / "small.pt")
    trainer = SiteTrainer(load_config(None, TINY), *random_site(), device="cpu")
    with pytest.raises(CheckpointError, match="another model config"):
        load_init_weights(trainer, path)


def test_the_class_loss_weight_moves_linearly_to_its_end_value_and_stays_there():
    cfg = load_config(None, TINY + ["train.class_loss_weight=3", "train.class_loss_weight_end=1",
                                    "train.class_loss_decay_steps=4"])
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, class_head=True)
    assert [class_weight_of(D, cfg.train, step) for step in (0, 1, 2, 4, 100)] == [3.0, 2.5, 2.0, 1.0, 1.0]
    headless = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16)
    assert class_weight_of(headless, cfg.train, 2) == 0.0
    steady = load_config(None, TINY + ["train.class_loss_weight=3"])
    assert class_weight_of(D, steady.train, 100) == 3.0


def test_the_trainer_uses_the_scheduled_class_weight_in_each_step():
    cfg = load_config(None, TINY + ["train.class_loss_weight=3", "train.class_loss_weight_end=1",
                                    "train.class_loss_decay_steps=4"])
    trainer = SiteTrainer(cfg, *random_site(), device="cpu")
    trainer.train_steps(3)
    assert trainer.loss.class_weight == 2.0  # the weight of the third step (G step 2)


def test_d_can_hold_its_class_weight_on_reals_while_gs_push_decays():
    cfg = load_config(None, TINY + ["train.class_loss_weight=3", "train.class_loss_weight_end=0",
                                    "train.class_loss_decay_steps=2", "train.d_class_loss_weight=3"])
    D = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, class_head=True)
    assert [d_class_weight_of(D, cfg.train, step) for step in (0, 1, 2, 100)] == [3.0] * 4
    assert [class_weight_of(D, cfg.train, step) for step in (0, 1, 2, 100)] == [3.0, 1.5, 0.0, 0.0]
    headless = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16)
    assert d_class_weight_of(headless, cfg.train, 0) == 0.0
    unset = load_config(None, TINY + ["train.class_loss_weight=3", "train.class_loss_weight_end=0",
                                      "train.class_loss_decay_steps=2"])
    assert [d_class_weight_of(D, unset.train, step) for step in (0, 1, 2)] == [3.0, 1.5, 0.0]  # as G's


def test_with_gs_push_gone_d_still_learns_the_classes_on_reals():
    cfg = load_config(None, TINY + ["train.class_loss_weight=3", "train.class_loss_weight_end=0",
                                    "train.class_loss_decay_steps=1", "train.d_class_loss_weight=2"])
    trainer = SiteTrainer(cfg, *random_site(), device="cpu")
    trainer.train_steps(2)
    assert (trainer.loss.class_weight, trainer.loss.d_class_weight) == (0.0, 2.0)
    assert "loss_g_class" not in trainer.loss.generator_main(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))[1]
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    trainer.D.zero_grad()
    trainer.loss.discriminator_real(images, labels, r1_weight=0.0).backward()
    assert trainer.D.epilogue.class_head.weight.grad.abs().sum() > 0


def test_new_recipe_keys_are_validated():
    with pytest.raises(ConfigError, match="train.d_class_loss_weight"):
        load_config(None, ["train.d_class_loss_weight=-1"])
    with pytest.raises(ConfigError, match="train.class_loss_weight_end"):
        load_config(None, ["train.class_loss_weight_end=-1"])
    with pytest.raises(ConfigError, match="train.class_loss_decay_steps"):
        load_config(None, ["train.class_loss_decay_steps=0"])
    with pytest.raises(ConfigError, match="train.d_steps_per_g"):
        load_config(None, ["train.d_steps_per_g=0"])
    with pytest.raises(ConfigError, match="train.g_steps_per_d"):
        load_config(None, ["train.g_steps_per_d=0"])
    with pytest.raises(ConfigError, match="train.g_batch_size"):
        load_config(None, ["train.g_batch_size=0"])
    with pytest.raises(ConfigError, match="model.d_class_head"):
        load_config(None, ["model.arch=dcgan", "model.d_class_head=true"])
    with pytest.raises(ConfigError, match="model.mapping_lr_multiplier"):
        load_config(None, ["model.mapping_lr_multiplier=0"])
