"""The StyleGAN2 and DCGAN networks: shapes, dtypes, conditioning, regularizers, DP-friendliness."""

from __future__ import annotations

import pytest
import torch

from medstylegan2.config import ModelConfig, TrainConfig
from medstylegan2.losses import StyleGAN2Loss, discriminator_real_loss_per_sample
from medstylegan2.networks import Discriminator, Generator, build_networks


def small_model(arch: str, resolution: int, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, resolution=resolution, channel_base=512, channel_max=32, z_dim=32, w_dim=32,
                       cmap_dim=32, **kw)


@pytest.mark.parametrize("arch", ["stylegan2", "dcgan"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_generator_and_discriminator_shapes_and_dtypes_at_every_resolution(arch, resolution):
    torch.manual_seed(0)
    G, D = build_networks(small_model(arch, resolution))
    z = torch.randn(2, G.z_dim)
    labels = torch.tensor([0, 2])
    img = G(z, labels)
    assert img.shape == (2, 1, resolution, resolution)
    assert img.dtype == torch.float32
    logits = D(img, labels)
    assert logits.shape == (2, 1) and logits.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["stylegan2", "dcgan"])
def test_forward_backward_reaches_every_parameter_on_cpu(arch):
    torch.manual_seed(0)
    G, D = build_networks(small_model(arch, 32))
    labels = torch.tensor([0, 1, 2, 1])
    img = G(torch.randn(4, G.z_dim), labels)
    D(img, labels).sum().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name


def test_class_label_changes_the_generated_image_for_the_same_latent():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32)
    z = torch.randn(1, 32).repeat(3, 1)
    img = G(z, torch.tensor([0, 1, 2]), noise_mode="const")
    assert (img[0] - img[1]).abs().mean() > 1e-3
    assert (img[1] - img[2]).abs().mean() > 1e-3


def test_class_label_changes_the_discriminator_logit_for_the_same_image():
    torch.manual_seed(0)
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, cmap_dim=32)
    img = torch.randn(1, 1, 32, 32).repeat(3, 1, 1, 1)
    logits = D(img, torch.tensor([0, 1, 2])).squeeze(1)
    assert len(set(round(v, 6) for v in logits.tolist())) == 3


def test_truncation_pulls_samples_toward_the_class_mean():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32)
    labels = torch.zeros(64, dtype=torch.long)
    for _ in range(20):  # populate the per-class running mean of w
        G.mapping(torch.randn(64, 32), labels, update_w_avg=True)
    z = torch.randn(64, 32)
    spread = lambda psi: G.mapping(z, labels, truncation_psi=psi)[:, 0].std(dim=0).mean()  # noqa: E731
    assert spread(0.5) < 0.6 * spread(1.0)


def test_noise_mode_const_is_deterministic_and_random_is_not():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32)
    for layer in G.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.5)
    z, c = torch.randn(2, 32), torch.tensor([0, 1])
    assert torch.equal(G(z, c, noise_mode="const"), G(z, c, noise_mode="const"))
    assert not torch.equal(G(z, c, noise_mode="random"), G(z, c, noise_mode="random"))


def test_minibatch_stddev_is_a_switch_and_off_means_samples_are_independent():
    torch.manual_seed(0)
    D_off = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, mbstd_group_size=0)
    D_on = Discriminator(img_resolution=16, channel_base=256, channel_max=32, cmap_dim=16, mbstd_group_size=4)
    x, c = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    alone = torch.cat([D_off(x[i:i + 1], c[i:i + 1]) for i in range(4)])
    assert torch.allclose(D_off(x, c), alone, atol=1e-5)
    assert D_on.epilogue.mbstd is not None and D_off.epilogue.mbstd is None
    # With minibatch-stddev, changing one sample changes another sample's logit.
    y = x.clone()
    y[3] += 1.0
    assert not torch.allclose(D_on(x, c)[0], D_on(y, c)[0])


def test_the_discriminator_can_be_narrower_than_the_generator():
    same_g, same_d = build_networks(ModelConfig(resolution=32))
    g, d = build_networks(ModelConfig(resolution=32, d_channel_base=512, d_channel_max=32))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(g) == count(same_g)
    assert count(d) < count(same_d) / 3
    assert d(torch.zeros(2, 1, 32, 32), torch.tensor([0, 2])).shape == (2, 1)


