"""The class guide (privacy/class_guide.py): a classifier each site trains once on its own images,
under DP with DP-SGD whose steps the site's ledger records and composes into its epsilon, then
frozen as G's class loss. It never leaves the site, and a repeated round reuses it for free.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medstylegan2.classifier import predict
from medstylegan2.cli import main
from medstylegan2.config import load_config
from medstylegan2.errors import CheckpointError, ConfigError
from medstylegan2.losses import guide_weight_of
from medstylegan2.phantoms import generate_phantoms
from medstylegan2.privacy.class_guide import (GUIDE_FOLDER, GuideNoise, GuideStore, build_guide, guide_settings,
                                              guide_to_state, per_sample_gradients, train_class_guide)
from medstylegan2.privacy.ledger import LedgerError, PrivacyLedger
from medstylegan2.privacy.policy import SitePolicy
from medstylegan2.privacy.request import RoundRequest, check_request
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import SiteTrainer
from test_site_privacy import DP, SIGMA, ledger_of, opacus_epsilon, round_line, run, site_policies, smoke

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
GUIDE = ["train.class_guide_weight=1.0", "train.class_guide_steps=4"]


def phantoms(per_class: int, seed: int):
    data = generate_phantoms(per_class, 32, seed=seed)
    return np.asarray(data.images), np.asarray(data.labels)


def guide_kwargs(**changes):
    return {"num_classes": 3, "resolution": 32, "width": 8, "steps": 3, "batch_size": 16, "lr": 1e-2,
            "max_grad_norm": 1.0, **changes}


# ----------------------------------------------------------------------------------------------
# Training the guide


def test_the_guide_learns_the_classes_with_dp_sgd_on_held_out_phantoms():
    x, y = phantoms(100, seed=0)
    test_x, test_y = phantoms(30, seed=5)
    noise = GuideNoise(noise_multiplier=0.3, sample_rate=60 / len(y), expected_batch_size=60.0, seed=3)
    guide = train_class_guide(x, y, **guide_kwargs(width=16, steps=120, batch_size=60, lr=5e-3, max_grad_norm=5.0),
                              noise=noise)
    assert (predict(guide, test_x) == test_y).mean() > 0.8
    assert not any(p.requires_grad for p in guide.parameters()) and not guide.training


def test_dp_sgd_without_clipping_or_noise_is_full_batch_adam_and_noise_changes_it():
    """Sample rate 1, no noise, a clip no gradient reaches: DP-SGD's release is the mean gradient."""
    x, y = phantoms(4, seed=0)
    n = len(y)
    exact = GuideNoise(noise_multiplier=0.0, sample_rate=1.0, expected_batch_size=float(n), seed=1)
    dp = train_class_guide(x, y, **guide_kwargs(max_grad_norm=1e6), noise=exact, seed=0)

    torch.manual_seed(0)
    plain = build_guide(3, 32, 8)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    images = torch.as_tensor(x).float() / 127.5 - 1
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(images), torch.as_tensor(y)).backward()
        opt.step()
    for (name, a), b in zip(dp.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-4), name  # Adam after 3 steps of lr 1e-2

    noisy = train_class_guide(x, y, **guide_kwargs(max_grad_norm=1e6),
                              noise=GuideNoise(0.5, 1.0, float(n), seed=1), seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(noisy.state_dict().values(), dp.state_dict().values()))


def test_per_sample_gradients_are_each_images_own_and_an_empty_batch_gives_empty_ones():
    x, y = phantoms(2, seed=0)
    model = build_guide(3, 32, 8)
    images = torch.as_tensor(x).float() / 127.5 - 1
    grads = per_sample_gradients(model, images, torch.as_tensor(y))
    for i in (0, len(y) - 1):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images[i:i + 1]), torch.as_tensor(y[i:i + 1])).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-6), name
    empty = per_sample_gradients(model, images[:0], torch.as_tensor(y[:0]))
    assert all(g.shape[0] == 0 for g in empty.values())
    # A step on an empty Poisson batch is noise only, and still a step.
    train_class_guide(x, y, **guide_kwargs(steps=2), noise=GuideNoise(1.0, 1e-9, 8.0))


# ----------------------------------------------------------------------------------------------
# G reads it; it never leaves the site


