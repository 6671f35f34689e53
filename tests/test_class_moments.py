"""Per-class image statistics released once under DP (privacy/class_moments.py), and G's loss on them.

Wired into a round as the class guide is: the site's plan and budgets count the release, its
ledger records it (``mechanism: class_moments``) before it is kept beside the ledger and used, a
later round of the run reuses it for free, and it never leaves the site.
"""

import math

import numpy as np
import pytest
import torch

from medstylegan2.cli import main
from medstylegan2.errors import CheckpointError, ConfigError, PrivacyError
from medstylegan2.fl.site_round import site_class_moments
from medstylegan2.phantoms import generate_phantoms
from medstylegan2.privacy.accounting import epsilon_of_history, sigma_for
from medstylegan2.privacy.class_moments import (MOMENTS_FOLDER, SENSITIVITY, ClassMoments, MomentsStore,
                                                coarse_pictures, moments_loss, release_class_moments,
                                                release_from_config)
from medstylegan2.privacy.ledger import LedgerError, PrivacyLedger
from medstylegan2.privacy.request import RoundRequest, check_request
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import SiteTrainer
from test_class_guide import policy
from test_site_privacy import DP, SIGMA, ledger_of, opacus_epsilon, round_line, run, site_policies, smoke

SIGMA_M = 4.0
MOMENTS = ["train.class_moments_weight=10.0", f"train.class_moments_noise={SIGMA_M}"]


def two_classes(n=200, seed=0):
    """Class 0: dark images with a bright left half, varying in brightness; class 1: uniform mid-grey."""
    rng = np.random.default_rng(seed)
    images = np.full((2 * n, 1, 16, 16), 128, dtype=np.uint8)
    images[:n, :, :, :8] = rng.integers(150, 250, size=(n, 1, 1, 1))
    images[:n, :, :, 8:] = 20
    labels = np.repeat([0, 1], n)
    return images, labels


def as_float(images):
    return torch.as_tensor(images).float() / 127.5 - 1.0


def test_without_noise_the_release_is_each_classs_exact_mean_picture_and_spread():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    for c in range(2):
        u = coarse_pictures(as_float(images[labels == c]), 4)
        assert torch.allclose(m.means[c], u.mean(0), atol=1e-5)
        assert m.spreads[c] == pytest.approx(float(u.var(0, unbiased=False).mean().sqrt()), abs=1e-5)
    assert m.spreads[1] == pytest.approx(0.0, abs=1e-6) and m.spreads[0] > 0.1
    assert m.usable.tolist() == [True, True]


def test_one_spread_per_cell_is_each_cells_exact_spread_across_the_classs_images():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None, spread="cell")
    assert m.per_cell and m.spreads.shape == m.means.shape == (2, 16)
    for c in range(2):
        u = coarse_pictures(as_float(images[labels == c]), 4)
        assert torch.allclose(m.means[c], u.mean(0), atol=1e-5)
        assert torch.allclose(m.spreads[c], u.std(0, unbiased=False), atol=1e-4)
    # Class 0 varies in its bright left half only; its dark right half is the same in every image.
    assert float(m.spreads[0].reshape(4, 4)[:, :2].min()) > 0.1
    assert float(m.spreads[0].reshape(4, 4)[:, 2:].max()) == pytest.approx(0.0, abs=1e-3)


def noiseless_sums(images, labels, num_classes, grid, groups=None, spread="class"):
    """The release's sums, rebuilt from what it reports (no noise: nothing clamps)."""
    m = release_class_moments(images, labels, num_classes=num_classes, grid=grid, noise_multiplier=None,
                              groups=groups, spread=spread)
    counts = m.counts.double()
    means = m.means.double()
    if spread == "cell":
        squares = (m.spreads.double() ** 2 + means.pow(2)) / grid * counts[:, None]
    else:
        squares = ((m.spreads.double() ** 2 + means.pow(2).mean(1)) * counts)[:, None]
    return torch.cat([(means / grid * counts[:, None]).flatten(), squares.flatten(), counts])


@pytest.mark.parametrize("spread", ["class", "cell"])
def test_one_image_moves_the_noiseless_sums_by_at_most_the_sensitivity(spread):
    """The bound the Gaussian mechanism's noise is scaled to, checked on extreme images, with one
    spread per class and one per cell alike (the same noise buys the same epsilon)."""
    rng = np.random.default_rng(1)
    images = rng.choice(np.array([0, 255], dtype=np.uint8), size=(64, 1, 8, 8))
    images[0] = 255
    labels = rng.integers(0, 3, size=64)
    full = noiseless_sums(images, labels, 3, 4, spread=spread)
    for drop in range(5):
        keep = np.arange(64) != drop
        moved = full - noiseless_sums(images[keep], labels[keep], 3, 4, spread=spread)
        assert float(moved.norm()) <= SENSITIVITY + 1e-6
    moved = full - noiseless_sums(images[1:], labels[1:], 3, 4, spread=spread)
    assert float(moved.norm()) == pytest.approx(SENSITIVITY)