def test_discriminator_has_no_buffers_so_per_sample_gradients_are_well_defined():
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, mbstd_group_size=0)
    assert list(D.buffers()) == []


def test_r1_and_path_length_terms_are_finite_and_nonzero():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32)
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, cmap_dim=32)
    loss = StyleGAN2Loss(G, D, TrainConfig(pl_weight=2.0, pl_interval=4, r1_gamma=1.0))
    labels = torch.tensor([0, 1, 2, 0])
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    with_r1 = discriminator_real_loss_per_sample(D, real, labels, r1_weight=1.0)
    without_r1 = discriminator_real_loss_per_sample(D, real, labels, r1_weight=0.0)
    r1 = with_r1 - without_r1
    assert torch.isfinite(r1).all() and (r1 > 0).all()
    pl_loss, stats = loss.generator_path_length(torch.randn(4, 32), labels)
    assert torch.isfinite(pl_loss) and stats["loss_pl"] > 0
    pl_loss.backward()
    assert G.mapping.layers[0].weight.grad.abs().sum() > 0


def test_high_pass_branch_is_off_at_the_seed_value_and_changes_output_when_on():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32, w_hpf=0.0)
    ws = G.mapping(torch.randn(2, 32), torch.tensor([0, 1]))
    plain = G.synthesize(ws, noise_mode="const")
    assert torch.equal(plain, G.synthesis(ws, noise_mode="const"))
    G.w_hpf = 1.0
    assert not torch.allclose(G.synthesize(ws, noise_mode="const"), plain)


def test_diversity_sensitive_loss_lowers_the_generator_loss_by_the_weighted_image_distance():
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32)
    D = Discriminator(img_resolution=32, channel_base=512, channel_max=32, cmap_dim=32)
    loss = StyleGAN2Loss(G, D, TrainConfig(style_mixing_prob=0.0))
    z, labels = torch.randn(4, 32), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    plain, _ = loss.generator_main(z, labels, ds_weight=0.0)
    torch.manual_seed(1)
    with_ds, stats = loss.generator_main(z, labels, ds_weight=2.0)
    assert float(stats["loss_ds"]) > 0
    assert with_ds.item() == pytest.approx(plain.item() - 2.0 * float(stats["loss_ds"]), rel=1e-5)


# -- the fast formulations compute the same functions as the straightforward ones ----------------
# The layers' forward methods as first written (one operation per formula term), to check that the
# faster formulations in medstylegan2.networks compute the same function with the same parameters.


def _lrelu_with_gain(x):
    import torch.nn.functional as F

    from medstylegan2.networks import LRELU_GAIN, LRELU_SLOPE

    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


def _act(x, activation):
    return _lrelu_with_gain(x) if activation == "lrelu" else x


def _straightforward_modulated_conv2d(x, weight, styles, *, demodulate=True, padding=1, up=False):
    import torch.nn.functional as F

    if up:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    batch = x.shape[0]
    out = F.conv2d(x * styles.view(batch, -1, 1, 1), weight, padding=padding)
    if demodulate:
        w = weight.unsqueeze(0) * styles.view(batch, 1, -1, 1, 1)
        out = out * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().view(batch, -1, 1, 1)
    return out


def _straightforward_fully_connected(self, x):
    import math

    import torch.nn.functional as F

    w = self.weight * (self.lr_multiplier / math.sqrt(self.weight.shape[1]))
    b = self.bias * self.lr_multiplier if self.bias is not None else None
    return _act(F.linear(x, w, b), self.activation)


def _straightforward_conv2d_layer(self, x):
    import torch.nn.functional as F

    x = F.conv2d(x, self.weight * self.weight_gain, padding=self.padding)
    if self.down:
        x = F.avg_pool2d(x, kernel_size=2)
    if self.bias is not None:
        x = x + self.bias.view(1, -1, 1, 1)
    return _act(x, self.activation) * self.gain


