"""Class-conditional StyleGAN2 generator and discriminator for single-channel images, in pure PyTorch.

Layers follow the StyleGAN2 design (Karras et al., CVPR 2020): equalized learning rate, a mapping
network with a class embedding, modulated/demodulated convolutions with per-layer noise, a skip
generator and a residual discriminator with projection conditioning. No custom CUDA ops and no
buffers in the discriminator, so that ``torch.func`` can take exact per-sample gradients of D
(differential privacy) and the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def activation_gain(activation: str) -> float:
    """The gain each activation is followed by (He-style sqrt(2) for leaky ReLU)."""
    if activation == "lrelu":
        return LRELU_GAIN
    if activation == "linear":
        return 1.0
    raise ValueError(f"unknown activation {activation!r}; use 'lrelu' or 'linear'")


def _nonlinearity(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation without its gain: callers fold the gain into the (small) weights and bias
    before it, because leaky ReLU is positively homogeneous, lrelu(z) * g == lrelu(g * z) for
    g > 0. That saves a full pass over the activations per layer."""
    return F.leaky_relu(x, LRELU_SLOPE) if activation == "lrelu" else x


def _widened(x: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 result of autocast as fp32; fp32 and fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(x: torch.Tensor):
    """Full precision for small but sensitive computations under bf16 autocast (a no-op otherwise)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot by comparison: unlike ``F.one_hot`` it never reads label values on the host, so
    ``torch.func.vmap`` can batch it (one per-sample-gradient call for the whole DP batch)."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.long().unsqueeze(-1) == classes).to(dtype)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling (``F.interpolate(..., mode="bilinear", align_corners=False)``).

    Bilinear upsampling is a separable [1,3,3,1]/8 FIR filter with zero-insertion, i.e. the
    resampling filter of StyleGAN2, without needing a filter buffer or a custom op. It is computed
    as exactly that: a per-channel stride-2 transposed convolution with the 4x4 filter over the
    edge-replicated input (interpolation clamps at the border), which on CPU runs forward and
    backward about 3x faster than ``F.interpolate``. Same values up to float rounding.
    """
    channels = x.shape[1]
    # Filled on the device (a tensor from a Python list would be a host-to-device copy, which
    # waits for the GPU).
    taps = torch.full((4,), 0.25, device=x.device, dtype=x.dtype)
    taps[1:3] = 0.75
    kernel = (taps.view(4, 1) * taps.view(1, 4)).expand(channels, 1, 4, 4)
    # Output pixel 2i takes 3/4 of x[i] and 1/4 of x[i-1], pixel 2i+1 3/4 of x[i] and 1/4 of x[i+1];
    # padding=3 crops the transposed convolution of the 1-pixel-padded input to exactly 2H x 2W.
    return F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, stride=2, padding=3,
                              groups=channels)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    # A 2x2 box filter: anti-aliased, per-sample, buffer-free (Opacus/torch.func friendly).
    return F.avg_pool2d(x, kernel_size=2)


def box_filtered_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kxk kernel followed by 2x2 average pooling, as one (k+1)x(k+1) kernel for a stride-2 conv.

    ``avg_pool2d(conv2d(x, w, padding=p), 2) == conv2d(x, box_filtered_kernel(w), stride=2, padding=p)``
    exactly in real arithmetic (both are linear; the pooled output at (i, j) is the mean of the
    four convolutions at (2i + di, 2j + dj), i.e. one convolution with w shifted by (di, dj) and
    averaged). It computes only the outputs that survive the pooling: 16 taps per output pixel
    instead of 4 x 9 for a 3x3 kernel.
    """
    return 0.25 * (F.pad(weight, (0, 1, 0, 1)) + F.pad(weight, (1, 0, 0, 1))
                   + F.pad(weight, (0, 1, 1, 0)) + F.pad(weight, (1, 0, 1, 0)))


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


# ----------------------------------------------------------------------------------------------
# Equalized-learning-rate primitives


class FullyConnectedLayer(nn.Module):
    """Dense layer whose weights are stored at unit variance and scaled at run time."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bias_init: float = 0.0,
                 lr_multiplier: float = 1.0, activation: str = "linear"):
        super().__init__()
        self.activation = activation
        self.lr_multiplier = lr_multiplier
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        out_gain = activation_gain(activation)
        self.weight_gain = lr_multiplier / math.sqrt(in_features) * out_gain
        self.bias_gain = lr_multiplier * out_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # act(x w^T + b) * gain, with the gain folded into w and b (see _nonlinearity).
        w = self.weight * self.weight_gain
        b = self.bias * self.bias_gain if self.bias is not None else None
        return _nonlinearity(F.linear(x, w, b), self.activation)


