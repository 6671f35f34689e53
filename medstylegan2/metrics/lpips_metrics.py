"""LPIPS figures per class: diversity among generated images and distance to the nearest real image.

The network is the ``lpips`` package's ``LPIPS`` (with its own linear heads) over torchvision's official
AlexNet / VGG16 trunk when that file is in the weights folders, else ``stlpips-pytorch``'s ``LPIPS`` with its
shift-tolerant trunk and heads (ST-LPIPS). See ``features.resolve_lpips_backbone``; the label says which.

- Diversity (the seed paper's protocol): mean LPIPS over pairs of distinct generated images of one class;
  all pairs when there are at most ``max_pairs``, else ``max_pairs`` random ordered pairs (i != j), seeded.
- Nearest real: for each generated image, the ``candidates`` real images of the same class nearest in pixel
  L2 are shortlisted and the smallest LPIPS to them is kept; the figure is the mean over generated images
  (``candidates=1`` is "LPIPS to the pixel-nearest real image").

Grayscale images are replicated to three channels and scaled to [-1, 1]; images smaller than 64 px are
upsampled (bilinear) to 64 px, the smallest size at which both trunks still have spatial extent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medstylegan2.errors import MissingWeightsError
from medstylegan2.metrics.features import Weights, import_stlpips, resolve_lpips_backbone

log = logging.getLogger(__name__)

MIN_SIZE = 64


@dataclass
class LpipsModel:
    module: nn.Module
    weights: Weights
    net: str
    device: str = "cpu"
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _normalize(self, t: torch.Tensor) -> torch.Tensor:
        return self.normalize(t)

    @property
    def label(self) -> str:
        return self.weights.label

    def _prepare(self, images_uint8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(self.device, torch.float32) / 127.5 - 1.0
        if x.shape[-1] < MIN_SIZE or x.shape[-2] < MIN_SIZE:
            x = F.interpolate(x, size=(max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1])), mode="bilinear",
                              align_corners=False)
        return x.expand(-1, 3, -1, -1)

    @torch.no_grad()
    def distance(self, a: np.ndarray, b: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """LPIPS between paired uint8 images a[i], b[i] ([N, 1, H, W] each) by the library's forward: float [N]."""
        if a.shape != b.shape:
            raise ValueError(f"paired image sets differ in shape: {a.shape} vs {b.shape}")
        out = []
        for i in range(0, len(a), batch_size):
            d = self.module(self._prepare(a[i:i + batch_size]), self._prepare(b[i:i + batch_size]))
            out.append(d.reshape(-1).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> list[torch.Tensor]:
        """Unit-normalised trunk activations per layer, as the library's forward computes them."""
        m = self.module
        per_batch = []
        for i in range(0, len(images), batch_size):
            x = self._prepare(images[i:i + batch_size])
            if m.version == "0.1":
                x = m.scaling_layer(x)
            per_batch.append([self._normalize(t) for t in m.net.forward(x)])
        return [torch.cat(layer) for layer in zip(*per_batch)]

    @torch.no_grad()
    def distance_from_features(self, fa: list[torch.Tensor], ia: np.ndarray, fb: list[torch.Tensor],
                               ib: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """LPIPS between images ia[k] of ``fa`` and ib[k] of ``fb`` (outputs of ``features``): float [K].

        The library's forward, minus recomputing the trunk: per layer, the linear head on the squared
        difference of normalised activations, averaged over space, summed over layers.
        """
        m = self.module
        out = []
        for s in range(0, len(ia), batch_size):
            a_idx = torch.as_tensor(ia[s:s + batch_size])
            b_idx = torch.as_tensor(ib[s:s + batch_size])
            total = 0.0
            for layer, (la, lb) in enumerate(zip(fa, fb)):
                diff = (la[a_idx] - lb[b_idx]) ** 2
                total = total + m.lins[layer](diff).mean(dim=(2, 3), keepdim=True)
            out.append(total.reshape(-1).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _load_official(net: str, weights: Weights) -> nn.Module:
    import lpips

    # pnet_rand=True: build the torchvision trunk without downloading; its weights come from the local file.
    model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    used = set()
    for name, param in model.net.named_parameters():
        _, index, kind = name.split(".")  # "slice<k>.<index in torchvision's features>.<weight|bias>"
        key = f"features.{index}.{kind}"
        if key not in state or state[key].shape != param.shape:
            raise MissingWeightsError(f"{weights.path}: not torchvision's {net} weights (no matching {key})")
        param.data.copy_(state[key])
        used.add(key)
    unused = [k for k in state if k.startswith("features.") and k not in used]
    if unused:
        raise MissingWeightsError(f"{weights.path}: unexpected trunk tensors {unused[:3]}; not torchvision's {net}")
    return model


def _load_stlpips(net: str, weights: Weights) -> nn.Module:
    stlpips = import_stlpips()
    model = stlpips.LPIPS(pretrained=False, net=net, variant="shift_tolerant", verbose=False)
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    # The package loads with strict=False; check instead that only the ``lins`` aliases of lin0..lin4 are absent.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("lins.")]
    if missing or result.unexpected_keys:
        raise MissingWeightsError(f"{weights.path}: not ST-LPIPS {net} weights (missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]})")
    return model


def load_lpips(net: str = "alex", weights_dir: str | Path | None = None, *, device: str = "cpu",
               use_stlpips: bool = True) -> LpipsModel:
    """LPIPS from local files only; ``MissingWeightsError`` naming the file when none is available."""
    weights = resolve_lpips_backbone(net, weights_dir, use_stlpips=use_stlpips)
    if weights.source == "official":
        import lpips

        module, normalize = _load_official(net, weights), lpips.normalize_tensor
    else:
        module, normalize = _load_stlpips(net, weights), import_stlpips().utils.normalize_tensor
    if not module.lpips or module.spatial:
        raise AssertionError("expected a calibrated, spatially averaged LPIPS")
    module.requires_grad_(False)
    module.eval().to(device)
    return LpipsModel(module, weights, net, device, normalize)


def sample_pairs(n: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j: all unordered pairs if there are at most ``max_pairs``, else random ones."""
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=max_pairs)
    j = (i + rng.integers(1, n, size=max_pairs)) % n
    return i, j


def _summary(d: np.ndarray) -> dict[str, float | None]:
    if len(d) == 0:
        return {"mean": None, "std": None}
    return {"mean": float(d.mean()), "std": float(d.std())}


def pixel_nearest(query: np.ndarray, reference: np.ndarray, k: int = 1,
                  chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` reference images nearest to each query image in pixel L2: (RMS distances in [0, 1], indices)."""
    ref = torch.from_numpy(reference.reshape(len(reference), -1)).to(torch.float32) / 255.0
    k = min(k, len(ref))
    dists, idx = [], []
    for s in range(0, len(query), chunk):
        q = torch.from_numpy(query[s:s + chunk].reshape(min(chunk, len(query) - s), -1)).to(torch.float32) / 255.0
        v, i = torch.topk(torch.cdist(q, ref), k, dim=1, largest=False)
        dists.append(v / np.sqrt(ref.shape[1]))
        idx.append(i)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def lpips_figures(model: LpipsModel, fake: np.ndarray, real: np.ndarray, *, max_pairs: int = 1000,
                  candidates: int = 5, seed: int = 0, batch_size: int = 64) -> dict[str, object]:
    """Both LPIPS figures for one class; the trunk runs once per image involved.

    ``diversity``: mean LPIPS over pairs of distinct generated images (see ``sample_pairs``).
    ``to_nearest_real``: mean over generated images of the smallest LPIPS to its ``candidates`` pixel-nearest
    real images.
    """
    out: dict[str, object] = {"label": model.label}
    f_fake = model.features(fake, batch_size=batch_size) if len(fake) else None
    i, j = sample_pairs(len(fake), max_pairs, seed)
    div = model.distance_from_features(f_fake, i, f_fake, j) if len(i) else np.zeros(0)
    out["diversity"] = {**_summary(div), "pairs": int(len(i))}
    if len(fake) == 0 or len(real) == 0:
        out["to_nearest_real"] = {"mean": None, "std": None, "candidates": 0}
        return out
    _, idx = pixel_nearest(fake, real, k=candidates)
    k = idx.shape[1]
    used = np.unique(idx)  # trunk only on the shortlisted real images
    f_real = model.features(real[used], batch_size=batch_size)
    pos = np.searchsorted(used, idx.reshape(-1))
    d = model.distance_from_features(f_fake, np.repeat(np.arange(len(fake)), k), f_real, pos)
    out["to_nearest_real"] = {**_summary(d.reshape(len(fake), k).min(axis=1)), "candidates": int(k)}
    return out


def lpips_diversity(model: LpipsModel, images: np.ndarray, *, max_pairs: int = 1000, seed: int = 0,
                    batch_size: int = 64) -> dict[str, float | int | None]:
    """Mean (and std) LPIPS over pairs of distinct images of one set."""
    return lpips_figures(model, images, images[:0], max_pairs=max_pairs, seed=seed, batch_size=batch_size)[
        "diversity"]


def lpips_per_class(model: LpipsModel, fake_images: np.ndarray, fake_labels: np.ndarray, real_images: np.ndarray,
                    real_labels: np.ndarray, class_names: tuple[str, ...], **kwargs) -> dict[str, dict]:
    """``lpips_figures`` for every class (real images of the same class only)."""
    return {name: lpips_figures(model, fake_images[fake_labels == k], real_images[real_labels == k], **kwargs)
            for k, name in enumerate(class_names)}