def test_g_loss_adds_the_guides_cross_entropy_and_only_g_gets_gradients():
    cfg = smoke("train.class_guide_weight=2.0")
    x, y = phantoms(4, seed=0)
    guide = train_class_guide(x, y, **guide_kwargs())
    trainer = SiteTrainer(cfg, x, y, device="cpu", class_guide=guide)
    z = torch.randn(6, cfg.model.z_dim)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(1)  # the same style mixing in both calls
    with_guide, stats = trainer.loss.generator_main(z, labels)
    assert "loss_g_guide" in stats
    trainer.loss.guide_weight = 0.0
    torch.manual_seed(1)
    without, _ = trainer.loss.generator_main(z, labels)
    assert float((with_guide - without).detach()) == pytest.approx(2.0 * float(stats["loss_g_guide"]), rel=1e-4)
    # With a confidence: fakes the guide already calls their class with it get no push.
    trainer.loss.guide_weight, trainer.cfg.train.class_guide_confidence = 2.0, 0.5
    torch.manual_seed(1)
    capped, stats = trainer.loss.generator_main(z, labels)
    torch.manual_seed(1)
    fake = trainer.loss.generate(z, labels, fast=True)
    per_fake = torch.nn.functional.cross_entropy(guide(fake), labels, reduction="none")
    expected = (per_fake - np.log(2.0)).clamp(min=0).mean()
    assert float((capped - without).detach()) == pytest.approx(2.0 * float(expected), rel=1e-4, abs=1e-6)
    trainer.cfg.train.class_guide_confidence = None
    trainer.train_steps(1)
    assert all(p.grad is None for p in guide.parameters())
    assert set(trainer.get_weights()) == {"G", "G_ema", "D"}  # what federation exchanges: no guide


def test_the_guides_weight_follows_its_schedule_step_by_step():
    cfg = smoke("train.class_guide_weight=3.0", "train.class_guide_weight_end=0.5", "train.class_guide_decay_steps=4")
    x, y = phantoms(4, seed=0)
    trainer = SiteTrainer(cfg, x, y, device="cpu", class_guide=train_class_guide(x, y, **guide_kwargs()))
    seen = []
    for _ in range(6):
        trainer.train_steps(1)
        seen.append(trainer.loss.guide_weight)  # the weight the step just taken used
    assert seen == pytest.approx([3.0, 2.375, 1.75, 1.125, 0.5, 0.5])
    assert guide_weight_of(smoke("train.class_guide_weight=3.0").train, step=10**6) == 3.0  # no schedule: constant


# ----------------------------------------------------------------------------------------------
# The site's ledger composes it; the site's planning and budget count it


def policy(**changes) -> SitePolicy:
    from medstylegan2.privacy.policy import policy_from_mapping

    raw = {"dp_required": True, "delta": 1e-5, "max_grad_norm": 1.0, "nominal_size": 1000, "lifetime_epsilon": 50.0,
           "ledger_dir": "unused", **changes}
    return policy_from_mapping(raw, where="test-policy")


def test_the_planned_run_counts_the_guides_steps():
    request = dict(dp=True, local_steps=10, batch_size=10, planned_rounds=5, max_grad_norm=1.0, delta=1e-5)
    site = policy(epsilon_per_run=2.0)
    sigma = 0.9  # 50 D steps at q 0.01 stay under epsilon 2; with 400 guide steps they do not
    assert check_request(site, RoundRequest(**request, noise_multiplier=sigma)).ok
    refused = check_request(site, RoundRequest(**request, noise_multiplier=sigma, guide_steps=400))
    assert not refused.ok and "450 steps" in refused.reason
    # A target epsilon spreads over D's and the guide's steps: more noise for the same epsilon.
    alone = check_request(site, RoundRequest(**request, target_epsilon=2.0)).settings.noise_multiplier
    both = check_request(site, RoundRequest(**request, target_epsilon=2.0, guide_steps=400)).settings
    assert both.noise_multiplier > alone and both.guide_steps == 400


def test_a_dp_site_records_the_guide_once_and_its_epsilon_composes_both_mechanisms(tmp_path, capsys):
    cfg = smoke(*DP, *GUIDE, "federation.rounds=2")
    nodes = site_policies(tmp_path, cfg)
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    for site in ("site-0", "site-1"):
        entries = PrivacyLedger(ledger_of(tmp_path, site), None).entries()
        # Round 1: the guide's release, then D's; round 2 reuses the guide and spends only D's.
        assert [(e["round"], e["mechanism"], e["steps"]) for e in entries] == [
            (1, "class_guide", 4), (1, "discriminator", 3), (2, "discriminator", 3)]
        q = entries[0]["sample_rate"]
        assert entries[0]["noise_multiplier"] == SIGMA and entries[1]["sample_rate"] == q
        reply = round_line(tmp_path / "run", 2)["sites"][site]
        assert reply["dp_epsilon"] == pytest.approx(opacus_epsilon([(SIGMA, q, 4), (SIGMA, q, 6)]), abs=1e-6)
        guides = list((ledger_of(tmp_path, site) / GUIDE_FOLDER).glob("*.pt"))
        assert len(guides) == 1
    # privacy-report --ledger shows which steps were the guide's.
    assert main(["privacy-report", "--ledger", str(ledger_of(tmp_path, "site-0"))]) == 0
    assert "| 3 (0) | 1,1,2 | 10 (4) |" in capsys.readouterr().out
    # A new run trains (and records) its own guide.
    run(smoke(*DP, *GUIDE), nodes, tmp_path / "again", tmp_path / "state-2")
    entries = PrivacyLedger(ledger_of(tmp_path, "site-0"), None).entries()
    assert [e["mechanism"] for e in entries[3:]] == ["class_guide", "discriminator"]


