"""Speed choices that must not change what is computed: precision, memory layout, compile, stats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medstylegan2.acceleration import DeviceStats, resolve_acceleration
from medstylegan2.config import ConfigError, load_config
from medstylegan2.trainer import SiteTrainer


def random_site(n: int = 24, resolution: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8), rng.integers(0, 3, n)


def with_train(cfg, **changes):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def test_cpu_defaults_are_fp32_channels_last_without_compile(tiny_config):
    accel = resolve_acceleration(tiny_config.train, torch.device("cpu"))
    assert accel.autocast_dtype is None and accel.precision == "fp32"
    assert accel.channels_last and not accel.compile
    assert not resolve_acceleration(with_train(tiny_config, memory_format="contiguous").train,
                                    torch.device("cpu")).channels_last


def test_speed_keys_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.memory_format"):
        load_config(None, ["train.memory_format=nhwc"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=yes please"])


def test_channels_last_training_computes_what_contiguous_training_computes(tiny_config):
    """Same weights, same inputs: the same images and logits in either layout (up to rounding), and
    weights always leave the trainer contiguous (checkpoints, the wire)."""
    images, labels = random_site()
    trainers = {fmt: SiteTrainer(with_train(tiny_config, memory_format=fmt), images, labels, device="cpu")
                for fmt in ("contiguous", "channels_last")}
    conv = trainers["channels_last"].D.blocks[0].conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    weights = trainers["contiguous"].get_weights()
    trainers["channels_last"].set_weights(weights)
    assert all(v.is_contiguous() for net in trainers["channels_last"].get_weights().values() for v in net.values())
    z, c = torch.randn(4, tiny_config.model.z_dim), torch.tensor([0, 1, 2, 0])
    out = {}
    for fmt, trainer in trainers.items():
        img = trainer.G(z, c, noise_mode="const")
        out[fmt] = (img, trainer.D(img, c))
    for a, b in zip(out["contiguous"], out["channels_last"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_bf16_autocast_keeps_fp32_master_weights_optimizer_state_and_losses(tiny_config):
    """precision=bf16 (the CUDA default; forced here on CPU, where autocast also runs): G and D
    compute in bf16, but parameters, gradients, Adam's moments and the losses stay fp32."""
    images, labels = random_site()
    trainer = SiteTrainer(with_train(tiny_config, precision="bf16"), images, labels, device="cpu")
    assert trainer.accel.autocast_dtype == torch.bfloat16
    stats = trainer.train_steps(2)  # step 0 has both path length and R1
    assert all(np.isfinite(v) for v in stats.values())
    for net in (trainer.G, trainer.D, trainer.G_ema):
        assert all(p.dtype == torch.float32 for p in net.parameters())
    for opt in (trainer.g_opt, trainer.d_opt):
        for state in opt.state.values():
            assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    with trainer.accel.autocast():
        loss, step_stats = trainer.loss.generator_main(torch.randn(4, tiny_config.model.z_dim),
                                                       torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32 and step_stats["loss_g"].dtype == torch.float32
    with trainer.accel.autocast():
        img = trainer.G(torch.randn(4, tiny_config.model.z_dim), torch.tensor([0, 1, 2, 0]))
        assert img.dtype == torch.float32  # the skip image accumulates in fp32
        assert trainer.G.synthesis.blocks[-1].conv1(
            torch.randn(2, trainer.G.synthesis.blocks[-1].conv1.weight.shape[1], 16, 16),
            torch.randn(2, tiny_config.model.w_dim)).dtype == torch.bfloat16  # the features in bf16


def test_step_statistics_average_on_the_device_like_numbers():
    stats = DeviceStats()
    stats.add({"a": torch.tensor(1.0), "b": 2.0})
    stats.add({"a": torch.tensor(2.5), "b": 4.0})
    stats.add({"a": torch.tensor(0.5)})
    assert stats.means() == {"a": pytest.approx(4.0 / 3), "b": pytest.approx(3.0)}


@pytest.mark.slow
def test_compiled_calls_compute_what_the_eager_ones_compute_and_train(tiny_config, monkeypatch):
    """train.compile wraps G's synthesis and D for the calls without double backward (aot_eager
    backend here: no C++ toolchain needed): same outputs and gradients as the eager modules, and
    a few training steps (R1 and path length eagerly) give finite losses."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    images, labels = random_site()
    trainer = SiteTrainer(with_train(tiny_config, compile=True), images, labels, device="cpu")
    loss = trainer.loss
    assert loss.D_fast is not trainer.D and loss.synthesize_fast is not trainer.G.synthesize
    z, c = torch.randn(4, tiny_config.model.z_dim), torch.tensor([0, 1, 2, 0])
    results = []
    for synthesize, D in ((trainer.G.synthesize, trainer.D), (loss.synthesize_fast, loss.D_fast)):
        trainer.G.zero_grad(set_to_none=True)
        trainer.D.zero_grad(set_to_none=True)
        img = synthesize(trainer.G.mapping(z, c), noise_mode="const")
        logits = D(img, c)
        logits.square().sum().backward()
        grads = [p.grad.clone() for p in list(trainer.G.parameters()) + list(trainer.D.parameters())]
        results.append((img.detach(), logits.detach(), grads))
    (img_e, logits_e, grads_e), (img_c, logits_c, grads_c) = results
    assert torch.allclose(img_c, img_e, atol=1e-5) and torch.allclose(logits_c, logits_e, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads_c, grads_e))
    stats = trainer.train_steps(3)  # step 0: R1 and path length through the eager modules
    assert all(np.isfinite(v) for v in stats.values())
