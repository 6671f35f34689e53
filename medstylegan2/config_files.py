"""Config files as plain mappings: YAML, ``base:`` chains, ``--set`` overrides.

A config file may extend another: ``base: other.yaml`` (a path relative to the file that names it)
takes every key of ``other.yaml`` (which may have a base of its own) and the file's own keys win,
section by section and key by key; a list (e.g. ``metrics.metrics``) is replaced as a whole. Each
file's keys are checked on their own (``check_keys``), so a mistake in a base names the base file;
a cycle of bases is an error naming the chain. Turning the mapping into the typed, validated
config is ``medstylegan2.config``'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from medstylegan2.errors import ConfigError

# The key of a config file that names the file it extends.
BASE_KEY = "base"


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path the OS cannot even look up (a NUL byte, a name too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of one YAML file (an empty file is an empty mapping)."""
    if not is_file(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as a text file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: nested too deeply to be a config") from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def read_with_bases(path: Path, check_keys: Callable[[dict[str, Any], str], Any],
                    chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of ``path`` with its ``base:`` chain merged in (without the ``base`` key).

    ``check_keys(raw, where)`` checks one file's own keys and types, named by that file.
    """
    raw = read_yaml_mapping(path)
    base = raw.pop(BASE_KEY, None)
    check_keys(raw, str(path))
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: '{BASE_KEY}' must be the path of the config file this one extends "
                          f"(relative to {path.parent}), got {base!r}")
    base_path = path.parent / base
    if not is_file(base_path):
        raise ConfigError(f"{path}: '{BASE_KEY}' names {base_path}, which is not a file")
    seen = (*chain, path)
    if any(base_path.resolve() == p.resolve() for p in seen):
        raise ConfigError("config files extend each other in a cycle: "
                          + " -> ".join(str(p) for p in (*seen, base_path)))
    return merged(read_with_bases(base_path, check_keys, seen), raw)


def merged(base: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``derived``: mappings merge key by key (the derived value wins), anything else
    (numbers, strings, lists) is replaced. A section left empty in the derived file keeps the base's."""
    out = dict(base)
    for key, value in derived.items():
        if isinstance(out.get(key), dict) and (isinstance(value, dict) or value is None):
            out[key] = merged(out[key], value or {})
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` (the value read as YAML; empty: null) in ``raw``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: '{key}' is not a key; use section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value of '{key}' is not valid YAML: "
                          f"{str(exc).splitlines()[0]}") from exc
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # a section left empty (null) in the file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[parts[-1]] = value
