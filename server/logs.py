"""The server's log lines go through Flower's own logger: that is what ``flwr run --stream`` and the
simulation print (our ``logging`` handlers may not exist in a ServerApp process)."""

from __future__ import annotations

import logging
from typing import Any


def emit(level: int, msg: str, *args: Any) -> None:
    from flwr.common.logger import log as flwr_log

    flwr_log(level, msg, *args)


def info(msg: str, *args: Any) -> None:
    emit(logging.INFO, msg, *args)


def warn(msg: str, *args: Any) -> None:
    emit(logging.WARNING, msg, *args)
