"""A small CNN chest X-ray classifier: the project's own domain feature network.

It serves three purposes in evaluation (see ``medstylegan2/metrics``):

- its penultimate features define the "FD-domain" space, in which torch-fidelity computes Frechet
  distance, KID and precision/recall without any downloaded weights;
- the memorization audit measures nearest-neighbour distances in that space;
- trained on synthetic images only and tested on real held-out images it measures downstream utility.

The network uses GroupNorm (no batch statistics), so train and eval mode compute the same function and a
sample's features never depend on the other images in its batch. Inputs of another size than
``resolution`` are resized (area interpolation) before the first convolution.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medstylegan2.errors import CheckpointError
from medstylegan2.runfolder import atomic_torch_save

log = logging.getLogger(__name__)

_FORMAT = "medstylegan2-xray-classifier"
_FORMAT_VERSION = 1


def _conv_block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.SiLU(),
    )


class XrayClassifier(nn.Module):
    """Four stride-2 3x3 conv blocks (GroupNorm, SiLU), global average pooling, a feature layer, a linear head.

    ``features(x)`` maps float images in [-1, 1] of shape [N, 1, H, W] to [N, feature_dim];
    ``forward(x)`` returns class logits [N, num_classes].
    """

    def __init__(self, num_classes: int = 3, resolution: int = 64, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16, got {resolution}")
        self.num_classes = num_classes
        self.resolution = resolution
        self.width = width
        self.feature_dim = feature_dim
        w = width
        groups = 8
        self.body = nn.Sequential(
            _conv_block(1, w, stride=2, groups=groups),
            _conv_block(w, 2 * w, stride=2, groups=groups),
            _conv_block(2 * w, 2 * w, stride=2, groups=groups),
            _conv_block(2 * w, 2 * w, stride=2, groups=groups),
        )
        self.feature = nn.Linear(2 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict[str, int]:
        return {"num_classes": self.num_classes, "resolution": self.resolution, "width": self.width,
                "feature_dim": self.feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grayscale images [N, 1, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        h = self.body(x)
        h = h.mean(dim=(2, 3))
        return F.silu(self.feature(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_float(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> float32 in [-1, 1]."""
    t = torch.as_tensor(images_uint8)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {t.dtype}")
    return t.to(torch.float32) / 127.5 - 1.0


def _check_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64)
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, 1, H, W], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError("no images to train or evaluate on")
    return images, labels


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer shifts (reflect padding, up to ``max_shift`` px) and a mild brightness/contrast jitter.

    No horizontal flips: the heart sits on the patient's left, and a flip is not a plausible X-ray.
    """
    n, _, h, w = x.shape
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="reflect")
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
        cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
        idx_n = torch.arange(n)[:, None, None]
        x = padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    contrast = 1.0 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    brightness = 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return (x * contrast + brightness).clamp(-1.0, 1.0)


def train_classifier(images_uint8: np.ndarray, labels: np.ndarray, *, steps: int = 300, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, device: str = "cpu", augment: bool = True,
                     num_classes: int = 3, resolution: int | None = None, width: int = 32,
                     feature_dim: int = 128) -> XrayClassifier:
    """Train an ``XrayClassifier`` with Adam on class-balanced minibatches; deterministic for a given seed.

    ``resolution`` defaults to the images' own size. Batches draw every class equally often (each image is
    sampled with probability proportional to 1 / its class count), so a rare class is not ignored.
    Returns the model in eval mode on ``device``.
    """
    images, labels = _check_images(images_uint8, labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    res = int(resolution or images.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XrayClassifier(num_classes=num_classes, resolution=res, width=width, feature_dim=feature_dim)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))

    x_all = to_float(images)
    y_all = torch.as_tensor(labels)
    counts = torch.bincount(y_all, minlength=num_classes).to(torch.float64)
    weights = (1.0 / counts.clamp(min=1))[y_all]
    max_shift = max(1, res // 16) if augment else 0
    for step in range(steps):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        x = x_all[idx]
        if x.shape[-1] != res:
            x = F.interpolate(x, size=(res, res), mode="area")
        if augment:
            x = _augment(x, gen, max_shift)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits, y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.debug("classifier step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval()


@torch.no_grad()
def _batched(fn, model: XrayClassifier, images_uint8: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    """``fn(float batch)`` over uint8 images in batches, in eval mode, results on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    return [fn(to_float(images_uint8[i:i + batch_size]).to(device)).cpu()
            for i in range(0, len(images_uint8), batch_size)]


def predict(model: XrayClassifier, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class predictions (int64 [N]) for uint8 images [N, 1, H, W]."""
    out = _batched(lambda x: model(x).argmax(1), model, images_uint8, batch_size)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def extract_features(model: XrayClassifier, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Domain features (float32 [N, feature_dim]) for uint8 images [N, 1, H, W]."""
    out = _batched(model.features, model, images_uint8, batch_size)
    if not out:
        return np.zeros((0, model.feature_dim), dtype=np.float32)
    return torch.cat(out).numpy()


def classification_scores(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in ``labels``, per-class recall and the confusion matrix.

    A class absent from ``labels`` has recall ``None`` and is left out of the macro average.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    recalls: list[float | None] = []
    f1s = []
    for k in range(num_classes):
        tp = confusion[k, k]
        support = confusion[k].sum()
        predicted = confusion[:, k].sum()
        if support == 0:
            recalls.append(None)
            continue
        recall = tp / support
        precision = tp / predicted if predicted else 0.0
        recalls.append(float(recall))
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return {
        "accuracy": float((labels == preds).mean()) if len(labels) else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "per_class_recall": recalls,
        "confusion": confusion.tolist(),
    }


def evaluate_classifier(model: XrayClassifier, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``{"accuracy", "macro_f1", "per_class_recall", "confusion"}`` of ``model`` on uint8 images."""
    images, labels = _check_images(images, labels)
    return classification_scores(labels, predict(model, images), model.num_classes)


def save_classifier(model: XrayClassifier, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return atomic_torch_save(path, payload)


def load_classifier(path: str | Path, device: str = "cpu") -> XrayClassifier:
    """Load a classifier written by ``save_classifier``; ``CheckpointError`` if missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{path}: cannot read classifier file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a medstylegan2 X-ray classifier file")
    try:
        model = XrayClassifier(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: classifier weights do not fit the model ({exc})") from exc
    return model.to(device).eval()


def classifier_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` dict stored beside the weights (empty if none)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    return dict(payload.get("meta", {}))
