"""Saved weights into a network, with an error that says what does not fit and where it came from."""

from __future__ import annotations

import torch
import torch.nn as nn

from medstylegan2.errors import CheckpointError


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """load_state_dict with an error that names the network, the key and both shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{what}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); was it trained with another model config?")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{what}.{key}: shape {tuple(value.shape)} does not match the model's "
                                  f"{tuple(own[key].shape)}; was it trained with another model config?")
    module.load_state_dict(state)
