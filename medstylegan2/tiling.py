"""Tiling uint8 images into one picture, and writing it as an 8-bit grayscale PNG (atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