def test_a_guide_that_would_pass_the_budget_declines_the_round_and_spends_nothing(tmp_path):
    cfg = smoke(*DP, *GUIDE, "train.class_guide_steps=60")
    nodes = site_policies(tmp_path, cfg, lifetime=8.0)  # one D round ~7; with 60 guide steps more
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    assert {s["status"] for s in round_line(tmp_path / "run")["sites"].values()} == {"declined"}
    for site in ("site-0", "site-1"):
        assert PrivacyLedger(ledger_of(tmp_path, site), None).entries() == []
        assert not (ledger_of(tmp_path, site) / GUIDE_FOLDER).exists()


def test_a_kept_guide_the_ledger_does_not_hold_is_refused(tmp_path):
    settings = guide_settings(smoke(*GUIDE))
    guide = build_guide(3, 32, settings["width"])
    store = GuideStore(tmp_path)
    store.save("abc", guide, settings, {"hash": "f" * 64})
    with pytest.raises(LedgerError, match="does not hold"):
        store.load("abc", settings, [])
    other = dict(settings, steps=settings["steps"] + 1)
    entry = {"hash": "f" * 64, "mechanism": "class_guide"}
    with pytest.raises(CheckpointError, match="other settings"):
        store.load("abc", other, [entry])
    assert store.load("abc", settings, [entry]) is not None
    assert store.load("absent", settings, [entry]) is None


def test_a_ledger_entry_of_an_unknown_mechanism_is_an_error(tmp_path):
    cfg = smoke(*DP)
    nodes = site_policies(tmp_path, cfg)
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    path = ledger_of(tmp_path, "site-0") / "ledger.jsonl"
    entry = json.loads(path.read_text().splitlines()[0])
    assert entry["mechanism"] == "discriminator"
    path.write_text(json.dumps({**entry, "mechanism": "telepathy"}) + "\n")
    with pytest.raises(LedgerError, match="unknown mechanism 'telepathy'"):
        PrivacyLedger(ledger_of(tmp_path, "site-0"), None).entries()


# ----------------------------------------------------------------------------------------------
# Without DP, in train-local, and wrong settings


def test_a_site_without_dp_trains_its_guide_once_and_keeps_it_in_its_local_state(tmp_path, monkeypatch):
    import medstylegan2.privacy.class_guide as class_guide

    trained = []
    real = class_guide.train_class_guide
    monkeypatch.setattr(class_guide, "train_class_guide", lambda *a, **k: trained.append(1) or real(*a, **k))
    cfg = smoke(*GUIDE)
    run(cfg, [{"partition-id": i, "num-partitions": 2} for i in range(2)], tmp_path / "run", tmp_path / "state")
    assert len(trained) == 2  # one per site, in round 1; round 2 took it from the local state
    assert all(s["status"] == "ok" for s in round_line(tmp_path / "run", 2)["sites"].values())


def test_train_local_under_dp_counts_the_guides_steps_and_resumes_with_the_same_guide(tmp_path):
    from test_train_local import train

    out = tmp_path / "dp"
    dp = ["--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=1.0", "--set",
          "model.mbstd_group_size=0", "--set", "train.class_guide_weight=1.0", "--set", "train.class_guide_steps=5"]
    assert train(out, 2, *dp) == 0
    first = read_checkpoint(out / "checkpoint.pt")
    assert sum(n for _, _, n in first["privacy"]["history"]) == 5 + 2  # the guide's steps, then D's
    assert train(out, 4, "--resume") == 0
    second = read_checkpoint(out / "checkpoint.pt")
    assert sum(n for _, _, n in second["privacy"]["history"]) == 5 + 4  # no second guide
    for key, value in first["class_guide"]["weights"].items():
        assert torch.equal(value, second["class_guide"]["weights"][key])


@pytest.mark.parametrize("override, key", [("train.class_guide_steps=0", "train.class_guide_steps"),
                                           ("train.class_guide_weight=-1", "train.class_guide_weight"),
                                           ("train.class_guide_lr=0", "train.class_guide_lr"),
                                           ("train.class_guide_confidence=1.0", "train.class_guide_confidence"),
                                           ("train.class_guide_confidence=0.0", "train.class_guide_confidence"),
                                           ("train.class_guide_weight_end=-0.1", "train.class_guide_weight_end"),
                                           ("train.class_guide_decay_steps=0", "train.class_guide_decay_steps")])
def test_wrong_guide_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        smoke(override)
