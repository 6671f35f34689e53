"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a folder, a config key. The message says which and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


class DataError(UserError):
    """A data folder or image file is missing, empty or unreadable."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, corrupt, or does not fit the model."""


class MissingWeightsError(UserError):
    """A pretrained feature network's weights file is absent (no internet to download it)."""


class PrivacyError(UserError):
    """A model or setting is incompatible with differential privacy; the message says what to change."""
