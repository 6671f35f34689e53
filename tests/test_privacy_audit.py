"""The membership-inference audit: ROC, AUC and TPR at low FPR on planted scores, chance level on
random scores, the (epsilon, delta) bound, the attacks on planted models, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from medstylegan2.cli import main
from medstylegan2.images import ImageSet, write_image_folder
from medstylegan2.privacy.audit import (attack_summary, black_box_scores, dp_auc_bound, dp_tpr_bound, roc_auc,
                                         roc_curve, tpr_at_fpr, white_box_scores)


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


# -- ROC statistics -------------------------------------------------------------------------------------


def test_planted_scores_give_the_hand_computed_auc_and_tpr_at_low_fpr():
    non_members = np.arange(1000, dtype=float)  # 0 .. 999
    members = np.r_[np.full(30, 2000.0), np.full(20, 995.0), np.full(50, -1.0)]
    summary = attack_summary(members, non_members)
    # At threshold 995, 5 non-members (995..999) are above or tied: FPR 0.5% <= 1%, TPR 50/100.
    assert summary["tpr_at_fpr"]["0.01"] == 0.5
    # At FPR <= 0.1% only the threshold 2000 or 999 qualifies: TPR 30/100.
    assert summary["tpr_at_fpr"]["0.001"] == 0.3
    # AUC: 30 members beat all 1000; 20 beat 995 and tie one; 50 beat none.
    assert summary["auc"] == pytest.approx((30 * 1000 + 20 * 995.5) / (100 * 1000), abs=1e-12)
    assert summary["auc"] == pytest.approx(mann_whitney_auc(members, non_members), abs=1e-12)


def test_random_scores_are_at_chance_and_separated_scores_are_perfect():
    rng = np.random.default_rng(0)
    summary = attack_summary(rng.normal(size=3000), rng.normal(size=3000))
    assert abs(summary["auc"] - 0.5) < 0.03
    # Hanley-McNeil at chance equals the Mann-Whitney null: sqrt((m + n + 1) / (12 m n)).
    assert summary["auc_stderr"] == pytest.approx(np.sqrt(6001 / (12 * 3000**2)), rel=0.05)
    assert summary["tpr_at_fpr"]["0.01"] < 0.03 and summary["tpr_at_fpr"]["0.001"] < 0.01
    perfect = attack_summary(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert perfect["auc"] == 1.0 and perfect["advantage"] == 1.0


def test_ties_count_half_and_low_fpr_needs_enough_non_members():
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 200).astype(float), rng.integers(0, 4, 150).astype(float)
    fpr, tpr, thresholds = roc_curve(pos, neg)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.isinf(thresholds[0])
    assert roc_auc(fpr, tpr) == pytest.approx(mann_whitney_auc(pos, neg), abs=1e-12)
    summary = attack_summary(pos, neg)
    assert summary["tpr_at_fpr"]["0.01"] is not None and summary["tpr_at_fpr"]["0.001"] is None
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0
    with pytest.raises(ValueError, match="finite"):
        roc_curve(np.array([np.nan]), np.array([0.0]))


def test_the_dp_bound_is_both_hypothesis_testing_inequalities():
    fpr = np.linspace(0, 1, 101)
    eps, delta = 1.0, 1e-5
    bound = dp_tpr_bound(fpr, eps, delta)
    assert np.all(bound <= np.exp(eps) * fpr + delta + 1e-12)
    assert np.all(1 - fpr <= np.exp(eps) * (1 - bound) + delta + 1e-9)
    assert bound[0] == pytest.approx(delta) and bound[-1] == 1.0
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)  # epsilon 0: no test beats chance
    assert 0.5 < dp_auc_bound(1.0, 1e-5) < dp_auc_bound(3.0, 1e-5) < 1.0
    assert np.all(dp_tpr_bound(fpr, float("inf"), delta) == 1.0)


# -- the attacks on planted models -------------------------------------------------------------------------


class BrightnessD(nn.Module):
    """A 'discriminator' whose logit is the image's mean brightness: it 'remembers' bright images."""

    mbstd_group_size = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) + 0 * labels.unsqueeze(1)


