"""The privacy-utility study: its config, the study.json contract, and a tiny study end to end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from medstylegan2.config import ConfigError, load_config
from medstylegan2.study.config import arm_overrides, load_study, public_overrides, updates_of
from medstylegan2.study.report import CONTRACT_KEYS, validate_study_json
from simulation.study import public_pretraining_digest

REPO = Path(__file__).resolve().parents[1]


def tiny_study(tmp_path: Path, *, dp_arm: bool = True) -> Path:
    arms = {"central": {"sites": 1}}
    if dp_arm:
        arms["dp-eps10"] = {"sites": 2, "epsilon": 10.0, "public_init": True}
    doc = {
        "base_config": str(REPO / "configs" / "smoke.yaml"),
        "overrides": ["model.d_class_head=true", "metrics.metrics=[fd_domain]", "metrics.n_per_class=4"],
        "public": {"data_seed": 777, "per_class": 8},
        "profiles": {"quick": {"total_updates": 16, "rounds": 2, "n_per_class": 6, "classifier_steps": 5,
                               "public_steps": 2, "seeds": [0]}},
        "arms": arms,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(doc))
    return path


def test_study_config_splits_compute_equally_over_sites(tmp_path):
    study = load_study(tiny_study(tmp_path))
    central = arm_overrides(study, "quick", "central", seed=0)
    dp = arm_overrides(study, "quick", "dp-eps10", seed=0)
    assert "federation.local_steps=4" in central and "federation.sites=1" in central
    assert "federation.local_steps=2" in dp and "federation.sites=2" in dp
    doc = json.loads((tmp_path / "study.yaml").read_text())
    doc["arms"]["dp-eps10"]["overrides"] = ["train.d_steps_per_g=3"]
    (tmp_path / "study.yaml").write_text(json.dumps(doc))
    study = load_study(tmp_path / "study.yaml")
    dp = arm_overrides(study, "quick", "dp-eps10", seed=0)
    assert dp[-1] == "federation.local_steps=1"  # 16 updates / (2 sites x 2 rounds x (1 + 3))
    doc["profiles"]["quick"]["total_updates"] = 64
    doc["arms"]["dp-eps10"]["overrides"] = ["train.g_steps_per_d=3"]
    (tmp_path / "study.yaml").write_text(json.dumps(doc))
    study = load_study(tmp_path / "study.yaml")
    dp = arm_overrides(study, "quick", "dp-eps10", seed=0)
    assert dp[-1] == "federation.local_steps=4"  # 64 updates / (2 sites x 2 rounds x (3 + 1))
    assert updates_of(load_config(study.base_config_path, dp)) == 64
    cfg = load_config(study.base_config_path, dp)
    assert cfg.privacy.enabled and cfg.privacy.delta == 1e-5 and cfg.privacy.target_epsilon == 10.0


def test_an_arm_with_larger_batches_can_take_a_share_of_the_updates(tmp_path):
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["profiles"]["quick"]["total_updates"] = 64
    doc["arms"]["dp-eps10"]["update_fraction"] = 0.25
    path.write_text(json.dumps(doc))
    study = load_study(path)
    assert arm_overrides(study, "quick", "central", seed=0)[-1] == "federation.local_steps=16"
    assert arm_overrides(study, "quick", "dp-eps10", seed=0)[-1] == "federation.local_steps=2"  # 16 / (2 x 2 x 2)
    doc["arms"]["dp-eps10"]["update_fraction"] = 1.5
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="arms.dp-eps10.update_fraction"):
        load_study(path)


def test_a_per_site_arm_gives_each_site_the_steps_a_one_site_arm_takes(tmp_path):
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["profiles"]["quick"]["total_updates"] = 64
    doc["arms"]["dp-eps10"].update(sites=2, compute="per_site")
    path.write_text(json.dumps(doc))
    study = load_study(path)
    assert arm_overrides(study, "quick", "central", seed=0)[-1] == "federation.local_steps=16"
    assert arm_overrides(study, "quick", "dp-eps10", seed=0)[-1] == "federation.local_steps=16"
    doc["arms"]["dp-eps10"]["compute"] = "per_hospital"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="arms.dp-eps10.compute"):
        load_study(path)


def test_the_public_pretraining_trains_all_of_d_without_dp_at_its_own_batch(tmp_path):
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["arms"]["dp-eps10"]["overrides"] = ["train.batch_size=8", "train.d_frozen=[blocks]"]
    doc["public"]["batch_size"] = 2
    path.write_text(json.dumps(doc))
    study = load_study(path)
    cfg = load_config(study.base_config_path, public_overrides(study, "quick", "dp-eps10"))
    assert not cfg.privacy.enabled and cfg.train.init_checkpoint is None
    assert cfg.train.d_frozen == [] and cfg.train.batch_size == 2
    doc["public"]["batch_size"] = None
    path.write_text(json.dumps(doc))
    cfg = load_config(study.base_config_path, public_overrides(load_study(path), "quick", "dp-eps10"))
    assert cfg.train.batch_size == 8


def test_the_public_pretraining_ignores_the_arms_private_only_class_choices(tmp_path):
    """No class guide on the one-class public set, D's class term and G's diversity term at the recipe's
    weights, G's updates per D update at the recipe's, no class moments: arms that differ only in
    these share one pretraining."""
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["arms"]["dp-eps10"]["overrides"] = ["train.class_guide_weight=3.0", "train.class_loss_weight=0.0",
                                            "train.lambda_ds=4.0", "train.ds_decay_steps=1000000",
                                            "train.class_moments_weight=30.0", "train.class_moments_noise=10.0",
                                            "train.class_moments_spread=cell", "train.g_steps_per_d=2",
                                            "train.g_batch_size=4", "train.public_real_weight=2.0"]
    path.write_text(json.dumps(doc))
    study = load_study(path)
    (tmp_path / "plain").mkdir()
    plain = load_study(tiny_study(tmp_path / "plain"))
    private = load_config(study.base_config_path, arm_overrides(study, "quick", "dp-eps10", seed=0)).train
    public = load_config(study.base_config_path, public_overrides(study, "quick", "dp-eps10")).train
    recipe = load_config(study.base_config_path, doc["overrides"]).train
    assert (private.class_guide_weight, private.class_loss_weight) == (3.0, 0.0)
    assert (public.class_guide_weight, public.class_loss_weight) == (0.0, recipe.class_loss_weight)
    assert (private.lambda_ds, private.ds_decay_steps) == (4.0, 1000000)
    assert (public.lambda_ds, public.ds_decay_steps) == (recipe.lambda_ds, recipe.ds_decay_steps)
    assert (private.class_moments_weight, private.class_moments_noise) == (30.0, 10.0)
    assert (public.class_moments_weight, public.class_moments_noise) == (0.0, recipe.class_moments_noise)
    assert (private.class_moments_spread, public.class_moments_spread) == ("cell", recipe.class_moments_spread)
    assert (private.g_steps_per_d, private.g_batch_size) == (2, 4)
    assert (public.g_steps_per_d, public.g_batch_size) == (recipe.g_steps_per_d, recipe.g_batch_size)
    assert (private.public_real_weight, public.public_real_weight) == (2.0, recipe.public_real_weight)
    assert (public_pretraining_digest(study, "quick", "dp-eps10")
            == public_pretraining_digest(plain, "quick", "dp-eps10"))


def test_a_warm_started_arm_trains_its_public_term_on_the_pretrainings_public_set(tmp_path):
    study = load_study(tiny_study(tmp_path))
    data = load_config(study.base_config_path, arm_overrides(study, "quick", "dp-eps10", seed=0)).data
    assert (data.public_normals, data.public_seed) == (8, 777)  # the study's public: per_class, data_seed


def test_an_arms_class_push_decays_to_zero_over_its_share_of_each_sites_steps(tmp_path):
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["profiles"]["quick"]["total_updates"] = 64
    doc["arms"]["central"]["class_decay"] = 0.25
    doc["arms"]["dp-eps10"].update(class_decay=0.5, overrides=["train.class_guide_weight=3.0",
                                                               "train.d_class_loss_weight=3.0"])
    path.write_text(json.dumps(doc))
    study = load_study(path)
    central = load_config(study.base_config_path, arm_overrides(study, "quick", "central", seed=0)).train
    assert (central.class_loss_weight_end, central.class_loss_decay_steps) == (0.0, 8)  # 0.25 x 2 rounds x 16 steps
    assert central.class_guide_weight_end is None  # no guide in this arm: nothing to schedule
    dp = load_config(study.base_config_path, arm_overrides(study, "quick", "dp-eps10", seed=0)).train
    assert (dp.class_guide_weight_end, dp.class_guide_decay_steps) == (0.0, 8)  # 0.5 x 2 rounds x 8 steps
    assert (dp.class_loss_weight_end, dp.class_loss_decay_steps) == (0.0, 8)
    public = load_config(study.base_config_path, public_overrides(study, "quick", "dp-eps10")).train
    recipe = load_config(study.base_config_path, doc["overrides"]).train
    assert (public.class_loss_weight_end, public.class_guide_weight_end) == (None, None)
    assert public.d_class_loss_weight is None  # D's held class weight is the arm's choice, not the pretraining's
    assert public.class_loss_decay_steps == recipe.class_loss_decay_steps  # the public digest does not move
    doc["arms"]["central"]["class_decay"] = 0.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="arms.central.class_decay"):
        load_study(path)


def test_study_config_rejects_delta_above_1e5_and_unknown_keys(tmp_path):
    path = tiny_study(tmp_path)
    doc = json.loads(path.read_text())
    doc["arms"]["dp-eps10"]["delta"] = 1e-4
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="arms.dp-eps10.delta"):
        load_study(path)
    doc["arms"]["dp-eps10"]["delta"] = 1e-6
    doc["arms"]["dp-eps10"]["epsilonn"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="epsilonn"):
        load_study(path)


def test_study_json_validator_flags_missing_and_extra_keys():
    good = {"profile": "quick", "arms": {"central": {"checkpoint": "central/seed-0/round_002.pt", "epsilon": None,
                                                     "cas": 0.9, "tstr_relative": 0.95, "fd_domain": 3.0,
                                                     "lpips_diversity": 0.2, "minutes": 1.5}}}
    assert validate_study_json(good) == []
    bad = json.loads(json.dumps(good))
    del bad["arms"]["central"]["cas"]
    assert validate_study_json(bad)
    bad = json.loads(json.dumps(good))
    bad["arms"]["central"]["checkpoint"] = "/abs/path.pt"
    assert validate_study_json(bad)


def test_shipped_study_config_is_valid():
    study = load_study(REPO / "configs" / "study.yaml")
    assert {"central", "fed-iid", "fed-noniid", "dp-eps10", "dp-eps1"} <= set(study.arms)
    assert {"quick", "full"} <= set(study.profiles)
    assert all(a.delta <= 1e-5 for a in study.arms.values() if a.epsilon is not None)


@pytest.mark.slow
def test_tiny_study_runs_end_to_end_and_resumes_without_retraining(tmp_path, caplog):
    from simulation.study import run_study

    from medstylegan2.privacy.site import SIMULATED_POLICIES_ENV

    config, out = tiny_study(tmp_path), tmp_path / "study"
    before = os.environ.get(SIMULATED_POLICIES_ENV)
    caplog.set_level(logging.INFO, logger="medstylegan2.study")
    doc = run_study(config, out, profile="quick")
    # The public pretraining (minutes of CPU work in the real profiles) reports its progress.
    assert any("public pretraining: step 2 / 2" in r.getMessage() for r in caplog.records)
    assert validate_study_json(doc) == []
    # The DP arm's simulated site policies were named in this process's environment only while it ran.
    assert os.environ.get(SIMULATED_POLICIES_ENV) == before
    assert set(doc["arms"]) == {"central", "dp-eps10"}
    assert doc["arms"]["central"]["epsilon"] is None
    assert 0 < doc["arms"]["dp-eps10"]["epsilon"] <= 10.0
    for arm in doc["arms"].values():
        assert set(arm) == set(CONTRACT_KEYS)
        assert (out / arm["checkpoint"]).is_file()
    for name in ("study.md", "utility.png", "arms.png"):
        assert (out / name).is_file()
    assert (out / "public-pretrain").is_dir()

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    again = run_study(config, out, profile="quick", simulate_fn=must_not_train)
    assert again == doc

    # An arm killed after round 1 (its round-2 checkpoint and result gone) resumes, not restarts.
    (out / "central" / "seed-0" / "arm.json").unlink()
    (out / "central" / "seed-0" / "round_002.pt").unlink()
    calls = []

    def record(config_path, overrides, *, run_dir, resume):
        calls.append((Path(run_dir).name, resume))
        return run_dir

    run_study(config, out, profile="quick", arms=["central"], simulate_fn=record)
    assert calls == [("seed-0", True)]
    assert (out / "central" / "seed-0" / "arm.json").is_file()


def test_a_moved_study_folder_keeps_its_finished_arms(tmp_path):
    """A study folder copied elsewhere (e.g. to shared storage) and run there again retrains
    nothing, though its DP arm's warm start now lies elsewhere; so does an arm recorded when the
    warm start counted by its absolute path, but only with the same public pretraining."""
    import shutil

    import simulation.study as study_cmd
    from medstylegan2.errors import UserError

    config, first = tiny_study(tmp_path), tmp_path / "first"
    doc = study_cmd.run_study(config, first, profile="quick", arms=["dp-eps10"])

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    moved = tmp_path / "moved"
    shutil.move(first, moved)
    assert study_cmd.run_study(config, moved, profile="quick", arms=["dp-eps10"], simulate_fn=must_not_train) == doc

    # As earlier code recorded the arm: its digest over the warm start's absolute path where it ran.
    marker = moved / "dp-eps10" / "seed-0" / "arm.json"
    settings = json.loads((marker.parent / "study-settings.json").read_text())
    assert any(o.startswith("train.init_checkpoint=" + str(first)) for o in settings["overrides"])
    location_free = json.loads(marker.read_text())["digest"]
    earlier = study_cmd._config_digest(load_study(config), "quick", settings["overrides"], relative_to=None)
    assert earlier != location_free
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "digest": earlier}))
    again = tmp_path / "again"
    shutil.move(moved, again)
    assert study_cmd.run_study(config, again, profile="quick", arms=["dp-eps10"], simulate_fn=must_not_train) == doc
    marker = again / "dp-eps10" / "seed-0" / "arm.json"
    assert json.loads(marker.read_text())["digest"] == location_free  # recorded afresh

    # A warm start from another pretraining (another folder name) is other settings.
    other = [o.replace(f"/{Path(o).parent.name}/", "/0000000000000000/") if o.startswith("train.init_checkpoint=")
             else o for o in settings["overrides"]]
    (marker.parent / "study-settings.json").write_text(json.dumps({**settings, "overrides": other}))
    foreign = study_cmd._config_digest(load_study(config), "quick", other, relative_to=None)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "digest": foreign}))
    with pytest.raises(UserError, match="other settings"):
        study_cmd.run_study(config, again, profile="quick", arms=["dp-eps10"], simulate_fn=must_not_train)


def test_arm_killed_before_its_first_checkpoint_restarts_clean(tmp_path, monkeypatch):
    import simulation.study as study_cmd

    config, out = tiny_study(tmp_path, dp_arm=False), tmp_path / "study"
    leftover = out / "central" / "seed-0" / "site_state" / "junk"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("from a killed run")
    calls = []

    def stop_before_training(config_path, overrides, *, run_dir, resume):
        calls.append(resume)
        assert not leftover.exists()
        raise KeyboardInterrupt  # as if killed before any round finished

    with pytest.raises(KeyboardInterrupt):
        study_cmd.run_study(config, out, profile="quick", simulate_fn=stop_before_training)
    assert calls == [False]


def test_a_round_in_which_a_site_failed_is_dropped_so_the_arm_resumes_before_it(tmp_path):
    from medstylegan2.errors import UserError
    from simulation.study import _drop_failed_rounds, declined_site_rounds, failed_rounds

    lines = [{"round": 1, "kind": "round", "sites": {"site-0": {"status": "ok"}}},
             {"round": 2, "kind": "round", "sites": {"site-0": {"status": "error: worker killed (out of memory)"}}},
             {"round": 2, "kind": "eval"},
             {"round": 3, "kind": "round", "sites": {"site-0": {"status": "declined"}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for r in (1, 2, 3):
        (tmp_path / f"round_{r:03d}.pt").write_bytes(b"x")
    assert failed_rounds(tmp_path) == [2]
    assert declined_site_rounds(tmp_path) == 1
    with pytest.raises(UserError, match="round\\(s\\) 2"):
        _drop_failed_rounds(tmp_path, "central", 0)
    assert sorted(p.name for p in tmp_path.glob("round_*.pt")) == ["round_001.pt"]


def test_an_arms_minutes_count_every_round_once_even_across_a_kill(tmp_path):
    """The training time is the rounds' own times in metrics.jsonl: a run killed after round 2 and
    resumed counts rounds 1-2 of the first attempt too; a round run twice counts its last attempt;
    rounds past the evaluated checkpoint and evaluation lines do not count."""
    from simulation.study import training_seconds

    lines = [{"round": 1, "kind": "round", "seconds": 60.0},
             {"round": 2, "kind": "round", "seconds": 70.0},
             {"round": 3, "kind": "round", "seconds": 999.0},   # its checkpoint was lost in the kill
             {"round": 3, "kind": "round", "seconds": 80.0},    # run again after the resume
             {"round": 3, "kind": "eval", "seconds": 500.0},
             {"round": 4, "kind": "round", "seconds": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert training_seconds(tmp_path, 3) == pytest.approx(210.0)
    assert training_seconds(tmp_path / "missing", 3) == 0.0


def test_study_md_shows_each_arms_declined_site_rounds():
    """A reader of study.md sees when an arm got less than its compute (sites declined rounds)."""
    from medstylegan2.study.report import study_table

    arm = {"epsilon": 10.0, "cas": 0.9, "tstr_relative": 0.8, "fd_domain": 2.0, "lpips_diversity": 0.04,
           "minutes": 50.0}
    details = {"dp-eps10": {"cas_per_class": {"Normal": 1.0, "COVID-19": 0.9, "Non-COVID": 0.8}, "seeds": 2,
                            "declined_site_rounds": 2},
               "dp-eps1": {"cas_per_class": {"Normal": 1.0, "COVID-19": 0.9, "Non-COVID": 0.8}, "seeds": 2,
                           "declined_site_rounds": 0}}
    table = study_table("quick", {"dp-eps10": arm, "dp-eps1": arm}, details)
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert header.rstrip(" |").endswith("declined")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| dp-")}
    assert rows["dp-eps10"].rstrip(" |").endswith("| 2")
    assert rows["dp-eps1"].rstrip(" |").endswith("| 0")