def test_a_patients_images_are_one_unit_clipped_together():
    """Ten bright images of one patient move the release no more than one image could; counted
    as ten separate units they would move it ten times as far."""
    images, labels = two_classes(n=50)
    patient = np.full((10, 1, 16, 16), 255, dtype=np.uint8)
    with_patient = (np.concatenate([images, patient]), np.concatenate([labels, np.zeros(10, dtype=np.int64)]))
    groups = np.concatenate([np.arange(100), np.full(10, 100)])
    moved = noiseless_sums(*with_patient, 2, 4, groups=groups) - noiseless_sums(images, labels, 2, 4,
                                                                                 groups=np.arange(100))
    assert float(moved.norm()) <= SENSITIVITY + 1e-6
    as_images = noiseless_sums(*with_patient, 2, 4) - noiseless_sums(images, labels, 2, 4)
    assert float(as_images.norm()) == pytest.approx(10 * SENSITIVITY, rel=1e-6)


def test_noise_has_the_gaussian_mechanisms_scale():
    images, labels = two_classes(n=2000)
    sigma = 5.0
    draws = torch.stack([release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=sigma,
                                               seed=s).means[0] for s in range(40)])
    exact = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None).means[0]
    # mean picture = grid * noisy sum / count: per-cell noise about grid * sigma * sqrt(3) / n
    expected = 4 * sigma * SENSITIVITY / 2000
    assert float((draws - exact).std()) == pytest.approx(expected, rel=0.25)
    assert float((draws - exact).mean().abs()) < expected


def test_the_spread_under_noise_is_not_shrunk_by_the_noise_on_the_mean_picture():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1000, 1, 16, 16), dtype=np.uint8)  # spread^2 about 0.083
    labels = np.zeros(1000, dtype=np.int64)
    exact = float(release_class_moments(images, labels, num_classes=1, grid=8, noise_multiplier=None).spreads[0])
    squares = torch.stack([release_class_moments(images, labels, num_classes=1, grid=8, noise_multiplier=20.0,
                                                 seed=s).spreads[0] ** 2 for s in range(40)])
    # Each cell of the noisy mean picture carries noise of variance (8 * 20 * sqrt(3) / 1000)^2 =
    # 0.077: uncorrected, spread^2 would come out near 0.083 - 0.077 on average.
    assert float(squares.mean()) == pytest.approx(exact ** 2, abs=0.02)


def test_the_spread_per_cell_under_noise_is_not_shrunk_by_the_noise_on_the_mean_picture():
    # Every 2 x 2 block black or white: every cell's spread is about 1, far above the noise on one
    # cell (8 * 20 * sqrt(3) / 1000 = 0.28), so no cell's variance is clamped at 0.
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, size=(1000, 1, 8, 8)).astype(np.uint8) * 255
    images = blocks.repeat(2, axis=2).repeat(2, axis=3)
    labels = np.zeros(1000, dtype=np.int64)
    exact = release_class_moments(images, labels, num_classes=1, grid=8, noise_multiplier=None, spread="cell")
    squares = torch.stack([release_class_moments(images, labels, num_classes=1, grid=8, noise_multiplier=20.0,
                                                 seed=s, spread="cell").spreads[0] ** 2 for s in range(40)])
    # Uncorrected, spread^2 would come out 0.28^2 = 0.077 low on average.
    assert float(squares.mean()) == pytest.approx(float((exact.spreads[0] ** 2).mean()), abs=0.02)


def test_a_class_too_small_for_its_noise_is_marked_unusable():
    images, labels = two_classes(n=20)
    m = release_class_moments(images, labels, num_classes=3, grid=4, noise_multiplier=50.0, seed=0)
    assert m.usable.tolist() == [False, False, False]  # 20 images under noise of std 87 per count
    assert moments_loss(torch.zeros(8, 1, 16, 16), torch.arange(8) % 3, m) == 0


def test_bad_input_names_the_problem():
    images, labels = two_classes(n=4)
    with pytest.raises(PrivacyError, match="one label per image"):
        release_class_moments(images, labels[:3], num_classes=2, grid=4, noise_multiplier=None)
    with pytest.raises(PrivacyError, match="labels must lie in 0..1"):
        release_class_moments(images, labels + 1, num_classes=2, grid=4, noise_multiplier=None)
    with pytest.raises(PrivacyError, match="noise multiplier must be > 0"):
        release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=math.nan)


