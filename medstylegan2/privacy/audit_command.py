"""``medstylegan2 audit-privacy RUN_DIR --members DIR --non-members DIR``: the audit as a command.

Loads the run's checkpoint (``--checkpoint``, else ``checkpoint.pt``, else the newest
``round_XXX.pt``), the member and non-member folders, epsilon for the bound (``--epsilon/--delta``,
a site's lifetime ledger with ``--ledger``, else the run's own figures), runs
``medstylegan2.privacy.audit.audit`` and writes ``OUT/audit.json`` and ``OUT/audit.png`` (OUT
defaults to ``RUN_DIR/audit``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medstylegan2.errors import DataError, UserError
from medstylegan2.privacy.audit import FPR_TARGETS, audit, dp_tpr_bound, roc_auc
from medstylegan2.runfolder import atomic_write_text, round_numbers_in, save_figure

log = logging.getLogger(__name__)

COMMAND_HELP = ("Membership-inference audit of a run: white-box on the discriminator, black-box on the generator; "
                "ROC AUC, TPR at low FPR, and the (epsilon, delta) bound (audit.json, audit.png).")
AUDIT_JSON = "audit.json"
AUDIT_PNG = "audit.png"


# ----------------------------------------------------------------------------------------------
# Where epsilon comes from


def run_epsilon(run_dir: Path, checkpoint_state: dict[str, Any]) -> tuple[Optional[float], Optional[float], str]:
    """(epsilon, delta, where from) of the run that wrote the checkpoint; (None, None, why) for a non-DP run.

    A site checkpoint (train-local) carries its accountant history: epsilon is recomputed from it.
    A federated run has per-site figures in ``privacy.json``: the largest epsilon of any site's
    last round is used (a bound that holds for every site's records).
    """
    privacy = checkpoint_state.get("privacy")
    config = checkpoint_state.get("config", {}).get("privacy", {})
    if isinstance(privacy, dict) and privacy.get("history"):
        from medstylegan2.privacy.accounting import epsilon_of_history

        delta = float(privacy["delta"])
        history = [(float(s), float(q), int(n)) for s, q, n in privacy["history"]]
        return epsilon_of_history(history, delta, privacy["accountant"]), delta, "checkpoint accountant history"
    report_path = run_dir / "privacy.json"
    if report_path.is_file():
        from medstylegan2.privacy_report import read_privacy_report

        report = read_privacy_report(run_dir)
        last = [rows[-1] for rows in report["sites"].values() if rows]
        if last:
            worst = max(last, key=lambda row: float(row["epsilon"]))
            return float(worst["epsilon"]), float(worst["delta"]), f"{report_path} (largest epsilon of any site)"
    if config.get("enabled"):
        return None, None, "the run is private but neither its checkpoint nor privacy.json gives its epsilon"
    return None, None, "the run was trained without differential privacy: no bound"


def find_checkpoint(run_dir: Path, name: Optional[str]) -> Path:
    """``--checkpoint`` (absolute, or relative to RUN_DIR), else checkpoint.pt, else the newest round_XXX.pt."""
    if name is not None:
        path = Path(name)
        path = path if path.is_absolute() or path.is_file() else run_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        return path
    if (run_dir / "checkpoint.pt").is_file():
        return run_dir / "checkpoint.pt"
    rounds = round_numbers_in(run_dir)
    if not rounds:
        raise UserError(f"{run_dir} has no checkpoint.pt and no round_XXX.pt; give --checkpoint FILE")
    return run_dir / f"round_{rounds[-1]:03d}.pt"


def _check_disjoint(members, non_members) -> None:
    def digests(images: np.ndarray) -> set[str]:
        return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}

    shared = digests(members.images) & digests(non_members.images)
    if shared:
        raise DataError(f"{len(shared)} image(s) appear in both --members and --non-members: a non-member must be "
                        "an image the site never trained on")


# ----------------------------------------------------------------------------------------------
# Output


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_audit_json(path: Path, report: dict[str, Any]) -> Path:
    """Strict JSON; an infinite epsilon is written as 1e999, as in privacy.json."""
    from medstylegan2.privacy_report import dumps_with_infinity

    return atomic_write_text(path, dumps_with_infinity(_plain(report)) + "\n")


def plot_audit(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, *, epsilon: Optional[float],
               delta: Optional[float], title: str = "") -> Path:
    """Two panels, linear and log-log: each attack's ROC, chance, and the (epsilon, delta) bound."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    grid = np.logspace(-4, 0, 400)
    for i, log_scale in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = grid if log_scale else np.linspace(0, 1, 400)
        ax.plot(xs, xs, color="grey", linestyle=":", linewidth=1, label="chance")
        if epsilon is not None:
            ax.plot(xs, dp_tpr_bound(xs, epsilon, delta or 0.0), color="black", linestyle="--", linewidth=1.2,
                    label=f"DP bound (eps={epsilon:.3g}, delta={delta or 0:.1g})")
        for name, (fpr, tpr) in curves.items():
            auc = roc_auc(fpr, tpr)
            if log_scale:
                keep = fpr > 0
                ax.step(fpr[keep], tpr[keep], where="post", label=f"{name} (AUC {auc:.3f})")
            else:
                ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        if log_scale:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
        else:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        ax.set_xlabel("false positive rate (non-members called members)")
        ax.set_ylabel("true positive rate (members found)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)


def format_table(report: dict[str, Any]) -> str:
    header = ["attack", "AUC (+- s.e.)"] + [f"TPR@{t:g} FPR" for t in FPR_TARGETS] + ["advantage"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = list(report["attacks"].items())
    if report.get("bound"):
        rows.append(("(epsilon, delta) bound", {"auc": report["bound"]["auc_max"],
                                                "tpr_at_fpr": report["bound"]["tpr_at_fpr"], "advantage": None}))
    for name, a in rows:
        cells = [name, f"{a['auc']:.3f}" + (f" +- {a['auc_stderr']:.3f}" if a.get("auc_stderr") is not None else "")]
        cells += ["-" if a["tpr_at_fpr"].get(f"{t:g}") is None else f"{a['tpr_at_fpr'][f'{t:g}']:.3f}"
                  for t in FPR_TARGETS]
        cells.append("-" if a["advantage"] is None else f"{a['advantage']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (train-local or federated)")
    p.add_argument("--members", metavar="DIR", required=True,
                   help="images the site trained on, DIR/<class>/*.png")
    p.add_argument("--non-members", metavar="DIR", required=True,
                   help="images from the same distribution never trained on (e.g. the held-out split)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/audit)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="checkpoint to attack (default: RUN_DIR/checkpoint.pt, else the newest round_XXX.pt)")
    p.add_argument("--samples-per-class", type=int, default=1000,
                   help="generated images per class for the black-box attack (default 1000)")
    p.add_argument("--classifier", metavar="FILE",
                   help="domain classifier for the feature-space black-box attack (default: "
                        "RUN_DIR/domain_classifier.pt when present)")
    p.add_argument("--max-per-class", type=int, help="read at most this many images per class from each folder")
    p.add_argument("--ledger", metavar="DIR",
                   help="take epsilon for the bound from a site's lifetime ledger (all its releases)")
    p.add_argument("--epsilon", type=float, help="epsilon for the bound (default: from the run)")
    p.add_argument("--delta", type=float, help="delta for the bound (default: from the run)")
    p.add_argument("--seed", type=int, default=0, help="latent seed of the generated images (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def run(args: argparse.Namespace) -> int:
    from medstylegan2.data import class_summary, load_folder
    from medstylegan2.metrics.evaluate import CLASSIFIER_FILE
    from medstylegan2.networks import build_networks
    from medstylegan2.runfolder import config_from_checkpoint, read_checkpoint
    from medstylegan2.network_weights import load_state_dict_checked
    from medstylegan2.trainer import resolve_device

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if args.samples_per_class <= 0:
        raise UserError("--samples-per-class must be > 0")
    if (args.epsilon is None) != (args.delta is None):
        raise UserError("give --epsilon and --delta together")
    if args.epsilon is not None and not (args.epsilon >= 0 and 0 <= args.delta < 1):
        raise UserError("--epsilon must be >= 0 and --delta in [0, 1)")
    device = resolve_device(args.device)
    ckpt_path = find_checkpoint(run_dir, args.checkpoint)
    state = read_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(state)
    G, D = build_networks(cfg.model)
    load_state_dict_checked(G, state["G_ema"], what=f"{ckpt_path}:G_ema")
    load_state_dict_checked(D, state["D"], what=f"{ckpt_path}:D")
    G, D = G.to(device).eval().requires_grad_(False), D.to(device).eval().requires_grad_(False)

    resolution = cfg.model.resolution
    members = load_folder(args.members, resolution, max_per_class=args.max_per_class)
    non_members = load_folder(args.non_members, resolution, max_per_class=args.max_per_class)
    _check_disjoint(members, non_members)
    print(f"members: {len(members)} ({class_summary(members)}); non-members: {len(non_members)} "
          f"({class_summary(non_members)})", flush=True)

    if args.epsilon is not None:
        epsilon, delta, source = args.epsilon, args.delta, "--epsilon/--delta"
    elif args.ledger:
        from medstylegan2.privacy_report import ledger_report

        summary = ledger_report(args.ledger)
        epsilon, delta, source = summary["epsilon"], summary["delta"], f"lifetime ledger {summary['ledger']}"
    else:
        epsilon, delta, source = run_epsilon(run_dir, state)
    classifier, classifier_info = None, None
    clf_path = Path(args.classifier) if args.classifier else run_dir / CLASSIFIER_FILE
    if clf_path.is_file():
        from medstylegan2.classifier import classifier_meta, load_classifier

        classifier = load_classifier(clf_path, device=str(device))
        meta = classifier_meta(clf_path)
        classifier_info = {"path": str(clf_path), "trained_on": meta.get("trained_on")}
        if "train" in str(meta.get("trained_on", "")):
            log.warning("the domain classifier %s was trained on the training split: its feature space may itself "
                        "tell members apart, so the feature-space attack overstates what the generator leaks", clf_path)
    elif args.classifier:
        raise UserError(f"classifier file not found: {clf_path}")

    print(f"attacking {ckpt_path} ({len(members)} members, {len(non_members)} non-members, "
          f"{args.samples_per_class} generated images per class) ...", flush=True)
    report, curves = audit(D, G, members, non_members, samples_per_class=args.samples_per_class,
                           classifier=classifier, epsilon=epsilon, delta=delta, seed=args.seed, device=device)
    report = {
        "kind": "privacy-audit",
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_dir": str(run_dir), "checkpoint": str(ckpt_path), "resolution": resolution,
        "members": {"dir": str(args.members), "n": len(members), "per_class": members.class_counts()},
        "non_members": {"dir": str(args.non_members), "n": len(non_members), "per_class": non_members.class_counts()},
        "privacy": {"dp": epsilon is not None, "epsilon": epsilon, "delta": delta, "source": source},
        "domain_classifier": classifier_info,
        **report,
    }
    out = Path(args.out) if args.out else run_dir / "audit"
    out.mkdir(parents=True, exist_ok=True)
    write_audit_json(out / AUDIT_JSON, report)
    plot_audit(curves, out / AUDIT_PNG, epsilon=epsilon, delta=delta,
               title=f"membership inference on {ckpt_path.name} ({len(members)} members, "
                     f"{len(non_members)} non-members)")
    print(format_table(report))
    print(f"epsilon: {'none' if epsilon is None else f'{epsilon:.4g} at delta {delta:.3g}'} ({source})")
    print(f"wrote {out / AUDIT_JSON} and {out / AUDIT_PNG}")
    return 0
