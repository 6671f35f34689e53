"""Sample grids: one row per class, written as an 8-bit grayscale PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medstylegan2.runfolder import atomic_write


def tile_rows(rows: list[np.ndarray], padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile rows of uint8 images ([n_i, 1, H, W] each) into one [rows*H, cols*W] image."""
    cols = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (h + padding) + padding, cols * (w + padding) + padding), pad_value, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            canvas[y:y + h, x:x + w] = img[0]
    return canvas


def save_image(array: np.ndarray, path: str | Path) -> Path:
    """A uint8 [H, W] array as an 8-bit grayscale PNG, written atomically."""
    pixels = Image.fromarray(array, mode="L")
    return atomic_write(path, lambda fh: pixels.save(fh, format="PNG"))


def save_class_grid(G: torch.nn.Module, path: str | Path, *, per_class: int = 8, seed: int = 0,
                    truncation_psi: float = 1.0, device: torch.device | str = "cpu",
                    real_rows: list[np.ndarray] | None = None) -> Path:
    """Generate ``per_class`` images of every class (fixed seed) and save one row per class.

    ``real_rows`` (uint8 [n,1,H,W] per class) are interleaved under each generated row for comparison.
    """
    from medstylegan2.sampling import generate_per_class

    fake = generate_per_class(G, per_class, seed=seed, truncation_psi=truncation_psi, device=device)
    rows = []
    for k in range(G.num_classes):
        rows.append(fake.images[fake.labels == k])
        if real_rows is not None:
            rows.append(real_rows[k][:per_class])
    return save_image(tile_rows(rows), path)