def _straightforward_synthesis_layer(self, x, w, noise_mode="random"):
    styles = self.affine(w)
    x = _straightforward_modulated_conv2d(x, self.weight, styles, demodulate=True, padding=self.padding, up=self.up)
    if self.use_noise and noise_mode == "const":
        x = x + self.noise_const.view(1, 1, self.resolution, self.resolution) * self.noise_strength
    return _lrelu_with_gain(x + self.bias.view(1, -1, 1, 1))


def _straightforward_to_image(self, x, w):
    styles = self.affine(w) * self.weight_gain
    return _straightforward_modulated_conv2d(x, self.weight, styles, demodulate=False, padding=0) \
        + self.bias.view(1, -1, 1, 1)


def _outputs_and_gradients(G, D, z, labels, real):
    """G's image, D's logits, and every parameter's gradient of a loss that uses both with R1 and
    path-length terms (double backward through both networks)."""
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    ws = G.mapping(z, labels)
    img = G.synthesize(ws, noise_mode="const")
    fake_logits = D(img, labels)
    real = real.detach().requires_grad_(True)
    real_logits = D(real, labels)
    (r1_grads,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    weights = torch.linspace(-1, 1, img.numel(), dtype=img.dtype).view_as(img)
    (pl_grads,) = torch.autograd.grad((img * weights).sum(), ws, create_graph=True)
    loss = (torch.nn.functional.softplus(fake_logits).mean() + torch.nn.functional.softplus(-real_logits).mean()
            + r1_grads.square().sum() + pl_grads.square().sum())
    loss.backward()
    grads = {f"G.{k}": p.grad.clone() for k, p in G.named_parameters()}
    grads.update({f"D.{k}": p.grad.clone() for k, p in D.named_parameters()})
    return {"img": img.detach(), "logits": torch.cat([fake_logits, real_logits]).detach(), "loss": loss.detach()}, grads


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_fast_layers_give_the_outputs_and_gradients_of_the_straightforward_ones(monkeypatch, dtype, tolerance):
    """Fused down-convolutions, transposed-conv upsampling, matmul demodulation and gains folded
    into weights change the arithmetic, not the function: same parameters, same outputs and
    gradients (R1 and path length included) up to float rounding."""
    from medstylegan2 import networks

    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, img_resolution=32, channel_base=256, channel_max=16).to(dtype)
    D = Discriminator(img_resolution=32, channel_base=256, channel_max=16, cmap_dim=16).to(dtype)
    for layer in G.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.3)
        if hasattr(layer, "bias") and isinstance(layer.bias, torch.nn.Parameter):
            layer.bias.data.normal_(0.0, 0.5)  # non-zero biases, so the bias terms are checked too
    for layer in D.modules():
        if hasattr(layer, "bias") and isinstance(layer.bias, torch.nn.Parameter):
            layer.bias.data.normal_(0.0, 0.5)
    z, labels = torch.randn(4, 16, dtype=dtype), torch.tensor([0, 1, 2, 1])
    real = torch.rand(4, 1, 32, 32, dtype=dtype) * 2 - 1
    fast_out, fast_grads = _outputs_and_gradients(G, D, z, labels, real)
    keys_before = (list(G.state_dict()), list(D.state_dict()))

    monkeypatch.setattr(networks.FullyConnectedLayer, "forward", _straightforward_fully_connected)
    monkeypatch.setattr(networks.Conv2dLayer, "forward", _straightforward_conv2d_layer)
    monkeypatch.setattr(networks.SynthesisLayer, "forward", _straightforward_synthesis_layer)
    monkeypatch.setattr(networks.ToImageLayer, "forward", _straightforward_to_image)
    monkeypatch.setattr(networks, "upsample2x", lambda x: torch.nn.functional.interpolate(
        x, scale_factor=2, mode="bilinear", align_corners=False))
    slow_out, slow_grads = _outputs_and_gradients(G, D, z, labels, real)

    assert keys_before == (list(G.state_dict()), list(D.state_dict()))
    for key in fast_out:
        scale = slow_out[key].abs().max().clamp(min=1.0)
        assert (fast_out[key] - slow_out[key]).abs().max() <= tolerance * scale, key
    assert fast_grads.keys() == slow_grads.keys()
    for key in slow_grads:
        scale = slow_grads[key].abs().max().clamp(min=1.0)
        assert (fast_grads[key] - slow_grads[key]).abs().max() <= tolerance * scale, key
