"""``medstylegan2 release``: counts, hashes, byte-identical reruns, safe folders, the card, the memorization filter."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medstylegan2.release as release
import medstylegan2.release_folder as release_folder
import medstylegan2.release_images as release_images
from medstylegan2.cli import main
from medstylegan2.config import CLASS_NAMES
from medstylegan2.images import ImageSet, write_image_folder
from medstylegan2.phantoms import generate_phantoms
from medstylegan2.release import ReleaseOptions, image_seed, write_release
from medstylegan2.trainer import SiteTrainer


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A train-local style checkpoint of a 16-px model (no DP; untrained: the release does not care)."""
    from medstylegan2.config import load_config

    cfg = load_config(None, ["model.resolution=16", "model.channel_base=256", "model.channel_max=32",
                             "model.z_dim=16", "model.w_dim=16", "model.mapping_layers=2", "model.cmap_dim=16",
                             "train.batch_size=4", "train.r1_interval=2", "train.pl_interval=2"])
    data = generate_phantoms(6, 16, seed=0)
    trainer = SiteTrainer(cfg, data.images, data.labels, device="cpu")
    # Noise strengths start at 0; make the per-layer noise matter as it does in a trained model.
    for module in trainer.G_ema.modules():
        if hasattr(module, "noise_strength"):
            module.noise_strength.data.fill_(0.1)
    return trainer.save_checkpoint(tmp_path_factory.mktemp("local") / "checkpoint.pt")


def federated_checkpoint(local: Path, run_dir: Path, *, dp: bool, round_num: int = 2) -> Path:
    """A round checkpoint as the server writes it (``round``, ``federation``), optionally with DP on."""
    state = torch.load(local, map_location="cpu", weights_only=False)
    state["round"] = round_num
    state["federation"] = {"run_token": "t", "optimizer": {}, "stopped": False, "privacy": {},
                           "sites": {"hospital-a": 30, "hospital-b": 25}}
    if dp:
        state["config"]["privacy"].update(enabled=True, noise_multiplier=1.1, max_grad_norm=0.25)
        state["config"]["model"]["mbstd_group_size"] = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"round_{round_num:03d}.pt"
    torch.save(state, path)
    return path


def privacy_record(round_num: int, epsilon: float, **extra) -> dict:
    return {"round": round_num, "epsilon": epsilon, "delta": 1e-5, "sample_rate": 0.1, "steps": 40 * round_num,
            "noise_multiplier": 1.1, "max_grad_norm": 0.25, **extra}


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_release_writes_n_grayscale_pngs_per_class_and_a_manifest_whose_hashes_match(local_checkpoint, tmp_path):
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=5, quiet=True))
    rows = read_manifest(out)
    assert [r["status"] for r in rows] == ["kept"] * 15
    for name in CLASS_NAMES:
        files = sorted((out / name).glob("*.png"))
        assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
        assert record["counts"][name] == {"images": 5, "candidates": 5, "dropped_memorized": 0}
        with Image.open(files[0]) as im:
            assert im.mode == "L" and im.size == (16, 16)
    for row in rows:
        assert hashlib.sha256((out / row["file"]).read_bytes()).hexdigest() == row["sha256"]
        assert int(row["seed"]) == image_seed(0, CLASS_NAMES.index(row["class"]), int(row["index"]))
    assert {p.name for p in out.iterdir()} == set(CLASS_NAMES) | {"manifest.csv", "release.json", "MODEL_CARD.md"}
    assert json.loads((out / "release.json").read_text())["files"]["manifest.csv"] == \
        hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()


def test_a_rerun_is_byte_identical_and_the_batch_size_changes_nothing(local_checkpoint, tmp_path):
    def make(name, batch):
        out = tmp_path / name
        write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=20, batch=batch, seed=3,
                                     truncation=0.7, quiet=True))
        return folder_bytes(out)

    first, again, big_batch = make("a", 7), make("b", 7), make("c", 32)
    assert first == again
    assert first == big_batch
    images = [np.asarray(Image.open(tmp_path / "a" / "Normal" / f"{i:06d}.png")) for i in range(20)]
    assert len({im.tobytes() for im in images}) == 20  # every image its own latent


