"""The built-in phantom data set: format, reproducibility, X-ray anatomy, class signal, CLI, separability."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medstylegan2.config import CLASS_NAMES
from medstylegan2.phantoms import (COVID, NON_COVID, NORMAL, generate_phantoms, make_phantom, phantom_rng,
                                   render_phantom)


def _lung_halves(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the image-left and image-right lung fields."""
    inside = lungs > 0.5
    left, right = inside.copy(), inside.copy()
    half = lungs.shape[1] // 2
    left[:, half:] = False
    right[:, :half] = False
    return left, right


def _paired(label: int, index: int, resolution: int = 64, seed: int = 11):
    """A diseased phantom and the same patient on the same film without disease.

    The generator draws anatomy and exposure before the disease, so one generator state gives a
    counterfactual pair whose difference is the lesion (plus film grain).
    """
    normal = render_phantom(NORMAL, resolution, phantom_rng(seed, NORMAL, index))
    sick = render_phantom(label, resolution, phantom_rng(seed, NORMAL, index))
    return normal, sick, sick.image.astype(np.float64) - normal.image.astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Format and reproducibility


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_phantom_is_a_square_uint8_image_at_every_resolution(resolution):
    for label in range(len(CLASS_NAMES)):
        image = make_phantom(label, resolution, phantom_rng(0, label, 0))
        assert image.shape == (resolution, resolution)
        assert image.dtype == np.uint8
        assert 20 < image.std()  # a picture, not a flat field


def test_generated_set_is_balanced_in_class_order_with_the_shared_format():
    images = generate_phantoms(per_class=4, resolution=32, seed=0)
    assert images.images.shape == (12, 1, 32, 32) and images.images.dtype == np.uint8
    assert images.labels.dtype == np.int64
    assert images.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert images.class_counts() == [4, 4, 4]
    assert images.class_names == CLASS_NAMES
    assert len(set(images.sources)) == 12


def test_same_seed_gives_identical_images_and_other_seeds_differ():
    a = generate_phantoms(per_class=3, resolution=32, seed=5)
    b = generate_phantoms(per_class=3, resolution=32, seed=5)
    c = generate_phantoms(per_class=3, resolution=32, seed=6)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    # different images within one set, too
    assert len({img.tobytes() for img in a.images}) == len(a)


def test_each_image_depends_only_on_seed_class_and_index():
    small = generate_phantoms(per_class=2, resolution=32, seed=3)
    large = generate_phantoms(per_class=5, resolution=32, seed=3)
    for k in range(len(CLASS_NAMES)):
        assert np.array_equal(small.of_class(k).images, large.of_class(k).images[:2])


def test_a_seed_gives_the_same_patient_at_every_resolution():
    coarse = make_phantom(COVID, 64, phantom_rng(2, COVID, 0)).astype(np.float64)
    fine = make_phantom(COVID, 256, phantom_rng(2, COVID, 0)).astype(np.float64)
    fine_down = fine.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.corrcoef(coarse.ravel(), fine_down.ravel())[0, 1] > 0.95


def test_rejects_unknown_labels_and_tiny_resolutions():
    with pytest.raises(ValueError, match="label"):
        make_phantom(3, 64, phantom_rng(0, 0, 0))
    with pytest.raises(ValueError, match="resolution"):
        make_phantom(0, 4, phantom_rng(0, 0, 0))
    with pytest.raises(ValueError, match="per_class"):
        generate_phantoms(per_class=0, resolution=32)


# ----------------------------------------------------------------------------------------------
# It looks like a PA chest X-ray


def test_background_is_dark_lungs_are_dark_and_the_mediastinum_is_bright():
    for i in range(10):
        p = render_phantom(NORMAL, 64, phantom_rng(1, NORMAL, i))
        img = p.image.astype(np.float64)
        lungs = p.lungs > 0.5
        # Air outside the body beside the chest wall; a shifted patient may touch one edge.
        edges = min(img[25:50, :3].mean(), img[25:50, -3:].mean())
        mediastinum = img[20:36, 30:34]
        assert edges < 60
        assert img[lungs].mean() < mediastinum.mean() - 40
        assert 0.12 < lungs.mean() < 0.45  # two lung fields of a plausible size
        left, right = _lung_halves(p.lungs)
        assert left.sum() > 0.25 * lungs.sum() and right.sum() > 0.25 * lungs.sum()


def test_heart_takes_room_from_the_left_lung_base():
    # The heart bulges into the patient's left lung (image right) above the diaphragm.
    for i in range(12):
        p = render_phantom(NORMAL, 64, phantom_rng(4, NORMAL, i))
        left, right = _lung_halves(p.lungs)
        base = slice(32, 50)
        assert right[base].sum() < left[base].sum(), i


