"""The ``medstylegan2`` command line: one subcommand per task, each with its own ``--help``.

Each subcommand lives in the module that does the work; that module exposes ``COMMAND_HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. The table below repeats each one-line help, so
that the parser lists every subcommand without importing any of them: only the module of the
subcommand being run (or asked for ``--help``) is imported. ``medstylegan2 --help`` therefore
never loads torch or Flower (a test checks it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from medstylegan2.cli_support import run_reporting_user_errors, setup_logging


@dataclass(frozen=True)
class Command:
    module: str     # implements COMMAND_HELP, add_arguments(parser) and run(args)
    help: str       # the module's COMMAND_HELP (tests/test_architecture.py checks they agree)


COMMANDS: dict[str, Command] = {
    "make-phantoms": Command("medstylegan2.phantoms",
                             "write procedural chest X-ray phantoms as DIR/<class>/*.png (the built-in data set)"),
    "inspect-data": Command("medstylegan2.inspect_data",
                            "Show what a data folder (DICOM archive or PNG class folders) holds before training: "
                            "counts per class, modality, view, photometric interpretation and bit depth, skipped "
                            "files and why, and a contact sheet of the preprocessed pixels"),
    "export-split": Command("medstylegan2.export_split",
                            "Write the training and held-out images a config's run uses (e.g. RUN_DIR/config.yaml) "
                            "as OUT/train/<class>/*.png and OUT/heldout/<class>/*.png, for evaluate --train, "
                            "audit-privacy and release --drop-memorized."),
    "train-local": Command("medstylegan2.train_local",
                           "Train one site's class-conditional GAN on a data folder, a COVID-QU-Ex root, or "
                           "'phantoms' (the embedded default)."),
    "sample": Command("medstylegan2.sampling",
                      "Sample N synthetic images per class from a checkpoint's EMA generator into "
                      "DIR/<class>/*.png."),
    "evaluate": Command("medstylegan2.metrics.evaluate_command",
                        "Evaluate a checkpoint (sampled) or a folder of generated <class>/*.png images against real "
                        "held-out images: FD/KID/PR, LPIPS, memorization, classification accuracy score (CAS), "
                        "downstream utility (TSTR)."),
    "simulate": Command("simulation.cli",
                        "Run a federated simulation: N virtual hospital sites (Flower simulation engine) over "
                        "partitioned data, with round checkpoints, metrics.jsonl and sample grids."),
    "study": Command("simulation.study",
                     "Run the privacy-utility study (arms central, fed-iid, fed-noniid, dp-eps10, dp-eps1): one "
                     "run folder per arm, resumable; writes study.json, study.md, utility.png, arms.png."),
    "privacy-report": Command("medstylegan2.privacy_report",
                              "Write RUN_DIR/privacy.json and privacy.png (epsilon per site and round) and print "
                              "the table."),
    "audit-privacy": Command("medstylegan2.privacy.audit_command",
                             "Membership-inference audit of a run: white-box on the discriminator, black-box on the "
                             "generator; ROC AUC, TPR at low FPR, and the (epsilon, delta) bound (audit.json, "
                             "audit.png)."),
    "release": Command("medstylegan2.release",
                       "Write a synthetic-data release: N images per class from a checkpoint, with manifest.csv "
                       "(sha256 per image), release.json and MODEL_CARD.md (provenance, privacy, evaluation, "
                       "intended use)."),
}


def chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in ``argv`` (the first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, to add its arguments (None: no module)."""
    parser = argparse.ArgumentParser(
        prog="medstylegan2",
        description="Federated, privacy-preserving class-conditional StyleGAN2 for chest X-rays.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, entry in COMMANDS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        if name == command:
            module = importlib.import_module(entry.module)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_reporting_user_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
