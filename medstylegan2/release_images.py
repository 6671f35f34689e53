"""The images of a release: one seed per image, reproducible rendering, PNG files or npz shards.

Image ``index`` of class ``k`` has its own seed ``image_seed(seed, k, index)`` and its latent is drawn from a
generator seeded with it alone (``SEED_RULE``). Measured on this torch build (2.14.1, MKL + oneDNN, x86-64):
a sample's output of the same network depends on how many other samples share its batch (MKL GEMM uses
other kernels for row tails, oneDNN's 1x1 convolution blocks over the whole batch) and, with oneDNN, on the
thread count. So ``medstylegan2.release`` never lets the network see a batch that depends on ``--batch``: it
always runs ``render_block`` on one fixed block of ``CPU_BLOCK`` consecutive indices of one class (the last
block of a class runs whole, the surplus is discarded), with oneDNN switched off, which made the output
identical for 1 to 16 threads. On CUDA the block is ``--batch`` rounded up to a multiple of ``CPU_BLOCK``
(speed first; GPU output is not bit-identical to the CPU's anyway). PNGs are encoded without time stamps
and npz shards are written with fixed zip dates, so a rerun gives the same bytes.

The writers (``PngWriter``, ``NpzWriter``) put each image into the release folder and return
``(file, npz entry, sha256)`` for its manifest row.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from medstylegan2.trainer import float_to_images

# The CPU network always runs on blocks of this many consecutive indices of one class (see module docstring).
CPU_BLOCK = 16
# An npz shard holds at most this many bytes of images (its in-memory buffer is that large).
SHARD_BYTES = 32 * 2**20
SEED_RULE = ("image_seed = int.from_bytes(sha256(f'medstylegan2-release/{release_seed}/{class_index}/{index}')"
             "[:8], 'little') & (2**63 - 1); z = torch.randn(z_dim, generator=torch.Generator()"
             ".manual_seed(image_seed)); class indices follow the class order of the counts table, from 0.")


# ----------------------------------------------------------------------------------------------
# Seeds and images


def image_seed(release_seed: int, class_index: int, index: int) -> int:
    """The seed of one image, a function of (release seed, class, index) only (``SEED_RULE``)."""
    digest = hashlib.sha256(f"medstylegan2-release/{release_seed}/{class_index}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def latents(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """[len(seeds), z_dim] standard-normal latents, row i from its own generator seeded with ``seeds[i]``."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@contextlib.contextmanager
def _onednn_off(device: torch.device) -> Iterator[None]:
    # oneDNN's convolutions give results that depend on the thread count; the plain kernels did not.
    if device.type != "cpu":
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


@torch.no_grad()
def render_block(G: torch.nn.Module, seeds: Sequence[int], class_index: int, truncation: float,
                 device: torch.device) -> np.ndarray:
    """uint8 [n, 1, H, W] images of one class for these image seeds, in one network call (eval mode,
    constant noise, class-aware truncation)."""
    z = latents(seeds, G.z_dim).to(device)
    labels = torch.full((len(seeds),), class_index, dtype=torch.long, device=device)
    with _onednn_off(device):
        return float_to_images(G(z, labels, truncation_psi=truncation, noise_mode="const"))


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a uint8 [H, W] array; the same bytes for the same pixels (no time chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Writers: PNG files or npz shards, each returning (file, entry, sha256) per image


class PngWriter:
    def __init__(self, root: Path):
        self.root = root

    def layout(self) -> str:
        return "<class>/<index>.png"

    def write(self, class_name: str, index: int, seed: int, image: np.ndarray) -> tuple[str, str, str]:
        data = encode_png(image[0])
        rel = f"{class_name}/{index:06d}.png"
        path = self.root / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return rel, "", hashlib.sha256(data).hexdigest()

    def end_class(self) -> None:
        pass

    def files(self) -> dict[str, str]:
        return {}


class NpzWriter:
    """Per class, shards ``<class>-00000.npz``, ... of at most ``shard_bytes`` of images each."""

    def __init__(self, root: Path, resolution: int, shard_bytes: Optional[int] = None):
        self.root, self.resolution = root, resolution
        self.capacity = max(1, (shard_bytes or SHARD_BYTES) // (resolution * resolution))
        self.class_name: Optional[str] = None
        self.shard = 0
        self.images = np.empty((self.capacity, 1, resolution, resolution), np.uint8)
        self.index: list[int] = []
        self.seed: list[int] = []
        self.shard_hashes: dict[str, str] = {}

    def layout(self) -> str:
        return f"<class>-<shard>.npz, at most {self.capacity} images per shard (arrays images, index, seed)"

    def _name(self) -> str:
        return f"{self.class_name}-{self.shard:05d}.npz"

    def write(self, class_name: str, index: int, seed: int, image: np.ndarray) -> tuple[str, str, str]:
        if class_name != self.class_name:
            self.end_class()
            self.class_name, self.shard = class_name, 0
        entry = len(self.index)
        self.images[entry] = image
        self.index.append(index)
        self.seed.append(seed)
        name = self._name()
        if len(self.index) == self.capacity:
            self._flush()
        return name, str(entry), hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    def _flush(self) -> None:
        n = len(self.index)
        if n == 0:
            return
        name = self._name()
        self.shard_hashes[name] = write_npz(self.root / name, {
            "images": self.images[:n], "index": np.asarray(self.index, np.int64),
            "seed": np.asarray(self.seed, np.int64)})
        self.index, self.seed = [], []
        self.shard += 1

    def end_class(self) -> None:
        self._flush()

    def files(self) -> dict[str, str]:
        return dict(self.shard_hashes)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write arrays as an ``np.load``-able npz (deflated); returns the file's sha256.

    ``np.savez`` stamps each member with the current time; fixed zip dates make the bytes reproducible.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()