def test_the_loss_is_zero_on_the_real_images_and_pushes_collapsed_fakes_apart():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    real = as_float(images)
    assert float(moments_loss(real, torch.as_tensor(labels), m)) == pytest.approx(0.0, abs=1e-6)
    # A class with one fake in the batch has no spread to compare: it is left out, not scored.
    lone = torch.cat([real[labels == 0], torch.ones(1, 1, 16, 16)])
    lone_labels = torch.cat([torch.zeros(int((labels == 0).sum()), dtype=torch.long), torch.ones(1, dtype=torch.long)])
    assert float(moments_loss(lone, lone_labels, m)) == pytest.approx(0.0, abs=1e-6)
    # Every class-0 fake the same image: right mean picture, no spread.
    collapsed = real[labels == 0].mean(0, keepdim=True).repeat(50, 1, 1, 1) + 0.01 * torch.randn(50, 1, 16, 16)
    collapsed.requires_grad_(True)
    loss = moments_loss(collapsed, torch.zeros(50, dtype=torch.long), m)
    assert float(loss.detach()) > 0.5 * float(m.spreads[0]) ** 2
    loss.backward()
    spread_before = float(coarse_pictures(collapsed.detach(), 4).std(0).mean())
    stepped = collapsed.detach() - 20.0 * collapsed.grad
    assert float(coarse_pictures(stepped, 4).std(0).mean()) > spread_before


def test_the_spread_per_cell_tells_where_a_class_varies_which_one_spread_per_class_cannot():
    """Reals vary in their left half (a bright patch in some images, not in others: a lobe that is
    there or not), fakes as much but in their right half, with the same mean picture. One spread
    per class calls them alike; one per cell does not, and its gradient moves the variety left."""
    rng = np.random.default_rng(0)
    n = 400
    left, right = rng.integers(0, 2, n).astype(bool), rng.integers(0, 2, n).astype(bool)
    reals = np.full((n, 1, 16, 16), 128, dtype=np.uint8)
    reals[:, :, :, :8] = np.where(left, 228, 28)[:, None, None, None]
    fakes = np.full((n, 1, 16, 16), 128, dtype=np.uint8)
    fakes[:, :, :, 8:] = np.where(right, 228, 28)[:, None, None, None]
    labels = torch.zeros(n, dtype=torch.long)
    # The same mean on the left (halfway, up to the sample) once fakes' left half is set to it.
    fakes[:, :, :, :8] = 128
    reals[:, :, :, 8:] = 128
    per_class = release_class_moments(reals, labels.numpy(), num_classes=1, grid=4, noise_multiplier=None)
    per_cell = release_class_moments(reals, labels.numpy(), num_classes=1, grid=4, noise_multiplier=None,
                                     spread="cell")
    x = (as_float(fakes) + 0.01 * torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    x.requires_grad_(True)
    assert float(moments_loss(x, labels, per_class).detach()) < 0.01
    loss = moments_loss(x, labels, per_cell)
    assert float(loss.detach()) > 0.1
    loss.backward()
    stepped = coarse_pictures(x.detach() - 50.0 * x.grad, 4).std(0).reshape(4, 4)
    before = coarse_pictures(x.detach(), 4).std(0).reshape(4, 4)
    assert float(stepped[:, :2].mean()) > float(before[:, :2].mean())
    assert float(stepped[:, 2:].mean()) < float(before[:, 2:].mean())


def test_a_release_with_one_spread_per_cell_is_a_release_of_its_own():
    """A kept release is reused only for the same settings: the kind of spread is one of them (the
    digests of one spread per class are those made before the choice existed)."""
    from medstylegan2.privacy.class_moments import moments_digest

    same = dict(run="r", fingerprint="f", num_classes=3, grid=8, noise_multiplier=5.0)
    assert moments_digest(**same) == moments_digest(**same, spread="class")
    assert moments_digest(**same, spread="cell") != moments_digest(**same)


def test_the_release_round_trips_and_a_malformed_state_is_named():
    images, labels = two_classes()
    m = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None)
    back = ClassMoments.from_state(m.to_state(), "site-0 guide file")
    assert torch.equal(back.means, m.means) and torch.equal(back.usable, m.usable)
    cells = release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None, spread="cell")
    back = ClassMoments.from_state(cells.to_state(), "site-0 guide file")
    assert back.per_cell and torch.equal(back.spreads, cells.spreads)
    with pytest.raises(CheckpointError, match="malformed"):
        ClassMoments.from_state(cells.to_state() | {"spreads": torch.zeros(2, 15)}, "site-0 guide file")
    broken = m.to_state() | {"means": torch.zeros(2, 5)}
    with pytest.raises(CheckpointError, match="site-0 guide file: the class-moments release is malformed"):
        ClassMoments.from_state(broken, "site-0 guide file")


