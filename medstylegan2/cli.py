"""The ``medstylegan2`` command line: one subcommand per task, each with its own ``--help``.

Each subcommand lives in the module that does the work; that module exposes ``COMMAND_HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``medstylegan2 --help`` stays fast and the core never needs Flower.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

# (subcommand, module implementing it)
COMMANDS: list[tuple[str, str]] = [
    ("make-phantoms", "medstylegan2.phantoms"),
    ("train-local", "medstylegan2.train_local"),
    ("sample", "medstylegan2.sampling"),
    ("evaluate", "medstylegan2.metrics.evaluate"),
    ("simulate", "simulation.cli"),
    ("privacy-report", "medstylegan2.privacy_report"),
    ("audit-privacy", "medstylegan2.privacy_audit"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medstylegan2",
        description="Federated, privacy-preserving class-conditional StyleGAN2 for chest X-rays.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.COMMAND_HELP, description=module.COMMAND_HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_reporting_user_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