def test_one_image_can_be_regenerated_from_its_manifest_seed(local_checkpoint, tmp_path):
    from medstylegan2.sampling import load_generator

    out = tmp_path / "release"
    write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=3, truncation=0.8, quiet=True))
    row = read_manifest(out)[4]
    G, _ = load_generator(local_checkpoint)
    block_start = int(row["index"]) // release_images.CPU_BLOCK * release_images.CPU_BLOCK
    k = CLASS_NAMES.index(row["class"])
    seeds = [image_seed(0, k, i) for i in range(block_start, block_start + release_images.CPU_BLOCK)]
    assert seeds[int(row["index"]) - block_start] == int(row["seed"])
    images = release_images.render_block(G, seeds, k, 0.8, torch.device("cpu"))
    png = release_images.encode_png(images[int(row["index"]) - block_start][0])
    assert hashlib.sha256(png).hexdigest() == row["sha256"]


def test_npz_release_holds_the_same_pixels_in_bounded_shards(local_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(release_images, "SHARD_BYTES", 16 * 16 * 4)  # four 16-px images per shard
    write_release(ReleaseOptions(checkpoint=local_checkpoint, out=tmp_path / "png", per_class=6, quiet=True))
    opts = ReleaseOptions(checkpoint=local_checkpoint, out=tmp_path / "npz", per_class=6, format="npz", quiet=True)
    record = write_release(opts)
    out = tmp_path / "npz"
    assert sorted(p.name for p in out.glob("*.npz")) == sorted(f"{n}-{s:05d}.npz" for n in CLASS_NAMES for s in (0, 1))
    for row in read_manifest(out):
        with np.load(out / row["file"]) as shard:
            image = shard["images"][int(row["entry"])]
            assert shard["index"][int(row["entry"])] == int(row["index"])
            assert shard["seed"][int(row["entry"])] == int(row["seed"])
        assert hashlib.sha256(image.tobytes()).hexdigest() == row["sha256"]
        png = np.asarray(Image.open(tmp_path / "png" / row["class"] / f"{int(row['index']):06d}.png"))
        assert np.array_equal(image[0], png)
    for name, digest in record["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    opts.out = tmp_path / "npz-again"
    write_release(opts)
    assert folder_bytes(out) == folder_bytes(tmp_path / "npz-again")  # no time stamps in the zip members


def test_a_non_empty_folder_is_refused_without_force_and_only_a_release_is_replaced(local_checkpoint, tmp_path,
                                                                                     capsys):
    out = tmp_path / "release"
    args = ["release", str(local_checkpoint), "--out", str(out), "--per-class", "2", "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "--force" in err
    assert main(args + ["--per-class", "3", "--force"]) == 0
    assert len(list((out / "Normal").glob("*.png"))) == 3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["release", str(local_checkpoint), "--out", str(other), "--per-class", "2", "--force"]) == 2
    assert "no release.json" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"


def test_an_interrupted_release_leaves_no_final_folder_and_no_partial(local_checkpoint, tmp_path):
    out = tmp_path / "release"

    def fail_after_second_batch(n):
        if n == 2:
            raise RuntimeError("injected fault")

    with pytest.raises(RuntimeError, match="injected fault"):
        write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=40, batch=16, quiet=True),
                      after_batch=fail_after_second_batch)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_releases_partial_folder_is_removed_by_the_next_run(local_checkpoint, tmp_path):
    out = tmp_path / "release"
    killed = tmp_path / f"release{release_folder.PARTIAL_TAG}dead"  # its writer is gone: nobody holds the lock
    (killed / "Normal").mkdir(parents=True)
    (killed / release_folder.LOCK_NAME).touch()
    starting = tmp_path / f"release{release_folder.PARTIAL_TAG}new"  # no lock file yet: might be starting, left alone
    starting.mkdir()
    write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=1, quiet=True))
    assert not killed.exists() and starting.exists() and (out / "release.json").is_file()