# ----------------------------------------------------------------------------------------------
# G reads the release; it never leaves the site


def test_g_loss_adds_the_weighted_mismatch_and_the_release_never_leaves_the_site():
    cfg = smoke("train.class_moments_weight=5.0")
    data = generate_phantoms(4, cfg.model.resolution, seed=0)
    x, y = np.asarray(data.images), np.asarray(data.labels)
    trainer = SiteTrainer(cfg, x, y, device="cpu", class_moments=release_from_config(cfg, x, y, noise_multiplier=None))
    z, labels = torch.randn(6, cfg.model.z_dim), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(1)  # the same style mixing in both calls
    matched, stats = trainer.loss.generator_main(z, labels)
    moments, trainer.loss.class_moments = trainer.loss.class_moments, None
    torch.manual_seed(1)
    plain, _ = trainer.loss.generator_main(z, labels)
    assert float(stats["loss_g_moments"]) > 0
    assert float((matched - plain).detach()) == pytest.approx(5.0 * float(stats["loss_g_moments"]), rel=1e-4)
    trainer.loss.class_moments = moments
    trainer.train_steps(1)
    assert set(trainer.get_weights()) == {"G", "G_ema", "D"}  # what federation exchanges: no release


def test_a_site_without_dp_matches_its_exact_statistics():
    cfg = smoke(*MOMENTS)
    data = generate_phantoms(4, cfg.model.resolution, seed=0)
    x, y = np.asarray(data.images), np.asarray(data.labels)
    exact = release_class_moments(x, y, num_classes=3, grid=cfg.train.class_moments_grid, noise_multiplier=None)
    got = site_class_moments(cfg, x, y, None, device="cpu")
    assert torch.equal(got.means, exact.means) and torch.equal(got.spreads, exact.spreads)
    assert site_class_moments(smoke(), x, y, None, device="cpu") is None  # weight 0: off


# ----------------------------------------------------------------------------------------------
# The site's plan, budget and ledger count the release


def test_sigma_for_a_target_beside_a_fixed_release_meets_the_target_with_more_noise():
    alone = sigma_for(2.0, 1e-5, 0.01, 500, "rdp")
    beside = sigma_for(2.0, 1e-5, 0.01, 500, "rdp", also=[(SIGMA_M, 1.0, 1)])
    assert beside > alone
    assert 2.0 - 0.01 <= epsilon_of_history([(beside, 0.01, 500), (SIGMA_M, 1.0, 1)], 1e-5, "rdp") <= 2.0
    with pytest.raises(ValueError, match="alone reach epsilon"):
        sigma_for(0.5, 1e-5, 0.01, 500, "rdp", also=[(1.0, 1.0, 1)])


def test_the_planned_run_counts_the_moments_release_and_its_noise_has_the_sites_floor():
    request = dict(dp=True, local_steps=10, batch_size=10, planned_rounds=5, max_grad_norm=1.0, delta=1e-5)
    site = policy(epsilon_per_run=2.0, min_noise_multiplier=0.5)
    assert check_request(site, RoundRequest(**request, noise_multiplier=0.9)).ok
    refused = check_request(site, RoundRequest(**request, noise_multiplier=0.9, moments_noise=0.6))
    assert not refused.ok and "class moments' release at sigma 0.6" in refused.reason
    for noise, words in ((0.4, "below this site's floor"), (0.0, "gives no privacy"), (float("nan"), "no privacy")):
        decision = check_request(site, RoundRequest(**request, noise_multiplier=0.9, moments_noise=noise))
        assert not decision.ok and words in decision.reason
    # A target epsilon covers D's steps and the release together: more noise on D for the same epsilon.
    alone = check_request(site, RoundRequest(**request, target_epsilon=2.0)).settings
    both = check_request(site, RoundRequest(**request, target_epsilon=2.0, moments_noise=SIGMA_M)).settings
    assert both.noise_multiplier > alone.noise_multiplier and both.moments_noise == SIGMA_M
    unreachable = check_request(site, RoundRequest(**request, target_epsilon=2.0, moments_noise=0.6))
    assert not unreachable.ok and "cannot be met" in unreachable.reason


