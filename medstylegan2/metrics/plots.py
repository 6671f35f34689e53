"""Figures: per-class sample grid beside real images, closest memorization pairs, metrics over rounds.

Uses matplotlib's object API (``Figure``) with the Agg canvas, so nothing touches pyplot's global state or
needs a display.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from medstylegan2.runfolder import save_figure

log = logging.getLogger(__name__)

GAP = 2  # pixels between tiles


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _strip(images: np.ndarray, n: int, size: int) -> np.ndarray:
    """n tiles side by side (missing ones left white), GAP px apart."""
    strip = np.full((size, n * size + (n - 1) * GAP), 255, dtype=np.uint8)
    for i in range(min(n, len(images))):
        strip[:, i * (size + GAP): i * (size + GAP) + size] = images[i, 0]
    return strip


def save_sample_grid(fake_images: np.ndarray, fake_labels: np.ndarray, real_images: np.ndarray,
                     real_labels: np.ndarray, class_names: tuple[str, ...], path: str | Path, *,
                     per_class: int = 8, title: str | None = None) -> Path:
    """One row per class: ``per_class`` generated images, then as many real held-out images of that class."""
    path = Path(path)
    size = fake_images.shape[-1] if len(fake_images) else real_images.shape[-1]
    rows = []
    for k in range(len(class_names)):
        fake = _strip(fake_images[fake_labels == k], per_class, size)
        real = _strip(real_images[real_labels == k], per_class, size)
        sep = np.full((size, 4 * GAP + size // 4), 255, dtype=np.uint8)
        rows.append(np.concatenate([fake, sep, real], axis=1))
    mosaic = np.concatenate([np.concatenate([r, np.full((GAP, r.shape[1]), 255, np.uint8)]) for r in rows])[:-GAP]
    h, w = mosaic.shape
    scale = max(1.0, 96 / size) / 100 * 1.2
    fig = _figure(w * scale + 1.4, h * scale + 0.6)
    ax = fig.add_axes((1.2 / (w * scale + 1.4), 0.02, w * scale / (w * scale + 1.4), h * scale / (h * scale + 0.6)))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(size + GAP) * k + size / 2 for k in range(len(class_names))])
    ax.set_yticklabels(class_names)
    fake_width = per_class * (size + GAP) - GAP
    real_start = fake_width + sep.shape[1]
    for x, text in ((fake_width / 2, "generated"), (real_start + fake_width / 2, "real (held-out)")):
        ax.text(x, -size * 0.08, text, ha="center", va="bottom", fontsize=9)
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    return save_figure(fig, path)


def save_memorization_pairs(fake_images: np.ndarray, train_images: np.ndarray, pairs: list[dict],
                            path: str | Path, *, pairs_per_row: int = 4) -> Path:
    """Each closest pair as [generated | nearest training image], titled with classes and distances."""
    path = Path(path)
    n = max(1, len(pairs))
    cols = min(pairs_per_row, n)
    rows = math.ceil(n / cols)
    fig = _figure(2.6 * cols, 1.6 * rows + 0.4)
    fig.suptitle("Generated image (left) and its nearest training image (right), closest pairs first", fontsize=9)
    for p_i, pair in enumerate(pairs):
        g, t = pair["generated_index"], pair["train_index"]
        tile = np.concatenate([fake_images[g, 0], np.full((fake_images.shape[-2], GAP), 255, np.uint8),
                               train_images[t, 0]], axis=1)
        ax = fig.add_subplot(rows, cols, p_i + 1)
        ax.imshow(tile, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_axis_off()
        dom = pair.get("domain_distance")
        ax.set_title(f"{pair['generated_class']} / {pair['train_class']}\npixel RMS {pair['pixel_distance']:.4f}"
                     + ("" if dom is None else f", domain {dom:.3f}"), fontsize=7)
    return save_figure(fig, path)


_ROUND_FILE = re.compile(r"round_(\d+)\.json$")

# (panel title, result key, fallback key when the first is absent in every round, metric name for errors)
PANELS = (
    ("FD-domain", "fd_domain", None, "fd_domain"),
    ("FID (Inception)", "fid", None, "fid"),
    ("KID (Inception)", "kid", "kid_domain", "kid"),
    ("LPIPS diversity", "lpips_diversity", None, "lpips"),
)


def read_rounds(run_dir: str | Path) -> list[dict]:
    """All ``<run_dir>/eval/round_*.json`` records, sorted by round."""
    records = []
    for f in sorted(Path(run_dir, "eval").glob("round_*.json")):
        if not _ROUND_FILE.search(f.name):
            continue
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable %s: %s", f, exc)
    return sorted(records, key=lambda r: r.get("round", 0))


def plot_metrics(run_dir: str | Path, out_path: str | Path | None = None) -> Path | None:
    """``<run_dir>/metrics.png``: per-class (and overall) FD-domain, FID, KID and LPIPS diversity vs round."""
    from matplotlib.ticker import MaxNLocator

    records = read_rounds(run_dir)
    if not records:
        return None
    out_path = Path(out_path) if out_path is not None else Path(run_dir) / "metrics.png"
    class_names = list(records[-1].get("class_names", []))
    fig = _figure(4.2 * len(PANELS), 3.4)
    for p_i, (title, key, fallback, metric) in enumerate(PANELS):
        ax = fig.add_subplot(1, len(PANELS), p_i + 1)
        used_key = key
        if fallback and not any(r.get("overall", {}).get(key) is not None for r in records):
            used_key, title, metric = fallback, f"{title.split(' ')[0]}-domain", fallback
        drawn = False
        for name in class_names + ["overall"]:
            xs, ys = [], []
            for r in records:
                src = r.get("overall", {}) if name == "overall" else r.get("per_class", {}).get(name, {})
                v = src.get(used_key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs.append(r.get("round", 0))
                    ys.append(v)
            if xs:
                style = dict(color="black", linestyle="--") if name == "overall" else {}
                ax.plot(xs, ys, marker="o", markersize=3, label=name, **style)
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7)
            networks = records[-1].get("feature_networks", {})
            label = {"fid": networks.get("inception"), "kid": networks.get("inception"),
                     "lpips_diversity": networks.get("lpips")}.get(used_key)
            if label:
                ax.text(0.01, 0.01, label, transform=ax.transAxes, fontsize=5, va="bottom")
        else:
            last = records[-1]
            requested = metric in last.get("metrics_requested", [metric])
            reason = last.get("errors", {}).get(metric) or ("not computed" if requested else
                                                            f"'{metric}' not in metrics.metrics")
            ax.text(0.5, 0.5, "\n".join(_wrap(reason, 40)[:6]), transform=ax.transAxes, ha="center", va="center",
                    fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, out_path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in str(text).split():
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines
