"""Class-conditional DCGAN baseline (Radford et al., 2016) with the StyleGAN2 networks' interface.

Kept to rerun the seed paper's GAN/DCGAN comparison: ``G(z, labels, ...) -> images`` and
``D(images, labels) -> logits``; options that only StyleGAN2 has (truncation, noise mode, w_avg)
are accepted and ignored so the trainer and sampler need no special cases.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DCGANGenerator(nn.Module):
    def __init__(self, *, z_dim: int = 128, num_classes: int = 3, img_resolution: int = 64, img_channels: int = 1,
                 base_channels: int = 64, max_channels: int = 512, embed_dim: int = 32):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.embed = nn.Embedding(num_classes, embed_dim)
        num_up = int(np.log2(img_resolution)) - 2
        ch = min(base_channels * 2 ** (num_up - 1), max_channels)
        self.project = nn.Sequential(nn.ConvTranspose2d(z_dim + embed_dim, ch, 4, 1, 0, bias=False),
                                     nn.BatchNorm2d(ch), nn.ReLU(True))
        layers: list[nn.Module] = []
        for _ in range(num_up - 1):
            out = max(ch // 2, 16)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, img_channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, *, truncation_psi: float = 1.0,
                noise_mode: str = "random", update_w_avg: bool = False) -> torch.Tensor:
        x = torch.cat([z, self.embed(labels.long())], dim=1)
        return self.body(self.project(x[:, :, None, None]))


class DCGANDiscriminator(nn.Module):
    """Strided convs + LeakyReLU, no BatchNorm (keeps samples independent), projection conditioning."""

    def __init__(self, *, num_classes: int = 3, img_resolution: int = 64, img_channels: int = 1,
                 base_channels: int = 64, max_channels: int = 512, cmap_dim: int = 128):
        super().__init__()
        self.num_classes, self.img_resolution, self.img_channels = num_classes, img_resolution, img_channels
        self.mbstd_group_size = 0
        num_down = int(np.log2(img_resolution)) - 2
        layers: list[nn.Module] = []
        ch_in, ch = img_channels, base_channels
        for _ in range(num_down):
            layers += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            ch_in, ch = ch, min(ch * 2, max_channels)
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(ch_in * 16, cmap_dim)
        self.class_embed = nn.Embedding(num_classes, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.features(self.body(img).flatten(1)), 0.2)
        return (h * self.class_embed(labels.long())).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