# ----------------------------------------------------------------------------------------------
# Class signal


def test_diseased_lung_fields_are_brighter_than_the_same_patient_without_disease():
    for label in (COVID, NON_COVID):
        for i in range(12):
            normal, sick, diff = _paired(label, i)
            lungs = normal.lungs > 0.5
            assert diff[lungs].mean() > 3.0, (CLASS_NAMES[label], i)
            assert diff[~lungs & (normal.lungs < 0.01)].std() < 12  # outside the lungs: grain only


def test_covid_opacities_are_bilateral_and_consolidation_is_one_sided():
    for i in range(12):
        normal, _, diff = _paired(COVID, i)
        left, right = _lung_halves(normal.lungs)
        assert diff[left].mean() > 3.0 and diff[right].mean() > 3.0, i

        normal, _, diff = _paired(NON_COVID, i)
        left, right = _lung_halves(normal.lungs)
        sides = sorted([diff[left].mean(), diff[right].mean()])
        assert sides[1] > 8.0 and abs(sides[0]) < 1.5, (i, sides)


def test_covid_opacities_lie_in_the_lower_lateral_lung_zones():
    lower = lateral = 0
    for i in range(12):
        normal, _, diff = _paired(COVID, i)
        weight = np.clip(diff, 0, None) * (normal.lungs > 0.5)
        rows, cols = np.indices(weight.shape)
        centre_row = (rows * weight).sum() / weight.sum()
        lung_rows = rows[normal.lungs > 0.5]
        lower += int(centre_row > np.median(lung_rows))
        # distance from the midline, relative to where the lungs reach
        reach = np.abs(cols[normal.lungs > 0.5] - 31.5)
        spread = (np.abs(cols - 31.5) * weight).sum() / weight.sum()
        lateral += int(spread > np.median(reach))
    assert lower >= 11 and lateral >= 11


def test_consolidation_is_denser_than_ground_glass_yet_not_saturated():
    ggo, consolidation, saturated = [], [], []
    for i in range(12):
        for label, store in ((COVID, ggo), (NON_COVID, consolidation)):
            normal, sick, diff = _paired(label, i)
            lesion = (sick.lesion > 0.3) & (normal.lungs > 0.5)
            store.append(diff[lesion].mean())
            saturated.append((sick.image[lesion] >= 250).mean())
    assert 10 < np.mean(ggo) < np.mean(consolidation)
    assert np.mean(saturated) < 0.02  # visible at 64 px, but not blown-out white blobs


# ----------------------------------------------------------------------------------------------
# CLI and separability


def test_make_phantoms_cli_writes_grayscale_pngs_per_class(tmp_path, capsys):
    from medstylegan2.cli import main

    out = tmp_path / "phantoms"
    rc = main(["make-phantoms", "--out", str(out), "--per-class", "3", "--resolution", "32", "--seed", "1"])
    assert rc == 0
    for name in CLASS_NAMES:
        files = sorted((out / name).glob("*.png"))
        assert len(files) == 3, name
        with Image.open(files[0]) as img:
            assert img.mode == "L" and img.size == (32, 32)
    printed = capsys.readouterr().out
    assert str(out) in printed and "9" in printed
    expected = generate_phantoms(per_class=3, resolution=32, seed=1).of_class(1).images[0, 0]
    with Image.open(out / "COVID-19" / "COVID-19_00000.png") as img:
        assert np.array_equal(np.asarray(img), expected)


def test_make_phantoms_cli_rejects_a_resolution_below_8(tmp_path, capsys):
    from medstylegan2.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["make-phantoms", "--out", str(tmp_path), "--resolution", "4"])
    assert exc.value.code == 2
    assert ">= 8" in capsys.readouterr().err


def test_phantom_classes_are_separable_by_a_small_classifier():
    """The issue's bar: > 90 % accuracy on held-out phantoms after a short CPU training."""
    import torch

    from medstylegan2.classifier import evaluate_classifier, train_classifier

    train = generate_phantoms(per_class=200, resolution=32, seed=0)
    test = generate_phantoms(per_class=60, resolution=32, seed=1)
    # Convolutions on 32-px images are too small to share between threads: one thread is as fast
    # alone and several times faster when other jobs compete for the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_classifier(train.images, train.labels, steps=150, batch_size=32, lr=2e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    scores = evaluate_classifier(model, test.images, test.labels)
    assert scores["accuracy"] > 0.9, scores
