"""The engine's options for the issue-10 trust boundary: a public nominal size (nothing released
depends on the private image count), and patient-level privacy (Poisson sampling of patients, each
patient's summed gradient clipped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from medstylegan2.config import load_config
from medstylegan2.losses import discriminator_real_loss_per_sample
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.per_sample import per_sample_real_gradients
from medstylegan2.privacy.units import sum_per_unit
from medstylegan2.trainer import SiteTrainer

TINY = ["model.resolution=16", "model.channel_base=256", "model.channel_max=32", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.cmap_dim=16", "model.mbstd_group_size=0", "train.batch_size=4",
        "train.r1_interval=2", "train.pl_interval=2", "train.pl_weight=0", "privacy.enabled=true",
        "privacy.noise_multiplier=1.0"]


def site(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 16, 16), dtype=np.uint8), rng.integers(0, 3, n)


def trainer_with(engine: DPEngine, images, labels) -> SiteTrainer:
    cfg = load_config(None, TINY)
    return SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)


def update(trainer: SiteTrainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.D.parameters()]).clone()


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = create_accountant(mechanism="rdp")
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


# -- a public nominal size ---------------------------------------------------------------------------


def test_with_a_nominal_size_nothing_released_depends_on_the_image_count():
    images, labels = site(64)
    engines, trainers = [], []
    for n in (24, 64):  # two sites that differ only in how many images they hold
        engine = DPEngine(num_examples=n, batch_size=4, max_grad_norm=0.5, noise_multiplier=1.3, delta=1e-5,
                          nominal_size=100, seed=11)
        engines.append(engine)
        trainers.append(trainer_with(engine, images[:n], labels[:n]))
        assert engine.sample_rate == 4 / 100 and engine.expected_batch_size == pytest.approx(4)
    # The same Poisson-sampled records give the same released update, noise included: the
    # divisor and the noise scale are public constants, not functions of n.
    torch.manual_seed(0)
    for trainer in trainers:
        trainer.D.load_state_dict(trainers[0].D.state_dict())
    batch = torch.tensor([1, 5, 7])
    released = []
    for engine, trainer in zip(engines, trainers):
        engine.private_real_gradient(trainer.real_images[batch], trainer.real_labels[batch], r1_weight=0.0)
        released.append(update(trainer))
    torch.testing.assert_close(released[0], released[1], rtol=0, atol=0)
    # ... and the figures that leave the site (round record, images-seen counter) are the same.
    assert engines[0].round_record(1) == engines[1].round_record(1)
    for trainer in trainers:
        trainer.privacy.sample_batch = lambda: torch.zeros(0, dtype=torch.long)
        trainer.train_steps(1)
    assert trainers[0].cur_nimg == trainers[1].cur_nimg == 4


def test_without_a_nominal_size_the_sample_rate_and_delta_reveal_n():
    records = [DPEngine(num_examples=n, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0).round_record(1)
               for n in (24, 64)]
    assert records[0]["sample_rate"] != records[1]["sample_rate"] and records[0]["delta"] != records[1]["delta"]


def test_the_noise_of_an_empty_batch_is_sigma_c_over_the_public_batch_size():
    images, labels = site(30)
    engine = DPEngine(num_examples=30, batch_size=4, max_grad_norm=0.5, noise_multiplier=2.0, delta=1e-5,
                      nominal_size=1000, seed=1)
    trainer = trainer_with(engine, images, labels)
    empty = torch.zeros(0, dtype=torch.long)
    draws = []
    for _ in range(40):
        engine.private_real_gradient(trainer.real_images[empty], trainer.real_labels[empty], 0.0)
        draws.append(update(trainer))
    measured = torch.stack(draws).std(dim=0).mean().item()
    assert abs(measured / (2.0 * 0.5 / 4) - 1) < 0.03


# -- patient-level privacy -------------------------------------------------------------------------------


def test_sum_per_unit_equals_the_gradient_of_each_patients_summed_loss():
    torch.manual_seed(0)
    images, labels = site(7)
    engine = DPEngine(num_examples=7, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    D = trainer_with(engine, images, labels).D.double()
    x = torch.randn(7, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    patients = torch.tensor([30, 10, 30, 20, 10, 30, 40])
    grads, _, order = per_sample_real_gradients(D, x, y, r1_weight=0.5)
    summed = sum_per_unit(grads, patients[order])
    for row, patient in enumerate(torch.unique(patients).tolist()):
        mine = (patients == patient).nonzero().flatten()
        D.zero_grad()
        discriminator_real_loss_per_sample(D, x[mine], y[mine], 0.5).sum().backward()
        for name, p in D.named_parameters():
            torch.testing.assert_close(summed[name][row], p.grad, rtol=1e-6, atol=1e-9)


def test_patients_are_poisson_sampled_with_all_their_images():
    groups = np.repeat(np.arange(50), 3)  # 50 patients, 3 images each
    engine = DPEngine(num_examples=150, batch_size=5, max_grad_norm=1.0, noise_multiplier=1.0, groups=groups, seed=2)
    assert engine.num_units == 50 and engine.sample_rate == 5 / 50
    sizes = []
    for _ in range(300):
        idx = engine.sample_batch()
        units = engine.units_of(idx)
        for patient in torch.unique(units).tolist():
            assert set(idx[units == patient].tolist()) == set(np.flatnonzero(groups == patient).tolist())
        sizes.append(len(torch.unique(units)))
    assert abs(np.mean(sizes) - 5) < 0.5 and np.std(sizes) > 1


def test_a_patient_with_most_images_changes_the_update_by_at_most_c_over_b():
    clip, batch = 1e-3, 4
    images, labels = site(24)
    groups = np.array([0] * 18 + [1, 2, 3, 4, 5, 6])  # patient 0 owns 18 of the 24 images
    engine = DPEngine(num_examples=24, batch_size=batch, max_grad_norm=clip, noise_multiplier=0.0, groups=groups,
                      delta=1e-5, seed=0)
    trainer = trainer_with(engine, images, labels)
    everyone = torch.arange(24)
    without = torch.arange(18, 24)

    def released(idx: torch.Tensor) -> torch.Tensor:
        engine.private_real_gradient(trainer.real_images[idx], trainer.real_labels[idx], 0.1,
                                     units=engine.units_of(idx))
        return update(trainer)

    change = (released(everyone) - released(without)).norm().item()
    assert change <= clip / engine.expected_batch_size * (1 + 1e-4)
    # For contrast, per-image clipping lets the same 18 images move the update far more.
    per_image = DPEngine(num_examples=24, batch_size=batch, max_grad_norm=clip, noise_multiplier=0.0, delta=1e-5,
                         seed=0)
    trainer.privacy = per_image
    per_image.bind(trainer.D, trainer.d_opt, num_examples=24, batch_size=trainer.cfg.train.batch_size)
    per_image.private_real_gradient(trainer.real_images, trainer.real_labels, 0.1)
    with_all = update(trainer)
    per_image.private_real_gradient(trainer.real_images[without], trainer.real_labels[without], 0.1)
    assert (with_all - update(trainer)).norm().item() > 5 * clip / per_image.expected_batch_size


def test_patient_level_epsilon_equals_opacus_for_the_patient_sampling_rate():
    images, labels = site(40)
    groups = np.arange(40) // 4  # 10 patients of 4 images
    engine = DPEngine(num_examples=40, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, groups=groups,
                      delta=1e-5, seed=5)
    trainer = trainer_with(engine, images, labels)
    trainer.train_steps(3)
    assert engine.sample_rate == 4 / 10
    assert engine.accountant.history == [(1.0, 0.4, 3)]
    assert abs(engine.epsilon() - opacus_epsilon(1.0, 0.4, 3, 1e-5)) < 1e-6
    assert "unit=patient (10 patients)" in engine.describe()


def test_patient_ids_must_name_every_image():
    from medstylegan2.errors import PrivacyError

    with pytest.raises(PrivacyError, match="3 ids for 4 images"):
        DPEngine(num_examples=4, batch_size=2, max_grad_norm=1.0, noise_multiplier=1.0, groups=[0, 0, 1])


def test_patient_ids_are_read_from_a_csv_naming_problems_by_line(tmp_path):
    from medstylegan2.errors import DataError
    from medstylegan2.patient_ids import read_patient_ids

    path = tmp_path / "patients.csv"
    path.write_text("image,patient_id\nNormal/a.png,P7\nNormal/b.png,P3\nCOVID-19/c.png,P7\nTest/x.png,P9\n")
    groups = read_patient_ids(path, ["COVID-19/c.png", "Normal/b.png", "Normal/a.png"])
    assert groups.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="no patient_id for 1 training image"):
        read_patient_ids(path, ["Normal/a.png", "Normal/zzz.png"])
    path.write_text("image,patient_id\nNormal/a.png,P7\nNormal/a.png,P8\n")
    with pytest.raises(DataError, match=r"patients.csv:3: image 'Normal/a.png' is listed twice"):
        read_patient_ids(path, ["Normal/a.png"])
    path.write_text("file,patient\n")
    with pytest.raises(DataError, match="needs the columns image, patient_id"):
        read_patient_ids(path, ["Normal/a.png"])


# -- what a reply may carry under DP ------------------------------------------------------------------


def test_a_dp_reply_carries_no_count_timing_or_real_loss_whatever_the_site_size():
    from medstylegan2.privacy.reply import DP_REPLY_KEYS, reply_metrics

    replies = []
    for n in (24, 40):
        images, labels = site(n)
        engine = DPEngine(num_examples=n, batch_size=4, max_grad_norm=0.5, noise_multiplier=1.1, delta=1e-5,
                          nominal_size=100)
        trainer = trainer_with(engine, images, labels)
        stats = trainer.train_steps(2)
        assert {"seconds", "images_per_second", "real_images_seen"} <= set(stats)
        # What the site round assembles today, plus a real-data loss a later change might add.
        metrics = {"num_examples": float(n), "steps": 2.0, **stats, "loss_d_real": 0.7,
                   **{f"dp_{k}": float(v) for k, v in engine.round_record(1).items() if k != "round"}}
        replies.append(reply_metrics(metrics, dp=True, nominal_size=100))
    for reply in replies:
        assert reply["num_examples"] == 100.0
        assert not {"seconds", "images_per_second", "real_images_seen", "loss_d_real"} & set(reply)
        assert set(reply) <= set(DP_REPLY_KEYS) | {"num_examples"} | {k for k in reply if k.startswith("dp_")}
    public = [{k: v for k, v in r.items() if not k.startswith("loss")} for r in replies]
    assert public[0] == public[1]  # counts and privacy figures do not depend on n
    assert reply_metrics({"num_examples": 24.0, "seconds": 3.0}, dp=False) == {"num_examples": 24.0, "seconds": 3.0}


def test_errors_under_dp_reach_the_server_as_a_generic_text():
    from medstylegan2.privacy.reply import GENERIC_ERROR, reply_error_text

    oom = RuntimeError("CUDA out of memory while computing per-sample gradients of 517 images")
    assert reply_error_text(oom, dp=True) == GENERIC_ERROR and "517" not in GENERIC_ERROR
    assert "517" in reply_error_text(oom, dp=False)


def test_a_held_out_split_by_patient_puts_no_patient_on_both_sides():
    from medstylegan2.data import split_heldout
    from medstylegan2.images import ImageSet

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 200)  # 40 patients, several images each
    images = ImageSet(images=np.zeros((200, 1, 8, 8), np.uint8), labels=rng.integers(0, 3, 200),
                      sources=[f"img-{i}.png" for i in range(200)], groups=groups)
    train, heldout = split_heldout(images, 0.2, seed=3)
    assert not set(train.groups.tolist()) & set(heldout.groups.tolist())
    assert len(train) + len(heldout) == 200 and 0.15 <= len(heldout) / 200 <= 0.3
    again = split_heldout(images, 0.2, seed=3)[1]
    assert again.sources == heldout.sources  # deterministic for a seed


def test_a_patient_level_site_round_samples_the_patients_its_policy_csv_names(tmp_path):
    import yaml

    from medstylegan2.privacy.request import RoundRequest
    from medstylegan2.privacy.site import SitePrivacy

    images, labels = site(12)
    sources = [f"Normal/{i}.png" for i in range(12)]
    (tmp_path / "patients.csv").write_text("image,patient_id\n" + "".join(f"{s},p{i // 3}\n"
                                                                          for i, s in enumerate(sources)))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "dp_required": True, "min_noise_multiplier": 1.0, "lifetime_epsilon": 100.0, "nominal_size": 8,
        "ledger_dir": "ledger", "unit": "patient", "patient_csv": "patients.csv"}))
    site_privacy = SitePrivacy.of_node({"privacy-policy": str(tmp_path / "policy.yaml")}, "h")
    request = RoundRequest(dp=True, local_steps=2, batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0)
    with site_privacy.round(request, images, labels, run="r", round_num=1, sources=sources) as privacy:
        engine = privacy.make_engine(12)
        assert privacy.settings.unit == "patient" and engine.num_units == 4 and engine.sample_rate == 4 / 8
        trainer_with(engine, images, labels).train_steps(2)
        figures = privacy.record(engine.spent_steps)
    assert figures["epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.5, 2, 1e-5), abs=1e-6)
    assert [e["unit"] for e in privacy.ledger.entries()] == ["patient"]
    with pytest.raises(Exception, match="patient ids|patient_id"):
        with site_privacy.round(request, images, labels, run="r", round_num=2, sources=None):
            pass


def test_a_deployed_site_with_a_policy_patient_csv_holds_out_whole_patients(tmp_path):
    import yaml
    from PIL import Image

    from medstylegan2.fl.partition import load_site_data

    rng = np.random.default_rng(5)
    rows = []
    for klass in ("Normal", "COVID-19", "Non-COVID"):
        (tmp_path / "data" / klass).mkdir(parents=True)
        for i in range(30):
            name = f"{klass}/{i:03d}.png"
            Image.fromarray(rng.integers(1, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / name)
            rows.append(f"{name},{klass}-patient-{i // 5}\n")  # six patients of five images per class
    (tmp_path / "patients.csv").write_text("image,patient_id\n" + "".join(rows))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "dp_required": True, "min_noise_multiplier": 1.0, "lifetime_epsilon": 100.0, "nominal_size": 8,
        "ledger_dir": "ledger", "unit": "patient", "patient_csv": "patients.csv"}))
    cfg = load_config(None, ["model.resolution=16", "data.heldout_fraction=0.2", "data.cache_dir=null"])
    node = {"data-dir": str(tmp_path / "data"), "site-name": "h", "privacy-policy": str(tmp_path / "policy.yaml")}

    train = load_site_data(cfg, node)
    patient_of = dict(row.strip().split(",") for row in rows)
    trained = {patient_of[s] for s in train.sources}
    assert 60 <= len(train.labels) < 90 and all(len(s) for s in train.sources)
    # Every patient is either trained on with all five images, or not at all.
    assert all(sum(patient_of[s] == p for s in train.sources) == 5 for p in trained)
    assert isinstance(train.groups, np.ndarray) and len(np.unique(train.groups)) == len(trained)
