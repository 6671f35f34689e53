"""``medstylegan2 train-local`` and ``sample`` from the command line, end to end on tiny phantoms."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medstylegan2.cli import main

TINY = ["--set", "model.channel_base=256", "--set", "model.channel_max=32", "--set", "model.z_dim=16",
        "--set", "model.w_dim=16", "--set", "model.mapping_layers=2", "--set", "model.cmap_dim=16",
        "--set", "data.phantoms_per_class=10", "--set", "data.cache_dir=null"]


def train(out, steps, *extra):
    return main(["train-local", "--data", "phantoms", "--resolution", "16", "--steps", str(steps), "--batch", "4",
                 "--out", str(out), "--grid-every", "2", "--checkpoint-every", "2", *TINY, *extra])


def test_train_local_writes_checkpoint_grids_and_a_log(tmp_path):
    assert train(tmp_path / "run", 4) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()
    grid = Image.open(run / "grid_000004.png")
    assert grid.mode == "L" and grid.size[1] > 3 * 16  # one row per class
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["images_per_second"] > 0


def test_resume_continues_to_the_requested_total_and_refuses_to_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, 2) == 0
    assert train(run, 4) == 2  # exists: must pass --resume
    assert "pass --resume" in capsys.readouterr().err
    assert train(run, 4, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 4


def test_sample_writes_class_folders_from_a_checkpoint(tmp_path):
    assert train(tmp_path / "run", 2) == 0
    out = tmp_path / "synthetic"
    assert main(["sample", str(tmp_path / "run" / "checkpoint.pt"), "--per-class", "3", "--out", str(out),
                 "--grid", "--device", "cpu"]) == 0
    for name in ("Normal", "COVID-19", "Non-COVID"):
        assert len(list((out / name).glob("*.png"))) == 3
    assert (out / "grid.png").is_file()


def test_sample_from_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["make-phantoms", "train-local", "sample"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_local_with_privacy_reports_a_growing_epsilon_and_resumes_its_accountant(tmp_path, capsys):
    run = tmp_path / "dp"
    dp = ["--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=1.0", "--set", "model.mbstd_group_size=0"]
    assert train(run, 2, *dp) == 0
    assert "privacy:" in capsys.readouterr().out
    assert train(run, 4, "--resume") == 0
    eps = [json.loads(line)["epsilon"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
