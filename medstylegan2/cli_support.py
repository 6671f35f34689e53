"""What every command-line entry point shares: logging set-up and one ``error:`` line for user errors.

Imported by ``medstylegan2.cli`` and by each entry point of its own (``python -m simulation``), so
that none of them imports another's dispatcher.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_reporting_user_errors(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; a UserError becomes one ``error: ...`` line and exit status 2, not a traceback."""
    from medstylegan2.errors import UserError

    try:
        return int(command(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
