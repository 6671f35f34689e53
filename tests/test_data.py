"""Image sets and loaders: the shared format, class folders, COVID-QU-Ex layouts, cache, held-out split."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medstylegan2.config import CLASS_NAMES, DataConfig
from medstylegan2.data import (class_summary, load_covidqu, load_dataset, load_folder, resolve_data_argument,
                               split_heldout)
from medstylegan2.errors import DataError, UserError
from medstylegan2.images import ImageSet, write_image_folder

COVIDQU_NESTED = ("Lung Segmentation Data", "Lung Segmentation Data")


def _image(value: int, size: int = 24) -> Image.Image:
    """A grayscale image whose mean brightness encodes ``value``, with some structure to resize."""
    arr = np.full((size, size), value, dtype=np.uint8)
    arr[: size // 4] = 255 - value
    return Image.fromarray(arr, mode="L")


def _class_tree(root: Path, per_class: int = 3, size: int = 24) -> Path:
    for k, name in enumerate(CLASS_NAMES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            _image(40 * k + 10 * i, size).save(folder / f"img_{i:03d}.png")
    return root


def _covidqu_tree(root: Path, nesting: tuple[str, ...] = COVIDQU_NESTED,
                  per_split: dict[str, int] | None = None) -> Path:
    """The Kaggle layout in miniature: <nesting>/<split>/<class>/{images,lung masks}/*.png."""
    per_split = per_split or {"Train": 4, "Val": 2, "Test": 2}
    base = root.joinpath(*nesting)
    for split, n in per_split.items():
        for k, name in enumerate(CLASS_NAMES):
            images = base / split / name / "images"
            masks = base / split / name / "lung masks"
            images.mkdir(parents=True)
            masks.mkdir(parents=True)
            for i in range(n):
                _image(30 * k + 5 * i).save(images / f"{name.lower()}_{split.lower()}_{i}.png")
                # Masks are pure white: any of them leaking into the images would show.
                Image.fromarray(np.full((24, 24), 255, np.uint8), mode="L").save(masks / f"mask_{i}.png")
    return root


def _touch_later(path: Path) -> None:
    """Make a file's mtime differ from before even on coarse-grained file systems."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


# ----------------------------------------------------------------------------------------------
# ImageSet


def test_image_set_validates_dtype_shape_and_labels():
    images = np.zeros((4, 1, 8, 8), np.uint8)
    ImageSet(images=images, labels=np.array([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="uint8"):
        ImageSet(images=images.astype(np.float32), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        ImageSet(images=np.zeros((4, 3, 8, 8), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(ValueError, match="labels must have shape"):
        ImageSet(images=images, labels=np.zeros(3, int))
    with pytest.raises(ValueError, match="labels must be in"):
        ImageSet(images=images, labels=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="sources"):
        ImageSet(images=images, labels=np.zeros(4, int), sources=["a"])


def test_image_set_subset_of_class_and_counts_keep_labels_and_sources_aligned():
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((1, 1, 4, 4), np.uint8)
    s = ImageSet(images=images, labels=np.array([2, 0, 2, 1, 2]), sources=list("abcde"))
    assert len(s) == 5 and s.resolution == 4
    assert s.labels.dtype == np.int64
    assert s.class_counts() == [1, 1, 3]
    covid_free = s.of_class(2)
    assert covid_free.sources == ["a", "c", "e"] and covid_free.images[:, 0, 0, 0].tolist() == [0, 2, 4]
    picked = s.subset([3, 1])
    assert picked.labels.tolist() == [1, 0] and picked.sources == ["d", "b"]
    both = ImageSet.concatenate([picked, covid_free])
    assert len(both) == 5 and both.sources == ["d", "b", "a", "c", "e"]
    assert class_summary(s) == "Normal 1, COVID-19 1, Non-COVID 3"


# ----------------------------------------------------------------------------------------------
# Class folders


def test_written_folder_loads_back_identically(tmp_path):
    rng = np.random.default_rng(0)
    original = ImageSet(images=rng.integers(0, 256, (7, 1, 16, 16), dtype=np.uint8),
                        labels=np.array([0, 0, 1, 1, 1, 2, 2]))
    out = write_image_folder(original, tmp_path / "out")
    assert sorted(p.name for p in (out / "COVID-19").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    loaded = load_folder(out, 16)
    assert loaded.class_counts() == [2, 3, 2]
    for k in range(3):
        assert np.array_equal(loaded.of_class(k).images, original.of_class(k).images)


def test_folder_loader_resizes_sorts_and_matches_class_names_case_insensitively(tmp_path):
    root = tmp_path / "data"
    for k, name in enumerate(["normal", "covid-19", "NON-COVID"]):
        (root / name).mkdir(parents=True)
        _image(100 + k, 40).save(root / name / "b.png")
        _image(10 + k, 40).convert("RGB").save(root / name / "a.JPG", quality=95)
    images = load_folder(root, 16)
    assert images.images.shape == (6, 1, 16, 16) and images.images.dtype == np.uint8
    assert images.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert images.sources[:2] == ["normal/a.JPG", "normal/b.png"]
    assert images.images[1, 0, 12:].mean() == pytest.approx(100, abs=1)


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    root = _class_tree(tmp_path / "data", per_class=3)
    bad = root / "COVID-19" / "img_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with caplog.at_level(logging.WARNING, logger="medstylegan2.data"):
        images = load_folder(root, 16)
    assert images.class_counts() == [3, 2, 3]
    assert "COVID-19/img_001.png" not in images.sources
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(bad) in m for m in messages), messages
    assert any(f"skipped 1 of 9 file(s) under {root.resolve()}" in m for m in messages), messages
    assert any("1 unreadable or corrupt file: COVID-19/img_001.png" in m for m in messages), messages


def test_class_whose_images_are_all_unreadable_is_an_error(tmp_path):
    root = _class_tree(tmp_path / "data", per_class=1)
    (root / "Normal" / "img_000.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="Normal"):
        load_folder(root, 16)


def test_missing_class_folder_error_names_the_path(tmp_path):
    root = _class_tree(tmp_path / "data")
    for f in (root / "Non-COVID").iterdir():
        f.unlink()
    (root / "Non-COVID").rmdir()
    with pytest.raises(DataError) as exc:
        load_folder(root, 16)
    assert str(root.resolve() / "Non-COVID") in str(exc.value)
    assert isinstance(exc.value, UserError)


def test_empty_class_folder_error_names_the_path_and_what_was_expected(tmp_path):
    root = _class_tree(tmp_path / "data")
    for f in (root / "Normal").iterdir():
        f.unlink()
    (root / "Normal" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as exc:
        load_folder(root, 16)
    assert str(root.resolve() / "Normal") in str(exc.value) and ".png" in str(exc.value)


def test_missing_root_error_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_folder(missing, 16)
    with pytest.raises(DataError, match=str(missing)):
        load_covidqu(missing, 16)


def test_max_per_class_keeps_an_evenly_spread_subset(tmp_path):
    root = _class_tree(tmp_path / "data", per_class=5)
    images = load_folder(root, 16, max_per_class=3)
    assert images.class_counts() == [3, 3, 3]
    assert images.of_class(0).sources == ["Normal/img_000.png", "Normal/img_002.png", "Normal/img_004.png"]


# ----------------------------------------------------------------------------------------------
# COVID-QU-Ex


@pytest.mark.parametrize("nesting", [COVIDQU_NESTED, (), ("Infection Segmentation Data",) * 2],
                         ids=["kaggle-nested", "plain", "infection-nested"])
def test_covidqu_layout_is_found_and_masks_are_ignored(tmp_path, nesting):
    root = _covidqu_tree(tmp_path / "covidqu", nesting=nesting)
    train = load_covidqu(root, 16)  # Train + Val by default
    assert train.class_counts() == [6, 6, 6]
    assert all("/images/" in s and "mask" not in s for s in train.sources)
    assert {s.split("/")[0] for s in train.sources} == {"Train", "Val"}
    assert (train.images < 255).any(axis=(1, 2, 3)).all()  # no all-white mask slipped in
    test = load_covidqu(root, 16, splits=("Test",))
    assert test.class_counts() == [2, 2, 2]


def test_covidqu_missing_class_folder_error_names_the_path(tmp_path):
    root = _covidqu_tree(tmp_path / "covidqu")
    victim = root.joinpath(*COVIDQU_NESTED, "Val", "COVID-19")
    for sub in victim.iterdir():
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    victim.rmdir()
    with pytest.raises(DataError) as exc:
        load_covidqu(root, 16)
    assert str(victim.resolve()) in str(exc.value)


def test_covidqu_root_without_splits_is_an_error_describing_the_layout(tmp_path):
    root = _class_tree(tmp_path / "flat")
    with pytest.raises(DataError, match="Train,Val,Test"):
        load_covidqu(root, 16)


def test_covidqu_dataset_trains_on_train_and_val_and_holds_out_its_own_test_split(tmp_path):
    root = _covidqu_tree(tmp_path / "covidqu")
    cfg = DataConfig(source="covidqu", root=str(root), cache_dir=None)
    train, heldout = load_dataset(cfg, 16)
    assert train.class_counts() == [6, 6, 6] and heldout.class_counts() == [2, 2, 2]
    assert all(s.startswith(("Train/", "Val/")) for s in train.sources)
    assert all(s.startswith("Test/") for s in heldout.sources)
    assert not set(train.sources) & set(heldout.sources)


# ----------------------------------------------------------------------------------------------
# Cache


def test_second_load_reads_the_cache_and_a_changed_tree_rebuilds_it(tmp_path, caplog, monkeypatch):
    import medstylegan2.ingest as ingest

    root = _class_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_folder(root, 16, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decoding(path, *args):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(ingest, "decode_file", no_decoding)
    with caplog.at_level(logging.INFO, logger="medstylegan2.data"):
        second = load_folder(root, 16, cache_dir=cache)
    assert any("from cache" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert np.array_equal(first.images, second.images) and first.sources == second.sources
    assert np.array_equal(first.labels, second.labels)
    monkeypatch.undo()

    changed = root / "Normal" / "img_000.png"
    _image(222).save(changed)
    _touch_later(changed)
    third = load_folder(root, 16, cache_dir=cache)
    assert not np.array_equal(third.images, first.images)
    assert third.images[0, 0, 12:].mean() == pytest.approx(222, abs=1)
    # the stale cache was replaced, not kept beside the new one
    assert len(list(cache.glob("*.npz"))) == 1 and list(cache.glob("*.npz")) != files


def test_cache_is_keyed_by_resolution_and_split(tmp_path):
    root = _covidqu_tree(tmp_path / "covidqu")
    cache = tmp_path / "cache"
    a = load_covidqu(root, 16, cache_dir=cache)
    b = load_covidqu(root, 8, cache_dir=cache)
    c = load_covidqu(root, 16, splits=("Test",), cache_dir=cache)
    assert a.resolution == 16 and b.resolution == 8 and len(c) == 6
    assert len(list(cache.glob("*.npz"))) == 3


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    root = _class_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    load_folder(root, 16, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    path.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="medstylegan2.data"):
        images = load_folder(root, 16, cache_dir=cache)
    assert len(images) == 9
    assert any("unreadable cache" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Held-out split and load_dataset


def _labelled(counts: list[int]) -> ImageSet:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.zeros((len(labels), 1, 4, 4), np.uint8)
    return ImageSet(images=images, labels=labels, sources=[f"img{i}" for i in range(len(labels))])


def test_heldout_split_is_stratified_disjoint_and_deterministic():
    images = _labelled([50, 30, 20])
    train, held = split_heldout(images, 0.2, seed=3)
    assert held.class_counts() == [10, 6, 4]
    assert train.class_counts() == [40, 24, 16]
    assert not set(train.sources) & set(held.sources)
    assert sorted(train.sources + held.sources) == sorted(images.sources)
    again, _ = split_heldout(images, 0.2, seed=3)
    other, _ = split_heldout(images, 0.2, seed=4)
    assert again.sources == train.sources and other.sources != train.sources


def test_heldout_split_leaves_every_class_a_training_image():
    train, held = split_heldout(_labelled([1, 2, 5]), 0.9, seed=0)
    assert train.class_counts() == [1, 1, 1]
    assert held.class_counts() == [0, 1, 4]
    train, held = split_heldout(_labelled([3, 3, 3]), 0.0, seed=0)
    assert len(held) == 0 and len(train) == 9
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(_labelled([3, 3, 3]), 1.0, seed=0)


def test_phantom_dataset_holds_out_images_never_seen_in_training():
    cfg = DataConfig(source="phantoms", phantoms_per_class=10, heldout_fraction=0.2, seed=1)
    train, held = load_dataset(cfg, 32)
    assert train.class_counts() == [8, 8, 8] and held.class_counts() == [2, 2, 2]
    assert not {img.tobytes() for img in train.images} & {img.tobytes() for img in held.images}
    again, _ = load_dataset(cfg, 32)
    assert np.array_equal(again.images, train.images)


def test_folder_dataset_is_loaded_and_split(tmp_path):
    root = _class_tree(tmp_path / "data", per_class=5)
    train, held = load_dataset(DataConfig(source="folder", root=str(root), heldout_fraction=0.2, cache_dir=None), 16)
    assert train.class_counts() == [4, 4, 4] and held.class_counts() == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# --data argument


def test_data_argument_tells_phantoms_covidqu_and_class_folders_apart(tmp_path):
    train, held = resolve_data_argument("phantoms", 32, phantoms_per_class=5, heldout_fraction=0.2)
    assert train.class_counts() == [4, 4, 4] and held.class_counts() == [1, 1, 1]

    covidqu = _covidqu_tree(tmp_path / "covidqu")
    train, held = resolve_data_argument(str(covidqu), 16, cache_dir=str(tmp_path / "cache"))
    assert train.class_counts() == [6, 6, 6] and all(s.startswith("Test/") for s in held.sources)

    folder = _class_tree(tmp_path / "folder", per_class=5)
    train, held = resolve_data_argument(str(folder), 16, cache_dir=None, heldout_fraction=0.2)
    assert train.class_counts() == [4, 4, 4] and held.class_counts() == [1, 1, 1]


def test_data_argument_naming_a_missing_folder_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match="phantoms"):
        resolve_data_argument(str(tmp_path / "typo"), 16)


def test_phantoms_are_rendered_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from medstylegan2 import phantoms

    cfg = DataConfig(source="phantoms", phantoms_per_class=4, heldout_fraction=0.25, cache_dir=str(tmp_path))
    first_train, first_held = load_dataset(cfg, 16)
    assert len(list(tmp_path.glob("phantoms-16px-4-seed0-*.npz"))) == 1

    def no_rendering(*args, **kwargs):
        raise AssertionError("phantoms rendered again despite the cache")

    monkeypatch.setattr(phantoms, "generate_phantoms", no_rendering)
    train, held = load_dataset(cfg, 16)
    assert np.array_equal(train.images, first_train.images) and np.array_equal(held.labels, first_held.labels)
    assert train.sources == first_train.sources