def test_a_partial_folder_being_written_is_not_touched(local_checkpoint, tmp_path):
    out = tmp_path / "release"
    with release_folder.PartialFolder(out) as busy:
        assert release_folder.remove_stale_partials(out) == []
        assert busy.path.is_dir()
    assert not busy.path.exists()


def test_card_of_a_model_trained_without_dp_carries_the_banner(local_checkpoint, tmp_path):
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=1, quiet=True))
    card = (out / "MODEL_CARD.md").read_text()
    assert "**NOT differentially private.**" in card and "NOT FOR DIAGNOSIS" in card
    assert record["checkpoint"]["kind"] == "local (train-local)"
    assert record["privacy"]["differentially_private"] is False
    assert "not bit-identical to CPU output" in card


def test_card_states_each_sites_epsilon_at_this_checkpoints_round(local_checkpoint, tmp_path):
    run = tmp_path / "run"
    ckpt = federated_checkpoint(local_checkpoint, run, dp=True, round_num=2)
    (run / "privacy.json").write_text(json.dumps({"delta": 1e-5, "accountant": "rdp", "sites": {
        "hospital-a": [privacy_record(1, 3.25), privacy_record(2, 5.5), privacy_record(3, 7.75)],
        "hospital-b": [privacy_record(1, 2.125), privacy_record(2, 4.0625)]}}))
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=ckpt, out=out, per_class=1, quiet=True))
    card = (out / "MODEL_CARD.md").read_text()
    assert "NOT differentially private" not in card
    assert "| hospital-a | 5.5 | 1e-05 | 2 | not recorded |" in card  # round 2, not the later round 3
    assert "| hospital-b | 4.062 | 1e-05 | 2 | not recorded |" in card
    assert record["training"] == {"mode": "federated", "rounds": 2, "sites": ["hospital-a", "hospital-b"],
                                  "local_steps_per_round": 50, "aggregation": "fedavg", "partitioner": "iid",
                                  "data_source": "phantoms"}
    assert "30" not in json.dumps(record["training"])  # site sizes stay private


def test_card_shows_a_lifetime_epsilon_when_the_report_records_one(local_checkpoint, tmp_path):
    run = tmp_path / "run"
    ckpt = federated_checkpoint(local_checkpoint, run, dp=True, round_num=1)
    (run / "privacy.json").write_text(json.dumps({"delta": 1e-5, "accountant": "rdp", "sites": {
        "hospital-a": [privacy_record(1, 3.25, lifetime={"epsilon": 9.5, "delta": 1e-5})],
        "hospital-b": [privacy_record(1, 2.125)]}}))
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=ckpt, out=out, per_class=1, quiet=True))
    assert record["privacy"]["sites"]["hospital-a"]["lifetime"] == {"epsilon": 9.5, "delta": 1e-5}
    card = (out / "MODEL_CARD.md").read_text()
    assert "| hospital-a | 3.25 | 1e-05 | 1 | epsilon 9.5 at delta 1e-05 |" in card
    assert "| hospital-b | 2.125 | 1e-05 | 1 | not recorded |" in card