class Conv2dLayer(nn.Module):
    """Equalized-LR convolution with optional 2x downsampling after the convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "linear", down: bool = False, gain: float = 1.0):
        super().__init__()
        if gain <= 0:
            raise ValueError(f"gain must be > 0 (it is folded through the activation), got {gain}")
        self.activation = activation
        self.down = down
        self.gain = gain
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # act(conv(x, w * weight_gain) [pooled] + b) * activation gain * gain, computed as one
        # convolution with the gains folded into w and b (see _nonlinearity) and the bias added by
        # the convolution itself: no pass over the activations besides the conv and the activation.
        out_gain = activation_gain(self.activation) * self.gain
        w = self.weight * (self.weight_gain * out_gain)
        b = self.bias * out_gain if self.bias is not None else None
        if not self.down:
            x = F.conv2d(x, w, b, padding=self.padding)
        elif w.shape[-1] == 1:
            # A 1x1 convolution commutes with 2x2 average pooling: pool first, 4x fewer MACs.
            x = F.conv2d(downsample2x(x), w, b)
        else:
            # conv + 2x2 average pooling as one stride-2 convolution (box_filtered_kernel).
            x = F.conv2d(x, box_filtered_kernel(w), b, stride=2, padding=self.padding)
        return _nonlinearity(x, self.activation)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, padding: int = 1, up: bool = False,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample modulated convolution (optionally of the 2x upsampled input), computed as
    scale -> shared conv -> rescale.

    Equivalent to convolving every sample with its own modulated (and demodulated) kernel, but
    uses one ordinary convolution for the whole batch (StyleGAN2's ``fused_modconv=False``, the
    faster form for training batches).
    """
    batch = x.shape[0]
    x = x * styles.view(batch, -1, 1, 1)
    if up:
        # Upsampling is linear per channel, so it commutes with the per-channel style scale;
        # scaling first touches 4x fewer values.
        x = upsample2x(x)
    if not demodulate:
        return F.conv2d(x, weight, bias, padding=padding)
    out = F.conv2d(x, weight, padding=padding)
    out = out * demodulation_coefficients(weight, styles).view(batch, -1, 1, 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """1 / ||weight * style||, per (sample, out channel): the output std for unit-variance inputs.

    The norm of sample n's modulated kernel for output o is sum_i s[n,i]^2 * sum_kl w[o,i,k,l]^2,
    so it is one [N, I] x [I, O] product instead of an [N, O, I, k, k] tensor of modulated kernels.
    Computed in fp32 under bf16 autocast (a few hundred numbers per sample: precision is cheap here).
    """
    with _no_autocast(styles):
        styles, weight = _widened(styles), _widened(weight)
        return (styles.square() @ weight.square().sum(dim=[2, 3]).t().to(styles.dtype) + 1e-8).rsqrt()


# ----------------------------------------------------------------------------------------------
# Generator


class MappingNetwork(nn.Module):
    """z, class -> w. Keeps a running mean of w per class for class-aware truncation."""

    def __init__(self, *, z_dim: int, num_classes: int, w_dim: int, num_ws: int, num_layers: int = 4,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.998):
        super().__init__()
        self.z_dim, self.num_classes, self.w_dim, self.num_ws = z_dim, num_classes, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = FullyConnectedLayer(num_classes, w_dim)
        dims = [z_dim + w_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnectedLayer(dims[i], dims[i + 1], activation="lrelu", lr_multiplier=lr_multiplier)
            for i in range(num_layers))
        self.register_buffer("w_avg", torch.zeros(num_classes, w_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_w_avg: bool = False) -> torch.Tensor:
        onehot = one_hot(labels, self.num_classes, z.dtype)
        x = torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(self.embed(onehot))], dim=1)
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            self._track_w_avg(x.detach(), onehot)
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            center = self.w_avg[labels.long()].unsqueeze(1)
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = center + truncation_psi * (ws[:, :cutoff] - center)
        return ws

    @torch.no_grad()
    def _track_w_avg(self, w: torch.Tensor, onehot: torch.Tensor) -> None:
        counts = onehot.sum(dim=0)
        present = counts > 0
        means = (onehot.t() @ w) / counts.clamp(min=1).unsqueeze(1)
        updated = means.lerp(self.w_avg, self.w_avg_beta)
        self.w_avg.copy_(torch.where(present.unsqueeze(1), updated, self.w_avg))


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally after 2x upsampling) + per-pixel noise + bias + lrelu."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int,
                 up: bool = False, use_noise: bool = True, kernel_size: int = 3):
        super().__init__()
        self.up, self.use_noise, self.resolution = up, use_noise, resolution
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        # lrelu(conv(x * s) * d + noise * strength + bias) * sqrt(2), with sqrt(2) folded into the
        # small factors d, strength and bias (see _nonlinearity): one multiply-add and one add over
        # the activations besides the convolution and the activation.
        batch = x.shape[0]
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, padding=self.padding, up=self.up)
        # The small factors in the activations' dtype (bf16 under autocast), so the result stays in it.
        dcoefs = (demodulation_coefficients(self.weight, styles) * LRELU_GAIN).to(x.dtype)
        bias = (self.bias * LRELU_GAIN).to(x.dtype).view(1, -1, 1, 1)
        if self.use_noise and noise_mode != "none":
            if noise_mode == "random":
                noise = torch.randn(batch, 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            elif noise_mode == "const":
                noise = self.noise_const.view(1, 1, self.resolution, self.resolution)
            else:
                raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
            strength = (self.noise_strength * LRELU_GAIN).to(x.dtype)
            x = torch.addcmul(noise.to(x.dtype) * strength, x, dcoefs.view(batch, -1, 1, 1)) + bias
        else:
            x = torch.addcmul(bias, x, dcoefs.view(batch, -1, 1, 1))
        return _nonlinearity(x, "lrelu")


class ToImageLayer(nn.Module):
    """Modulated 1x1 conv (no demodulation) from features to the image channels."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int):
        super().__init__()
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, demodulate=False, padding=0, bias=self.bias)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const | up-conv), conv, to-image, add upsampled image."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int,
                 img_channels: int):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution)
        self.torgb = ToImageLayer(out_channels, img_channels, w_dim=w_dim)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        if self.conv0 is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, next(w_iter), noise_mode)
        x = self.conv1(x, next(w_iter), noise_mode)
        # The image accumulates in fp32 under bf16 autocast (one channel: cheap), as in StyleGAN2-ADA.
        y = _widened(self.torgb(x, next(w_iter)))
        if img is not None:
            with _no_autocast(img):
                y = upsample2x(img) + y
        return x, y


class SynthesisNetwork(nn.Module):
    def __init__(self, *, w_dim: int, img_resolution: int, img_channels: int, channel_base: int,
                 channel_max: int):
        super().__init__()
        self.img_resolution = img_resolution
        self.resolutions = [2 ** i for i in range(2, int(np.log2(img_resolution)) + 1)]
        self.blocks = nn.ModuleList()
        self.num_ws = 0
        prev = 0
        for res in self.resolutions:
            ch = channels_at(res, channel_base, channel_max)
            block = SynthesisBlock(prev, ch, w_dim=w_dim, resolution=res, img_channels=img_channels)
            self.blocks.append(block)
            self.num_ws += block.num_conv
            prev = ch
        self.num_ws += self.blocks[-1].num_torgb

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        x = img = None
        w_idx = 0
        for block in self.blocks:
            # A block's to-image layer shares its w with the next block's first conv.
            block_ws = ws[:, w_idx:w_idx + block.num_conv + block.num_torgb]
            x, img = block(x, img, block_ws, noise_mode)
            w_idx += block.num_conv
        return img


def high_pass(img: torch.Tensor) -> torch.Tensor:
    """3x3 Laplacian high-pass, per channel (a constant, not a buffer)."""
    kernel = torch.full((3, 3), -1.0 / 8.0, device=img.device, dtype=img.dtype)  # filled on the device
    kernel[1, 1] = 1.0
    kernel = kernel.view(1, 1, 3, 3).repeat(img.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), kernel, groups=img.shape[1])


class Generator(nn.Module):
    """Class-conditional StyleGAN2 generator: ``G(z, labels) -> images in [-1, 1] (roughly)``."""

    def __init__(self, *, z_dim: int = 128, num_classes: int = 3, w_dim: int = 128, img_resolution: int = 64,
                 img_channels: int = 1, mapping_layers: int = 4, channel_base: int = 4096,
                 channel_max: int = 128, w_hpf: float = 0.0, mapping_lr_multiplier: float = 0.01):
        super().__init__()
        self.z_dim, self.num_classes, self.w_dim = z_dim, num_classes, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        # Seed paper's "HPF" knob: weight of a high-frequency branch added to the output image.
        # 0 (the seed's value) leaves the plain StyleGAN2 output untouched.
        self.w_hpf = w_hpf
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          channel_base=channel_base, channel_max=channel_max)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, num_classes=num_classes, w_dim=w_dim, num_ws=self.num_ws,
                                      num_layers=mapping_layers, lr_multiplier=mapping_lr_multiplier)

    def synthesize(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        img = self.synthesis(ws, noise_mode=noise_mode)
        if self.w_hpf > 0:
            img = img + self.w_hpf * high_pass(img)
        return img

    def forward(self, z: torch.Tensor, labels: torch.Tensor, *, truncation_psi: float = 1.0,
                noise_mode: str = "random", update_w_avg: bool = False) -> torch.Tensor:
        ws = self.mapping(z, labels, truncation_psi=truncation_psi, update_w_avg=update_w_avg)
        return self.synthesize(ws, noise_mode=noise_mode)


# ----------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """Residual block: two 3x3 convs (the second downsamples) plus a 1x1 downsampling skip."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, *, img_channels: int):
        super().__init__()
        self.fromrgb = (Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu")
                        if in_channels == 0 else None)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu")
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=True,
                                 gain=math.sqrt(0.5))
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=True, gain=math.sqrt(0.5))

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(img)
        y = self.skip(x)
        x = self.conv1(self.conv0(x))
        return y + x