def test_white_box_finds_members_a_planted_discriminator_scores_higher():
    rng = np.random.default_rng(0)
    members = rng.integers(128, 256, (40, 1, 8, 8), dtype=np.uint8)
    non_members = rng.integers(0, 128, (60, 1, 8, 8), dtype=np.uint8)
    D = BrightnessD()
    pos = white_box_scores(D, members, np.zeros(40, dtype=np.int64), batch_size=7)
    neg = white_box_scores(D, non_members, np.zeros(60, dtype=np.int64))
    assert attack_summary(pos, neg)["auc"] == pytest.approx(1.0, abs=1e-12)
    assert pos.shape == (40,)


def test_black_box_finds_members_a_generator_copied():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    non_members = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(30) % 3
    # A generator that copies every member, among unrelated images: members are at distance 0.
    generated = np.concatenate([members, rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)])
    gen_labels = np.r_[labels, np.arange(60) % 3]
    pos = black_box_scores(members, labels, generated, gen_labels)
    neg = black_box_scores(non_members, labels, generated, gen_labels)
    assert np.all(pos == 0) and np.all(neg < 0)
    assert attack_summary(pos, neg)["auc"] == pytest.approx(1.0, abs=1e-12)
    # Same class only: a copy filed under another class does not count.
    assert np.all(black_box_scores(members, labels, generated, (gen_labels + 1) % 3) < 0)


# -- the command ---------------------------------------------------------------------------------------------


def test_audit_privacy_writes_json_and_png_for_a_run(tmp_path, tiny_config, capsys):
    from medstylegan2.trainer import SiteTrainer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (18, 1, 16, 16), dtype=np.uint8)
    labels = np.arange(18) % 3
    trainer = SiteTrainer(tiny_config, images[:9], labels[:9], device="cpu")
    trainer.train_steps(2)
    run_dir = tmp_path / "run"
    trainer.save_checkpoint(run_dir / "checkpoint.pt")
    write_image_folder(ImageSet(images[:9], labels[:9]), tmp_path / "members")
    write_image_folder(ImageSet(images[9:], labels[9:]), tmp_path / "non_members")

    argv = ["audit-privacy", str(run_dir), "--members", str(tmp_path / "members"), "--non-members",
            str(tmp_path / "non_members"), "--samples-per-class", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| white_box_discriminator |" in out and "| black_box_generator_pixel |" in out
    report = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert report["members"]["n"] == 9 and report["non_members"]["n"] == 9
    assert report["privacy"] == {"dp": False, "epsilon": None, "delta": None,
                                 "source": "the run was trained without differential privacy: no bound"}
    for attack in ("white_box_discriminator", "black_box_generator_pixel"):
        assert 0.0 <= report["attacks"][attack]["auc"] <= 1.0
        assert report["attacks"][attack]["tpr_at_fpr"] == {"0.01": None, "0.001": None}  # 9 non-members
    assert (run_dir / "audit" / "audit.png").read_bytes()[:4] == b"\x89PNG"

    # With a bound: given on the command line; and members that are also non-members are refused.
    assert main(argv + ["--epsilon", "2", "--delta", "1e-5", "--out", str(tmp_path / "with_bound")]) == 0
    bounded = json.loads((tmp_path / "with_bound" / "audit.json").read_text())
    assert bounded["bound"]["auc_max"] == pytest.approx(dp_auc_bound(2.0, 1e-5))
    assert "max_excess_over_bound" in bounded["attacks"]["white_box_discriminator"]
    # ... or from a site's lifetime ledger.
    from medstylegan2.privacy.ledger import PrivacyLedger, Release

    ledger = PrivacyLedger(tmp_path / "ledger", "f" * 64)
    ledger.record_release(Release("r", 1, 1.0, 0.05, 100, "rdp", "image", 1.0, 1e-5))
    assert main(argv + ["--ledger", str(tmp_path / "ledger"), "--out", str(tmp_path / "from_ledger")]) == 0
    from_ledger = json.loads((tmp_path / "from_ledger" / "audit.json").read_text())
    assert from_ledger["privacy"]["epsilon"] == pytest.approx(ledger.lifetime_epsilon(1e-5))
    assert from_ledger["privacy"]["source"].startswith("lifetime ledger")
    capsys.readouterr()
    assert main(["audit-privacy", str(run_dir), "--members", str(tmp_path / "members"), "--non-members",
                 str(tmp_path / "members")]) == 2
    assert "appear in both --members and --non-members" in capsys.readouterr().err
