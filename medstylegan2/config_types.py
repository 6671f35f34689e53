"""A typed dataclass from a raw YAML mapping: every unknown key and wrong type is a ConfigError
naming its dotted key and the file (``where``). Used for run configs and study specs alike."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Literal, get_args, get_origin

from medstylegan2.errors import ConfigError

# PyYAML follows YAML 1.1, where 1e-5 (no dot) is a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def build_dataclass(cls: type, raw: Any, prefix: str, where: str):
    """``cls`` built from ``raw``, each field coerced to its type hint; ``prefix`` starts the dotted keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{where}: unknown key '{key}'; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, where: str):
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, prefix=f"{key}.", where=where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, where)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' = {value!r} is not allowed; use one of: "
                              f"{', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        key_type, value_type = get_args(hint)
        return {_coerce(key_type, k, f"{key}.{k}", where): _coerce(value_type, v, f"{key}.{k}", where)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item_type,) = get_args(hint)
        return [_coerce(item_type, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where 1e-5 (no dot) is a string; every user means a number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError as exc:  # an integer too large for a float
            raise ConfigError(f"{where}: '{key}' = {value!r} is too large") from exc
        if not math.isfinite(number):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    return value
