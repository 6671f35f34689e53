"""``medstylegan2 export-split``: the split a run trains on and holds out, written as class folders
that read back as exactly the images the run used."""

from __future__ import annotations

from medstylegan2.cli import main
from medstylegan2.config import load_config
from medstylegan2.data import load_dataset, load_folder

SMALL = ["model.resolution=16", "data.phantoms_per_class=10", "data.heldout_fraction=0.3", "data.seed=4", "data.cache_dir=null"]


def write_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  resolution: 16\ndata:\n  phantoms_per_class: 10\n  heldout_fraction: 0.3\n"
                      "  seed: 4\n  cache_dir: null\n")
    return config


def test_the_exported_folders_hold_the_runs_training_and_heldout_images(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["export-split", "--config", str(config), "--out", str(tmp_path / "data")]) == 0
    train, heldout = load_dataset(load_config(None, SMALL).data, 16)
    for split, expected in (("train", train), ("heldout", heldout)):
        loaded = load_folder(tmp_path / "data" / split, 16)
        assert len(loaded) == len(expected)
        for k in range(3):  # same images per class (the folder is sorted by file name, so compare as sets)
            mine = {img.tobytes() for img in loaded.images[loaded.labels == k]}
            theirs = {img.tobytes() for img in expected.images[expected.labels == k]}
            assert mine == theirs
    assert "train        21 images" in capsys.readouterr().out


def test_an_existing_split_folder_is_never_added_to(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "data" / "heldout").mkdir(parents=True)
    (tmp_path / "data" / "heldout" / "old.png").write_bytes(b"x")
    assert main(["export-split", "--config", str(config), "--out", str(tmp_path / "data")]) != 0
    err = capsys.readouterr().err
    assert "heldout is not empty" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "train").exists()


def test_a_wrong_config_key_is_named(tmp_path, capsys):
    assert main(["export-split", "--set", "data.no_such_key=1", "--out", str(tmp_path / "data")]) != 0
    assert "data.no_such_key" in capsys.readouterr().err
