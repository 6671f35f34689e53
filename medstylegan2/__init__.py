"""Med-StyleGAN2: class-conditional StyleGAN2 for grayscale chest X-rays (core; no Flower imports)."""

from medstylegan2.config import CLASS_NAMES, RunConfig, load_config

__all__ = ["CLASS_NAMES", "RunConfig", "load_config"]
__version__ = "0.1.0"
