"""Configuration: YAML in, typed dataclasses out, every mistake named by its dotted key (and its file);
files extend each other through ``base:``."""

from __future__ import annotations

import pytest

from medstylegan2.config import ConfigError, RunConfig, load_config, read_config_mapping


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and cfg.model.resolution == 64 and cfg.data.source == "phantoms"


def test_unknown_key_is_named_with_its_section_and_the_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.batchsize'.*allowed keys here: .*batch_size"):
        load_config(write(tmp_path, "train:\n  batchsize: 8\n"))


def test_value_outside_the_allowed_set_lists_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.arch' = 'biggan' is not allowed; use one of: stylegan2, dcgan"):
        load_config(write(tmp_path, "model:\n  arch: biggan\n"))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be an integer"):
        load_config(write(tmp_path, "train:\n  batch_size: sixteen\n"))


def test_exponent_numbers_without_a_dot_are_numbers_in_files_and_on_the_command_line(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; a float key takes it as the number it means.
    cfg = load_config(write(tmp_path, "privacy:\n  delta: 1e-5\n"), ["train.g_lr=2.5E-3"])
    assert cfg.privacy.delta == 1e-5 and cfg.train.g_lr == 0.0025
    with pytest.raises(ConfigError, match=r"'privacy.delta' must be a number"):
        load_config(None, ["privacy.delta=1e-5x"])


def test_resolution_must_be_a_power_of_two():
    with pytest.raises(ConfigError, match="model.resolution"):
        load_config(None, ["model.resolution=100"])


def test_metric_lists_and_the_fid_image_count_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"'metrics.final_metrics' has unknown metric 'fidd'; allowed: .*cas"):
        load_config(None, ["metrics.final_metrics=[fid, fidd]"])
    with pytest.raises(ConfigError, match=r"'metrics.fid_n_per_class' must be >= 2"):
        load_config(None, ["metrics.fid_n_per_class=1"])
    assert load_config("configs/default.yaml").metrics.fid_n_per_class == 50


def test_command_line_overrides_win_over_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lambda_ds: 2\n"), ["train.lambda_ds=0.5", "model.w_hpf=0"])
    assert cfg.train.lambda_ds == 0.5 and cfg.model.w_hpf == 0.0


def test_privacy_requires_minibatch_stddev_off():
    with pytest.raises(ConfigError, match="model.mbstd_group_size"):
        load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1.0"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


# -- base: ------------------------------------------------------------------------------------------


def test_base_is_a_path_relative_to_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "common.yaml").write_text("train:\n  batch_size: 8\n  lambda_ds: 2\n")
    (tmp_path / "runs").mkdir()
    derived = tmp_path / "runs" / "mine.yaml"
    derived.write_text("base: ../shared/common.yaml\ntrain:\n  lambda_ds: 0.5\n")
    monkeypatch.chdir(tmp_path / "shared")  # not where the derived file is
    cfg = load_config(derived)
    assert cfg.train.batch_size == 8 and cfg.train.lambda_ds == 0.5


def test_bases_nest_and_the_derived_file_wins_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nseed: 1\nmodel:\n  resolution: 32\n  z_dim: 16\n"
                                     "metrics:\n  metrics: [fd_domain, lpips]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nmodel:\n  z_dim: 24\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nmodel:\n  w_dim: 40\nmetrics:\n  metrics: [lpips]\n")
    cfg = load_config(tmp_path / "c.yaml", ["seed=3"])
    assert (cfg.name, cfg.seed) == ("b", 3)
    assert (cfg.model.resolution, cfg.model.z_dim, cfg.model.w_dim) == (32, 24, 40)
    assert cfg.metrics.metrics == ["lpips"]  # a list is replaced, not merged
    assert "base" not in read_config_mapping(tmp_path / "c.yaml")


def test_a_cycle_of_bases_is_an_error_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_an_unknown_key_in_a_base_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  batchsize: 8\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'train\.batchsize'"):
        load_config(tmp_path / "run.yaml")


def test_a_missing_or_malformed_base_names_the_file_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: 'base' names .*nope\.yaml, which is not a file"):
        load_config(write_named(tmp_path, "run.yaml", "base: nope.yaml\n"))
    with pytest.raises(ConfigError, match=r"run\.yaml: 'base' must be the path"):
        load_config(write_named(tmp_path, "run.yaml", "base: [a.yaml]\n"))


def write_named(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path



def test_every_shipped_config_loads_and_the_256_px_phantom_stand_in_has_covidqu_counts():
    from pathlib import Path

    from medstylegan2.study.config import load_study

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    # The study's file is a study config (arms over a run config) and the site policy a site's own
    # file: each is read by its own loader.
    import yaml

    from medstylegan2.privacy.policy import policy_from_mapping

    studies = [path for path in configs if path.stem == "study"]
    policies = [path for path in configs if path.stem == "site-policy"]
    assert studies and load_study(studies[0]).arms
    # The shipped policy leaves ledger_dir to the site (a simulation gives each site its own).
    raw = {**yaml.safe_load(policies[0].read_text()), "ledger_dir": "ledgers"}
    assert policies and policy_from_mapping(raw, where=str(policies[0])).dp_required
    loaded = {path.stem: load_config(path) for path in configs if path not in studies + policies}
    stand_in, real = loaded["covidqu-256-phantoms"], loaded["covidqu-256"]
    assert stand_in.model == real.model and stand_in.metrics == real.metrics
    total = 3 * stand_in.data.phantoms_per_class
    assert abs(total - 33_900) < 100 and stand_in.federation.sites == 4
    assert abs(total * (1 - stand_in.data.heldout_fraction) - 27_132) < 100  # COVID-QU-Ex Train + Val
