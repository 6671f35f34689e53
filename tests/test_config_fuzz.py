"""Config fuzz: random YAML documents and random ``--set`` values at the loader.

Whatever comes in, the only error that may come out is ``ConfigError``, and its message names the
key (or the file, when the document as a whole is not a config).
"""

from __future__ import annotations

import dataclasses
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medstylegan2.config import ConfigError, RunConfig, load_config

SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
KEYS = []
for _section in ("model", "train", "data", "federation", "privacy", "metrics"):
    _cls = typing.get_type_hints(RunConfig)[_section]
    KEYS += [f"{_section}.{f.name}" for f in dataclasses.fields(_cls)]
KEYS += ["name", "out_dir", "seed", "device", "base"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["mean", "median", "fedavg", "iid", "rdp", "32", "1e400", "-0", ".inf", "~"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
known_key = st.sampled_from(KEYS)
any_key = st.one_of(known_key, st.text(min_size=0, max_size=15))
documents = st.one_of(
    values,
    st.dictionaries(st.sampled_from(list(SECTIONS) + ["base", "bogus"]),
                    st.one_of(values, st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS] + ["x"]),
                                                      values, max_size=4)), max_size=4))


def _check(error: ConfigError, keys: list[str]) -> None:
    text = str(error)
    assert text, "an empty error message"
    assert "'" in text or "config" in text or ":" in text, text  # a key in quotes, or the file


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


@FUZZ
@given(document=documents)
def test_any_yaml_document_loads_or_raises_a_config_error_naming_a_key_or_the_file(document, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(document))
    except yaml.YAMLError:
        return
    try:
        load_config(path)
    except ConfigError as error:
        text = str(error)
        assert str(path) in text or "'" in text, text


@FUZZ
@given(pairs=st.lists(st.tuples(any_key, st.one_of(st.text(max_size=20), values.map(lambda v: yaml.safe_dump(v)))),
                      min_size=1, max_size=4))
def test_any_set_override_loads_or_raises_a_config_error_naming_the_key(pairs):
    overrides = [f"{key}={text}" for key, text in pairs]
    try:
        load_config("configs/smoke.yaml", overrides)
    except ConfigError as error:
        text = str(error)
        named = [key for key, _ in pairs if key and (key in text or key.split(".")[-1] in text)]
        assert named or "override" in text or "'" in text, (overrides, text)


@FUZZ
@given(raw_text=st.text(max_size=80))
def test_any_text_as_a_config_file_is_yaml_or_a_config_error_naming_the_file(raw_text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(raw_text)
    try:
        load_config(path)
    except ConfigError as error:
        assert str(path) in str(error) or "'" in str(error), str(error)