def test_card_includes_the_evaluators_figures_for_this_round(local_checkpoint, tmp_path):
    run = tmp_path / "run"
    ckpt = federated_checkpoint(local_checkpoint, run, dp=False, round_num=2)
    (run / "eval").mkdir()
    per_class = {name: {"fd_domain": 10.0 + k, "utility_recall_synthetic": 0.5, "cas": 0.25}
                 for k, name in enumerate(CLASS_NAMES)}
    (run / "eval" / "round_002.json").write_text(json.dumps({
        "round": 2, "n_generated": {n: 50 for n in CLASS_NAMES}, "n_train": 90, "resolution": 16,
        "per_class": per_class, "overall": {"utility_accuracy_synthetic": 0.625, "memorization_fraction_pixel": 0.04},
        "memorization": {"rule": "fraction below the 5th percentile", "threshold_percentile": 5.0,
                         "pixel": {"threshold": 0.11, "fraction_below": 0.04, "near_copies": 0}},
        "errors": {"fid": "weights absent"}}))
    (run / "eval" / "round_001.json").write_text(json.dumps({"round": 1, "per_class": {}}))
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=ckpt, out=out, per_class=1, quiet=True))
    card = (out / "MODEL_CARD.md").read_text()
    assert record["evaluation"]["file"].endswith("round_002.json")
    assert "| Normal | 10 | 0.5 | 0.25 |" in card and "| Non-COVID | 12 | 0.5 | 0.25 |" in card
    assert "TSTR accuracy" in card and "0.625" in card and "Not computed: fid (weights absent)" in card
    assert "pixel threshold 0.11" in card


def planted_copies(monkeypatch, train: ImageSet, planted: dict[int, set[int]]) -> None:
    """Make the generator return training images for the candidate indices in ``planted`` (class -> indices)."""
    original = release.render_block
    seed_to_copy = {image_seed(0, k, i): train.images[np.flatnonzero(train.labels == k)[i % 5]]
                    for k, indices in planted.items() for i in indices}

    def render(G, seeds, class_index, truncation, device):
        images = original(G, seeds, class_index, truncation, device)
        for j, seed in enumerate(seeds):
            if seed in seed_to_copy:
                images[j] = seed_to_copy[seed]
        return images

    monkeypatch.setattr(release, "render_block", render)


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    train = generate_phantoms(10, 16, seed=0)
    write_image_folder(train, root / "train")
    write_image_folder(generate_phantoms(10, 16, seed=1), root / "heldout")
    return train, root / "train", root / "heldout"


def test_drop_memorized_drops_planted_copies_and_still_delivers_n(local_checkpoint, tmp_path, monkeypatch,
                                                                  real_folders):
    train, train_dir, heldout_dir = real_folders
    planted_copies(monkeypatch, train, {0: {1, 4}, 2: {0, 15}})
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=local_checkpoint, out=out, per_class=16, batch=8,
                                          drop_memorized=True, train=train_dir, heldout=heldout_dir, quiet=True))
    rows = read_manifest(out)
    dropped = sorted((r["class"], int(r["index"])) for r in rows if r["status"] == "dropped-memorized")
    assert dropped == [("Non-COVID", 0), ("Non-COVID", 15), ("Normal", 1), ("Normal", 4)]
    assert all(float(r["nearest_train_rms"]) == 0.0 for r in rows if r["status"] == "dropped-memorized")
    for name in CLASS_NAMES:
        assert len(list((out / name).glob("*.png"))) == 16
    assert record["counts"]["Normal"] == {"images": 16, "candidates": 18, "dropped_memorized": 2}
    assert record["counts"]["COVID-19"] == {"images": 16, "candidates": 16, "dropped_memorized": 0}
    assert (out / "Normal" / "000017.png").is_file() and not (out / "Normal" / "000001.png").exists()
    card = (out / "MODEL_CARD.md").read_text()
    assert "| Normal | 16 | 18 | 2 |" in card and "| Non-COVID | 16 | 18 | 2 |" in card
    assert record["memorization_filter"]["threshold"] > 0


