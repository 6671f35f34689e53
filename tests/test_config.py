"""Configuration: YAML in, typed dataclasses out, every mistake named by its dotted key."""

from __future__ import annotations

import pytest

from medstylegan2.config import ConfigError, RunConfig, load_config


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


def test_resolution_must_be_a_power_of_two():
    with pytest.raises(ConfigError, match="model.resolution"):
        load_config(None, ["model.resolution=100"])


def test_command_line_overrides_win_over_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lambda_ds: 2\n"), ["train.lambda_ds=0.5", "model.w_hpf=0"])
    assert cfg.train.lambda_ds == 0.5 and cfg.model.w_hpf == 0.0


def test_privacy_requires_minibatch_stddev_off():
    with pytest.raises(ConfigError, match="model.mbstd_group_size"):
        load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1.0"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")