class MinibatchStdLayer(nn.Module):
    """Appends the std of features over a group of samples, so D can see a lack of variety.

    Two ways to form the group:

    - over the batch (``against_reference`` false, StyleGAN2): groups of ``group_size`` samples of
      the batch. Every sample's output then depends on the others in its group, so this mode has
      no per-sample gradient and is rejected under DP.
    - against reference fakes (``against_reference`` true, the form DP allows): each sample is
      grouped with ``group_size - 1`` reference fakes of its own class, whose features the caller
      sets with ``Discriminator.mbstd_reference`` (constants: no gradient flows into them). A
      sample's output depends on itself and on those fakes only, never on another sample of its
      batch. When G collapses onto one image per class, a fake's group is all alike and its std
      is near 0, while a real image's is not: D sees the collapse, as batch mbstd lets it. With no
      reference set the appended channel is 0.
    """

    def __init__(self, group_size: int, num_channels: int = 1, *, against_reference: bool = False):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels
        self.against_reference = against_reference
        # Features [num_classes, group_size - 1, C, H, W] of the reference fakes, by class (not a
        # parameter or buffer: never saved or exchanged; set per step by the context manager).
        self.reference: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.against_reference:
            return torch.cat([x, self._std_against_reference(x, labels)], dim=1)
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        while n % g:
            g -= 1
        f = self.num_channels
        y = _group_std(x.reshape(g, -1, f, c // f, h, w))
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def _std_against_reference(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        n, c, h, w = x.shape
        f = self.num_channels
        if self.reference is None:
            return x.new_zeros((n, f, h, w))
        if labels is None:
            raise ValueError("minibatch-stddev against reference fakes needs the samples' labels")
        reference = self.reference.detach().to(dtype=x.dtype)
        num_classes, k = reference.shape[:2]
        # Each sample's own class's references, by a one-hot product: vmap (per-sample DP
        # gradients) cannot index by a batched label. [k, n, C, H, W].
        one_hot_labels = (labels.reshape(-1, 1) == torch.arange(num_classes, device=x.device)).to(x.dtype)
        own = torch.einsum("nq,qkchw->knchw", one_hot_labels, reference)
        y = _group_std(torch.cat([x.unsqueeze(0), own], dim=0).reshape(k + 1, n, f, c // f, h, w))
        return y.reshape(n, f, 1, 1).expand(n, f, h, w)


def _group_std(groups: torch.Tensor) -> torch.Tensor:
    """[G, N, F, C/F, H, W] -> [N, F]: the std over each group (dim 0), averaged over features."""
    y = (groups - groups.mean(dim=0)).square().mean(dim=0)
    return (y + 1e-8).sqrt().mean(dim=[2, 3, 4])


class DiscriminatorEpilogue(nn.Module):
    """4x4 features -> projection-conditioned logit: <features, embed(class)> / sqrt(cmap_dim).

    With ``num_head_classes`` > 0 a linear auxiliary-classifier head on the same features also
    gives class logits (AC-GAN), returned when ``with_class_logits`` is true.
    """

    def __init__(self, in_channels: int, *, cmap_dim: int, mbstd_group_size: int, mbstd_channels: int,
                 num_head_classes: int = 0, mbstd_reference: bool = False):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = (MinibatchStdLayer(mbstd_group_size, mbstd_channels, against_reference=mbstd_reference)
                      if mbstd_group_size > 0 else None)
        extra = mbstd_channels if self.mbstd is not None else 0
        self.conv = Conv2dLayer(in_channels + extra, in_channels, 3, activation="lrelu")
        self.fc = FullyConnectedLayer(in_channels * 16, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, cmap_dim)
        self.class_head = FullyConnectedLayer(in_channels, num_head_classes) if num_head_classes > 0 else None

    def forward(self, x: torch.Tensor, cmap: torch.Tensor, with_class_logits: bool = False,
                labels: Optional[torch.Tensor] = None):
        if self.mbstd is not None:
            x = self.mbstd(x, labels)
        x = self.conv(x)
        features = self.fc(x.flatten(1))
        logit = (self.out(features) * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        if not with_class_logits:
            return logit
        if self.class_head is None:
            raise ValueError("this discriminator has no class head (model.d_class_head is false)")
        return logit, self.class_head(features)


class ClassEmbedding(nn.Module):
    """Class label -> projection vector for the discriminator (a small MLP over the one-hot)."""

    def __init__(self, num_classes: int, cmap_dim: int, num_layers: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.embed = FullyConnectedLayer(num_classes, cmap_dim)
        self.layers = nn.ModuleList(FullyConnectedLayer(cmap_dim, cmap_dim, activation="lrelu")
                                    for _ in range(num_layers))

    def forward(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = normalize_2nd_moment(self.embed(one_hot(labels, self.num_classes, dtype)))
        for layer in self.layers:
            x = layer(x)
        return x


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator with projection conditioning: ``D(images, labels) -> logits [N,1]``."""

    def __init__(self, *, num_classes: int = 3, img_resolution: int = 64, img_channels: int = 1,
                 channel_base: int = 4096, channel_max: int = 128, cmap_dim: int = 128,
                 mbstd_group_size: int = 4, mbstd_channels: int = 1, class_head: bool = False,
                 mbstd_reference: bool = False):
        super().__init__()
        self.num_classes, self.img_resolution, self.img_channels = num_classes, img_resolution, img_channels
        self.has_class_head = class_head
        self.mbstd_group_size = mbstd_group_size
        # True when minibatch-stddev groups each sample with reference fakes, not with its batch.
        self.mbstd_against_reference = bool(mbstd_reference and mbstd_group_size > 0)
        resolutions = [2 ** i for i in range(int(np.log2(img_resolution)), 2, -1)]
        self.blocks = nn.ModuleList()
        for i, res in enumerate(resolutions):
            in_ch = 0 if i == 0 else channels_at(res, channel_base, channel_max)
            tmp_ch = channels_at(res, channel_base, channel_max)
            out_ch = channels_at(res // 2, channel_base, channel_max)
            self.blocks.append(DiscriminatorBlock(in_ch, tmp_ch, out_ch, img_channels=img_channels))
        self.class_embedding = ClassEmbedding(num_classes, cmap_dim)
        self.epilogue = DiscriminatorEpilogue(channels_at(4, channel_base, channel_max), cmap_dim=cmap_dim,
                                              mbstd_group_size=mbstd_group_size, mbstd_channels=mbstd_channels,
                                              num_head_classes=num_classes if class_head else 0,
                                              mbstd_reference=mbstd_reference)

    @property
    def mixes_batch(self) -> bool:
        """True when one sample's output depends on other samples of its batch (batch mbstd)."""
        return self.mbstd_group_size > 0 and not self.mbstd_against_reference

    def block_features(self, img: torch.Tensor) -> torch.Tensor:
        """The 4x4 features the epilogue (and its minibatch-stddev) reads."""
        x = None
        for block in self.blocks:
            x = block(x, img)
        return x

    def forward(self, img: torch.Tensor, labels: torch.Tensor, with_class_logits: bool = False):
        """Logits [N, 1]; with ``with_class_logits`` also the class head's logits [N, num_classes]."""
        return self.epilogue(self.block_features(img), self.class_embedding(labels, img.dtype), with_class_logits,
                             labels)

    def reference_labels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The class of each reference fake ``mbstd_reference`` takes, flattened: group - 1 of each class."""
        return torch.arange(self.num_classes, device=device).repeat_interleave(self.mbstd_group_size - 1)

    @contextlib.contextmanager
    def mbstd_reference(self, reference_images: Optional[torch.Tensor]):
        """Within the block, minibatch-stddev groups every sample with reference fakes of its class.

        ``reference_images``: [num_classes, mbstd_group_size - 1, C, H, W] fakes, row q of class q
        (or None: nothing to set). Their features are taken once, with D's current weights and
        no gradient, so they are constants of every forward inside the block. A no-op unless D
        uses reference mbstd.
        """
        layer = self.epilogue.mbstd
        if not self.mbstd_against_reference or layer is None or reference_images is None:
            yield
            return
        q, k = reference_images.shape[:2]
        if q != self.num_classes or k != self.mbstd_group_size - 1:
            raise ValueError(f"reference fakes must be [num_classes={self.num_classes}, "
                             f"mbstd_group_size - 1={self.mbstd_group_size - 1}, C, H, W], got "
                             f"{tuple(reference_images.shape)}")
        with torch.no_grad():
            features = self.block_features(reference_images.detach().flatten(0, 1))
        layer.reference = features.reshape(q, k, *features.shape[1:])
        try:
            yield
        finally:
            layer.reference = None


def build_networks(model_cfg) -> tuple[nn.Module, nn.Module]:
    """(G, D) for a ``ModelConfig``; ``arch: dcgan`` gives the DCGAN baseline with the same interface."""
    if model_cfg.arch == "dcgan":
        from medstylegan2.dcgan import DCGANDiscriminator, DCGANGenerator

        G = DCGANGenerator(z_dim=model_cfg.z_dim, num_classes=model_cfg.num_classes,
                           img_resolution=model_cfg.resolution, img_channels=model_cfg.channels)
        D = DCGANDiscriminator(num_classes=model_cfg.num_classes, img_resolution=model_cfg.resolution,
                               img_channels=model_cfg.channels, cmap_dim=model_cfg.cmap_dim)
        return G, D
    G = Generator(z_dim=model_cfg.z_dim, num_classes=model_cfg.num_classes, w_dim=model_cfg.w_dim,
                  img_resolution=model_cfg.resolution, img_channels=model_cfg.channels,
                  mapping_layers=model_cfg.mapping_layers, channel_base=model_cfg.channel_base,
                  channel_max=model_cfg.channel_max, w_hpf=model_cfg.w_hpf,
                  mapping_lr_multiplier=model_cfg.mapping_lr_multiplier)
    D = Discriminator(num_classes=model_cfg.num_classes, img_resolution=model_cfg.resolution,
                      img_channels=model_cfg.channels,
                      channel_base=model_cfg.d_channel_base or model_cfg.channel_base,
                      channel_max=model_cfg.d_channel_max or model_cfg.channel_max, cmap_dim=model_cfg.cmap_dim,
                      mbstd_group_size=model_cfg.mbstd_group_size, mbstd_channels=model_cfg.mbstd_channels,
                      class_head=model_cfg.d_class_head, mbstd_reference=model_cfg.mbstd_reference)
    return G, D


def under(name: str, prefix: str) -> bool:
    """Parameter ``name`` is ``prefix`` itself or lies in the module ``prefix`` (a dotted path):
    ``blocks.1`` holds ``blocks.1.conv0.weight`` but not ``blocks.10.conv0.weight``."""
    return name == prefix or name.startswith(prefix + ".")


def freeze_parameters(module: nn.Module, prefixes: list[str]) -> list[nn.Parameter]:
    """Freeze every parameter whose name starts with one of ``prefixes`` (a dotted module path such
    as ``blocks`` or ``epilogue.fc``); returns the parameters left to train, in module order.

    Raises ValueError when a prefix names no parameter, or when nothing would be left to train.
    """
    named = list(module.named_parameters())
    frozen = {name for name, _ in named if any(under(name, prefix) for prefix in prefixes)}
    unmatched = [prefix for prefix in prefixes if not any(under(name, prefix) for name in frozen)]
    if unmatched:
        roots = sorted({name.split(".")[0] for name, _ in named})
        raise ValueError(f"{unmatched[0]!r} names no parameter of {type(module).__name__} "
                         f"(its parameters start with {', '.join(roots)})")
    if len(frozen) == len(named):
        raise ValueError(f"{prefixes} freeze every parameter of {type(module).__name__}: nothing would train")
    for name, p in named:
        p.requires_grad_(name not in frozen)
    return [p for name, p in named if name not in frozen]