def test_drop_memorized_gives_up_with_an_error_when_the_model_only_copies(local_checkpoint, tmp_path, monkeypatch,
                                                                          real_folders, capsys):
    train, train_dir, heldout_dir = real_folders
    planted_copies(monkeypatch, train, {1: set(range(100))})
    out = tmp_path / "release"
    assert main(["release", str(local_checkpoint), "--out", str(out), "--per-class", "4", "--drop-memorized",
                 "--train", str(train_dir), "--heldout", str(heldout_dir), "--max-attempts", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: class COVID-19: only 0 of 4 images passed the memorization filter after 8 candidates" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_drop_memorized_without_a_threshold_source_is_a_clear_error(local_checkpoint, tmp_path, real_folders,
                                                                    capsys):
    _, train_dir, _ = real_folders
    assert main(["release", str(local_checkpoint), "--out", str(tmp_path / "r"), "--per-class", "1",
                 "--drop-memorized", "--train", str(train_dir)]) == 2
    assert "--heldout DIR" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--per-class", "2", "--format", "jpg"], "--format must be one of png, npz, got 'jpg'"),
    (["--per-class", "2", "--drop-memorized"], "--drop-memorized needs --train DIR"),
    (["--per-class", "2", "--truncation", "1.5"], "--truncation must be in (0, 1]"),
])
def test_bad_options_are_one_error_line(local_checkpoint, tmp_path, capsys, extra, message):
    assert main(["release", str(local_checkpoint), "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"not a checkpoint", "cannot be read"),
    ({"format": "someone-elses-model"}, "is not a Med-StyleGAN2 checkpoint"),
])
def test_a_missing_corrupt_or_foreign_checkpoint_is_one_error_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert main(["release", str(path), "--out", str(tmp_path / "r"), "--per-class", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_card_says_epsilon_is_unknown_when_dp_was_on_but_no_report_exists(local_checkpoint, tmp_path):
    ckpt = federated_checkpoint(local_checkpoint, tmp_path / "run", dp=True)
    out = tmp_path / "release"
    record = write_release(ReleaseOptions(checkpoint=ckpt, out=out, per_class=1, quiet=True))
    assert record["privacy"]["differentially_private"] is True and record["privacy"]["sites"] == {}
    assert "but epsilon is unknown" in (out / "MODEL_CARD.md").read_text()


def test_a_local_dp_checkpoints_epsilon_is_recomputed_from_its_accountant_history(local_checkpoint, tmp_path):
    from opacus.accountants import RDPAccountant

    state = torch.load(local_checkpoint, map_location="cpu", weights_only=False)
    state["config"]["privacy"].update(enabled=True, noise_multiplier=1.1)
    state["config"]["model"]["mbstd_group_size"] = 0
    state["privacy"] = {"format": "medstylegan2-privacy-v1", "accountant": "rdp", "history": [[1.1, 0.05, 120]],
                        "noise_multiplier": 1.1, "num_examples": 320, "delta": 1e-5}
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(state, ckpt)
    record = write_release(ReleaseOptions(checkpoint=ckpt, out=tmp_path / "release", per_class=1, quiet=True))
    reference = RDPAccountant()
    reference.history = [(1.1, 0.05, 120)]
    assert record["privacy"]["sites"]["local"]["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert record["privacy"]["sites"]["local"]["lifetime"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_release_says_it_was_made_on_a_gpu(local_checkpoint, tmp_path):
    def make(name, device):
        write_release(ReleaseOptions(checkpoint=local_checkpoint, out=tmp_path / name, per_class=20, device=device,
                                     quiet=True))
        return [r["sha256"] for r in read_manifest(tmp_path / name)]

    first, again, cpu = make("a", "cuda"), make("b", "cuda"), make("cpu", "cpu")
    record = json.loads((tmp_path / "a" / "release.json").read_text())
    assert record["generation"]["device"] == "cuda"
    assert "made on a GPU" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    # Reported, not asserted: the card promises neither (see model_card.GPU_STATEMENT).
    print(f"CUDA rerun: {sum(a == b for a, b in zip(first, again))} of {len(first)} images bit-identical; "
          f"CUDA vs CPU: {sum(a == b for a, b in zip(first, cpu))} of {len(cpu)}")
