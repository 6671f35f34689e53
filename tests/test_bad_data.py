"""Bad data at a site and bad checkpoints: converted or skipped with a count and the file named, a site
too small to train declines, and a damaged or foreign checkpoint is one ``error:`` line (exit 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medstylegan2.config import DataConfig
from medstylegan2.data import load_folder
from medstylegan2.images import MIN_SIDE

RES = 32


def _gray(path, size=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def messy_folder(tmp_path, monkeypatch):
    root = tmp_path / "site"
    for name in ("Normal", "COVID-19", "Non-COVID"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            _gray(root / name / f"ok_{i}.png", seed=i)
    normal = root / "Normal"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(normal / "colour.png")
    deep = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12 bits used of 16
    Image.fromarray(deep).save(normal / "sixteen_bit.png")
    _gray(normal / "tiny.png", size=MIN_SIDE // 2)
    _gray(normal / "whole.png", size=256)
    data = (normal / "whole.png").read_bytes()
    (normal / "truncated.png").write_bytes(data[: len(data) // 2])
    (normal / "not_an_image.png").write_bytes(b"this is a report, not a picture")
    _gray(normal / "huge.png", size=300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # huge.png: 90,000 pixels, past twice the limit
    return root


def test_messy_images_are_converted_or_skipped_with_counts_and_names(messy_folder, caplog):
    with caplog.at_level("WARNING"):
        images = load_folder(messy_folder, RES, cache_dir=None)
    kept = set(images.sources)
    assert {"Normal/colour.png", "Normal/sixteen_bit.png", "Normal/whole.png"} <= kept
    assert not kept & {"Normal/tiny.png", "Normal/truncated.png", "Normal/not_an_image.png", "Normal/huge.png"}
    assert len(images) == 9 + 3
    text = caplog.text
    assert "1 colour image(s) converted to grayscale" in text and "colour.png" in text
    assert "1 16-bit or float image(s) rescaled" in text and "sixteen_bit.png" in text
    assert "skipped 4 of 16 file(s)" in text
    for name, reason in (("tiny.png", "too small"), ("huge.png", "too large"), ("truncated.png", "unreadable"),
                         ("not_an_image.png", "unreadable")):
        assert name in text and reason in text, name
    deep = images.images[images.sources.index("Normal/sixteen_bit.png"), 0]
    assert deep.min() < 20 and deep.max() > 235  # rescaled from its own range, not clipped to white


def test_a_site_with_fewer_images_than_one_batch_declines_and_says_why(tiny_config, caplog):
    from medstylegan2.fl.aggregation import ServerOptimizer, SiteReply, aggregate_round
    from medstylegan2.fl.site_round import run_site_round
    from medstylegan2.fl.wire import encode_for_transfer, initial_weights, transferred
    from medstylegan2.phantoms import generate_phantoms

    data = generate_phantoms(1, 16, seed=0)  # 3 images; batch size 4
    weights, _ = initial_weights(tiny_config)
    received = encode_for_transfer(transferred(weights), "float32")
    with caplog.at_level("WARNING"):
        result = run_site_round(tiny_config, data.images, data.labels, received, round_num=1, site="small")
    assert result.payload == {} and result.metrics["declined"] == 1 and result.metrics["num_examples"] == 0
    assert "fewer than one batch" in caplog.text
    flat = transferred(weights)
    out = aggregate_round([SiteReply("small", result.metrics)], round_num=1, global_weights=flat, sent=flat,
                          expected_shapes={k: tuple(v.shape) for k, v in flat.items()},
                          optimizer=ServerOptimizer("fedavg"), plain_keys=set(), min_sites=1, known_sites=1)
    assert out.sites["small"]["status"] == "declined: fewer training images than one batch"
    assert out.weights is None and not out.all_declined  # not a privacy-budget stop


def _bad_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    from medstylegan2.runfolder import write_checkpoint

    hollow = write_checkpoint(tmp_path / "hollow.pt", {"config": {"model": {"resolution": 32}}})  # no weights
    return {"garbage": garbage, "foreign": foreign, "hollow": hollow}


@pytest.mark.parametrize("kind", ["garbage", "foreign", "hollow"])
def test_sample_evaluate_and_release_name_a_bad_checkpoint_in_one_line(kind, tmp_path, capsys):
    from medstylegan2.cli import main

    path = _bad_checkpoints(tmp_path)[kind]
    for argv in (["sample", str(path), "--per-class", "1", "--out", str(tmp_path / "s")],
                 ["evaluate", str(path), "--real", str(tmp_path), "--out", str(tmp_path / "e")],
                 ["release", str(path), "--per-class", "1", "--out", str(tmp_path / "r")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and str(path) in lines[0], err
        assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["garbage", "foreign", "hollow"])
def test_resume_names_a_bad_round_checkpoint_in_one_line(kind, tmp_path, capsys):
    from simulation.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bad = run_dir / "round_002.pt"
    bad.write_bytes(_bad_checkpoints(tmp_path)[kind].read_bytes())
    assert main(["--config", "configs/smoke.yaml", "--out", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in err, err