def test_a_dp_site_records_the_release_once_and_its_epsilon_composes_it(tmp_path, capsys):
    cfg = smoke(*DP, *MOMENTS, "federation.rounds=2")
    nodes = site_policies(tmp_path, cfg)
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    for site in ("site-0", "site-1"):
        entries = PrivacyLedger(ledger_of(tmp_path, site), None).entries()
        # Round 1: the release, then D's; round 2 reuses the release and spends only D's.
        assert [(e["round"], e["mechanism"]) for e in entries] == [
            (1, "class_moments"), (1, "discriminator"), (2, "discriminator")]
        release, d_round = entries[0], entries[1]
        assert (release["noise_multiplier"], release["sample_rate"], release["steps"]) == (SIGMA_M, 1.0, 1)
        assert release["max_grad_norm"] == pytest.approx(SENSITIVITY)
        q, steps = d_round["sample_rate"], d_round["steps"]
        reply = round_line(tmp_path / "run", 2)["sites"][site]
        expected = opacus_epsilon([(SIGMA_M, 1.0, 1), (SIGMA, q, 2 * steps)])
        assert reply["dp_epsilon"] == pytest.approx(expected, abs=1e-6)
        assert len(list((ledger_of(tmp_path, site) / MOMENTS_FOLDER).glob("*.pt"))) == 1
    # privacy-report --ledger shows how many releases were the class moments'.
    assert main(["privacy-report", "--ledger", str(ledger_of(tmp_path, "site-0"))]) == 0
    assert "| 3 (1) | 1,1,2 |" in capsys.readouterr().out


def test_a_release_that_would_pass_the_budget_declines_the_round_and_spends_nothing(tmp_path):
    cfg = smoke(*DP, "train.class_moments_weight=10.0", f"train.class_moments_noise={SIGMA}")
    nodes = site_policies(tmp_path, cfg, lifetime=8.0)  # one D round ~7 fits; with the release it does not
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    assert {s["status"] for s in round_line(tmp_path / "run")["sites"].values()} == {"declined"}
    for site in ("site-0", "site-1"):
        assert PrivacyLedger(ledger_of(tmp_path, site), None).entries() == []
        assert not (ledger_of(tmp_path, site) / MOMENTS_FOLDER).exists()


def test_a_kept_release_the_ledger_does_not_hold_is_refused(tmp_path):
    images, labels = two_classes(10)
    store = MomentsStore(tmp_path)
    store.save("abc", release_class_moments(images, labels, num_classes=2, grid=4, noise_multiplier=None),
               {"hash": "f" * 64})
    with pytest.raises(LedgerError, match="does not hold"):
        store.load("abc", [])
    with pytest.raises(LedgerError, match="does not hold"):  # the hash of another mechanism's entry
        store.load("abc", [{"hash": "f" * 64, "mechanism": "class_guide"}])
    assert store.load("abc", [{"hash": "f" * 64, "mechanism": "class_moments"}]).grid == 4
    assert store.load("absent", []) is None


def test_train_local_under_dp_plans_the_release_and_resumes_with_the_same_moments(tmp_path):
    from test_train_local import train

    out = tmp_path / "dp"
    dp = ["--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=null", "--set",
          "privacy.target_epsilon=8.0", "--set", "model.mbstd_group_size=0", "--set",
          "train.class_moments_weight=1.0", "--set", f"train.class_moments_noise={SIGMA_M}"]
    assert train(out, 2, *dp) == 0
    first = read_checkpoint(out / "checkpoint.pt")
    history = [tuple(h) for h in first["privacy"]["history"]]
    assert history[0] == (SIGMA_M, 1.0, 1) and sum(n for _, _, n in history) == 1 + 2  # the release, then D's
    # Sigma was planned for D's steps and the release together: the planned run spends the target.
    assert 8.0 - 0.01 <= epsilon_of_history(history, first["privacy"]["delta"], "rdp") <= 8.0
    assert train(out, 4, "--resume") == 0
    second = read_checkpoint(out / "checkpoint.pt")
    assert sum(n for _, _, n in second["privacy"]["history"]) == 1 + 4  # no second release
    assert torch.equal(first["class_moments"]["means"], second["class_moments"]["means"])


@pytest.mark.parametrize("override, key", [("train.class_moments_weight=-1", "train.class_moments_weight"),
                                           ("train.class_moments_grid=0", "train.class_moments_grid"),
                                           ("train.class_moments_grid=64", "train.class_moments_grid"),
                                           ("train.class_moments_noise=0", "train.class_moments_noise"),
                                           ("train.class_moments_noise=.inf", "train.class_moments_noise"),
                                           ("train.class_moments_spread=pixel", "train.class_moments_spread")])
def test_wrong_moments_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        smoke(override)
