"""The privacy report of a run: ``privacy.json`` (a contract other tools read), ``privacy.png``, a table.

``privacy.json`` holds exactly::

    {"delta": d, "accountant": "rdp" | "prv",
     "sites": {"<site>": [{"round": r, "epsilon": e, "delta": d, "sample_rate": q,
                           "steps": cumulative_steps, "noise_multiplier": sigma, "max_grad_norm": c,
                           "lifetime_epsilon": e_all}, ...]}}

one entry per round a site trained, in round order; ``epsilon`` and ``steps`` cover this run's
releases, the optional ``lifetime_epsilon`` (a site with a lifetime ledger) every release of the
site's data set, earlier runs, retries and repeated rounds included. An infinite epsilon is written as the JSON
number ``1e999``, which Python and JavaScript read back as infinity (JSON has no infinity, and
``null`` would be taken for "unknown" and the row dropped). Epsilon and delta are per site: each site's
guarantee covers the records of that site (no union bound across sites). The top-level ``delta`` is
the configured one or, under the default per-site policy (1 / (10 n_site)), the largest per-site
delta, i.e. the weakest site's.

The server calls ``update_privacy_report`` after every round; ``medstylegan2 privacy-report RUN_DIR``
re-renders the plot and prints the table from ``privacy.json`` (or rebuilds it from the per-site
``dp_*`` figures in ``metrics.jsonl`` when it is missing; runs written before keys were snake_case
carry them as ``dp-*``, and are read too). A site whose cumulative steps go
backwards from one round to a later one is an error, never a dropped row: its privacy state was
reset or rewound, and the epsilon after it would undercount. ``--ledger DIR`` also shows a site's
lifetime ledger (``medstylegan2.privacy.ledger``): epsilon per run token and over the data set's
lifetime, and fails on a damaged, edited or rewound ledger.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from medstylegan2.errors import UserError
from medstylegan2.runfolder import atomic_write_text, save_figure

COMMAND_HELP = "Write RUN_DIR/privacy.json and privacy.png (epsilon per site and round) and print the table."
REPORT_JSON = "privacy.json"
REPORT_PNG = "privacy.png"
RECORD_KEYS = ("round", "epsilon", "delta", "sample_rate", "steps", "noise_multiplier", "max_grad_norm")
_INT_KEYS = ("round", "steps")
# A site with a lifetime ledger also reports its epsilon over every release of its data set.
OPTIONAL_KEYS = ("lifetime_epsilon",)
# JSON has no infinity; this number literal is valid JSON and parses as infinity in Python and JS.
JSON_INFINITY = "1e999"


class PrivacyReportError(UserError):
    """The privacy figures contradict themselves (e.g. a site's steps went backwards)."""


# ----------------------------------------------------------------------------------------------
# Building and writing


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with exactly the contract's keys and types (round/steps int, the rest float), and
    ``lifetime_epsilon`` when the site reported one (its ledger's epsilon over every run)."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"privacy record lacks {', '.join(missing)}; it needs {', '.join(RECORD_KEYS)}")
    row = {k: int(record[k]) if k in _INT_KEYS else float(record[k]) for k in RECORD_KEYS}
    for key in OPTIONAL_KEYS:
        if record.get(key) is not None:
            row[key] = float(record[key])
    return row


def build_report(records: Mapping[str, Iterable[Mapping[str, Any]]], delta: Optional[float], accountant: str
                 ) -> dict[str, Any]:
    """The ``privacy.json`` object for per-site lists of records.

    Per site, entries are sorted by round; a later entry for the same round replaces an earlier
    one (a repeated round after a crash), and an entry whose cumulative steps did not grow is
    dropped: that site did not train in that round (it declined), so it gets no entry. Steps that
    fall from one round to a later one raise ``PrivacyReportError``.
    """
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    sites: dict[str, list[dict[str, Any]]] = {}
    for site, rows in sorted(records.items(), key=lambda item: str(item[0])):
        by_round: dict[int, dict[str, Any]] = {}
        for row in rows:
            row = normalize_record(row)
            by_round[row["round"]] = row
        kept, last_steps, last_round = [], 0, None
        for round_num in sorted(by_round):
            row = by_round[round_num]
            if row["steps"] < last_steps:
                raise PrivacyReportError(
                    f"site {site}: cumulative DP steps went backwards from {last_steps} (round {last_round}) to "
                    f"{row['steps']} (round {round_num}): the site's privacy accountant was reset or rewound, so "
                    "its epsilon from then on undercounts what it released. Check the site's lifetime ledger "
                    "(privacy-report --ledger DIR)")
            if row["steps"] > last_steps:
                kept.append(row)
                last_steps, last_round = row["steps"], round_num
        sites[str(site)] = kept
    if delta is None:
        deltas = [row["delta"] for rows in sites.values() for row in rows]
        delta = max(deltas) if deltas else 0.0
    return {"delta": float(delta), "accountant": accountant, "sites": sites}


def write_privacy_report(run_dir: str | Path, records: Mapping[str, Iterable[Mapping[str, Any]]],
                         delta: Optional[float], accountant: str, *, budget: Optional[float] = None,
                         echo: bool = True) -> dict[str, Any]:
    """Write ``privacy.json`` and ``privacy.png`` in ``run_dir``; print the table if ``echo``.

    ``records``: site -> its per-round records (``DPEngine.round_record``). ``delta``: the
    configured delta, or None for the per-site default (the top-level value is then the largest
    per-site delta). ``budget``: ``privacy.budget_epsilon``, drawn as a dashed line.
    """
    report = build_report(records, delta, accountant)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Not atomic_write_json: it writes infinity as null, and this contract keeps it (1e999).
    atomic_write_text(run_dir / REPORT_JSON, dumps_with_infinity(report) + "\n")  # never half a file
    plot_privacy(report, run_dir / REPORT_PNG, budget=budget)
    if echo:
        print(format_table(report, budget=budget))
    return report


def dumps_with_infinity(value: Any) -> str:
    """Strict JSON (no NaN, no Infinity token) with +inf written as ``1e999``; NaN is an error."""
    marker = "__medstylegan2_infinity__"

    def mark(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [mark(x) for x in v]
        if isinstance(v, float) and math.isinf(v) and v > 0:
            return marker
        return v

    return json.dumps(mark(value), indent=2, allow_nan=False).replace(f'"{marker}"', JSON_INFINITY)


def read_privacy_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise UserError(f"no {REPORT_JSON} in {run_dir}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(report, dict) or not {"delta", "accountant", "sites"} <= set(report):
        raise UserError(f"{path} is not a privacy report (needs keys delta, accountant, sites)")
    return report


def update_privacy_report(run_dir: str | Path, site: str, record: Mapping[str, Any], *,
                          delta: Optional[float] = None, accountant: str = "rdp", budget: Optional[float] = None,
                          echo: bool = False) -> dict[str, Any]:
    """Merge one site's record for one round into ``run_dir/privacy.json`` and re-draw the plot.

    ``delta``: the configured ``privacy.delta`` (None: per-site default). Call it for the rounds a
    site trained; a record that adds no steps (a declined round) is ignored.
    """
    records: dict[str, list[Mapping[str, Any]]] = {}
    if (Path(run_dir) / REPORT_JSON).is_file():
        old = read_privacy_report(run_dir)
        if old["accountant"] != accountant:
            raise UserError(f"{run_dir}/{REPORT_JSON} was written with the {old['accountant']!r} accountant, "
                            f"not {accountant!r}")
        records = {s: list(rows) for s, rows in old["sites"].items()}
    records.setdefault(str(site), []).append(record)
    return write_privacy_report(run_dir, records, delta, accountant, budget=budget, echo=echo)


def records_from_metrics(lines: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Per-site records from ``metrics.jsonl`` lines whose sites carry ``dp_*`` (or, older runs, ``dp-*``) figures."""
    records: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        for site, figures in (entry.get("sites") or {}).items():
            if not isinstance(figures, dict) or figures.get("status", "ok") != "ok":
                continue
            row = {k: figures.get(f"dp_{k}", figures.get(f"dp-{k}")) for k in RECORD_KEYS if k != "round"}
            lifetime = {k: figures[f"dp_{k}"] for k in OPTIONAL_KEYS if figures.get(f"dp_{k}") is not None}
            if row["epsilon"] is None and all(v is not None for k, v in row.items() if k != "epsilon"):
                # metrics.jsonl writes non-finite numbers as null; a DP round's epsilon is never NaN
                # (the engine maps every non-finite value to inf), so null here means infinity.
                row["epsilon"] = math.inf
            if any(v is None for v in row.values()):
                continue
            records.setdefault(str(site), []).append({"round": entry["round"], **row, **lifetime})
    return records


# ----------------------------------------------------------------------------------------------
# Table and plot


def format_table(report: Mapping[str, Any], *, budget: Optional[float] = None, all_rounds: bool = False) -> str:
    """A Markdown table: per site its latest round (or every round), epsilon at its delta, and more."""
    header = ["site", "round", "rounds trained", "epsilon", "delta", "steps", "sigma", "q", "C"]
    if budget is not None:
        header.append(f"budget left (of {budget:g})")
    lines = [f"Privacy per site ({report['accountant'].upper()} accountant; "
             f"(epsilon, delta)-DP for each site's own records)",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for site, rows in report["sites"].items():
        shown = rows if all_rounds else rows[-1:]
        for row in shown:
            cells = [site, str(row["round"]), str(len(rows)), f"{float(row['epsilon']):.4g}", f"{row['delta']:.3g}",
                     str(row["steps"]), f"{row['noise_multiplier']:.4g}", f"{row['sample_rate']:.4g}",
                     f"{row['max_grad_norm']:.4g}"]
            if budget is not None:
                cells.append(f"{budget - row['epsilon']:.4g}")
            lines.append("| " + " | ".join(cells) + " |")
        if not rows:
            lines.append("| " + " | ".join([site, "-", "0"] + ["-"] * (len(header) - 3)) + " |")
    return "\n".join(lines)


def plot_privacy(report: Mapping[str, Any], path: str | Path, *, budget: Optional[float] = None) -> Path:
    """Epsilon vs round, one line per site, the budget as a dashed line."""
    # The object API (no pyplot): no global state, no display needed, safe in a server thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for site, rows in report["sites"].items():
        if rows:
            ax.plot([r["round"] for r in rows], [r["epsilon"] for r in rows], marker="o", label=str(site))
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="black", linestyle="--", linewidth=1.2, label=f"budget epsilon = {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (delta = {report['delta']:.3g})")
    ax.set_title(f"Cumulative privacy loss per site ({report['accountant'].upper()})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Command line


def format_ledger_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of one ledger: epsilon per run token and over the data set's lifetime."""
    lines = [f"Lifetime ledger {summary['ledger']} ({summary['accountant'].upper()} accountant, "
             f"delta {summary['delta']:.3g}; {len(summary['fingerprints'])} data set fingerprint(s))",
             "| run | releases (class moments') | rounds | steps (class guide's) | epsilon |", "|---|---|---|---|---|"]
    for run_token, row in summary["runs"].items():
        rounds = row["rounds"]
        shown = ",".join(str(r) for r in rounds[:12]) + (" ..." if len(rounds) > 12 else "")
        lines.append(f"| {run_token} | {row['releases']} ({row['moments_releases']}) | {shown} | "
                     f"{row['steps']} ({row['guide_steps']}) | "
                     f"{row['epsilon']:.4g} |")
    guide = sum(row["guide_steps"] for row in summary["runs"].values())
    moments = sum(row["moments_releases"] for row in summary["runs"].values())
    lines.append(f"| **lifetime** | {summary['releases']} ({moments}) | | {summary['steps']} ({guide}) | "
                 f"{summary['epsilon']:.4g} |")
    return "\n".join(lines)


def ledger_report(ledger_dir: str | Path, *, delta: Optional[float] = None, accountant: Optional[str] = None
                  ) -> dict[str, Any]:
    """Per-run and lifetime epsilon of a site's ledger; ``LedgerError`` if it is damaged, edited or rewound.

    ``delta``: default the largest delta the ledger's releases were made at (the policy's);
    ``accountant``: default the one of its last release.
    """
    from medstylegan2.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(ledger_dir, None)
    entries = ledger.entries()
    if not entries:
        raise UserError(f"the ledger in {ledger_dir} records no release")
    delta = delta if delta is not None else max(e["delta"] for e in entries)
    accountant = accountant or entries[-1]["accountant"]
    return ledger.summary(delta, accountant)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                   help="a run folder with privacy.json (or metrics.jsonl); optional with --ledger")
    p.add_argument("--ledger", metavar="DIR", action="append", default=[],
                   help="a site's lifetime ledger folder (the policy's ledger_dir): per-run and lifetime epsilon; "
                        "fails on a damaged, edited or rewound ledger (repeatable)")
    p.add_argument("--delta", type=float, default=None,
                   help="delta for the ledger's epsilon (default: the largest delta its releases used)")
    p.add_argument("--budget", type=float, default=None,
                   help="budget line (default: privacy.budget_epsilon of RUN_DIR/config.yaml, if any)")
    p.add_argument("--all-rounds", action="store_true", help="one table row per site and round")


def _run_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from medstylegan2.config import load_config

    try:
        return load_config(path)
    except UserError:
        return None


def run(args: argparse.Namespace) -> int:
    if args.run_dir is None and not args.ledger:
        raise UserError("give a RUN_DIR, a --ledger DIR, or both")
    summaries = [ledger_report(d, delta=args.delta) for d in args.ledger]  # a bad ledger fails before anything
    if args.run_dir is not None:
        run_report(args)
    for summary in summaries:
        print(format_ledger_table(summary))
    return 0


def run_report(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    cfg = _run_config(run_dir)
    budget = args.budget if args.budget is not None else (cfg.privacy.budget_epsilon if cfg else None)
    if (run_dir / REPORT_JSON).is_file():
        try:
            raw = json.loads((run_dir / REPORT_JSON).read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir / REPORT_JSON} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("sites"), dict):
            raise UserError(f"{run_dir / REPORT_JSON} has no 'sites' mapping: not a privacy report")
        # Also normalizes a file that has the sites' records but not the whole contract.
        records = raw["sites"]
        delta = cfg.privacy.delta if cfg is not None else raw.get("delta")
        accountant = raw.get("accountant") or (cfg.privacy.accountant if cfg is not None else "rdp")
    elif (run_dir / "metrics.jsonl").is_file():
        records = records_from_metrics((run_dir / "metrics.jsonl").read_text().splitlines())
        if not records:
            raise UserError(f"{run_dir}/metrics.jsonl has no per-site privacy figures (dp_*): was the run "
                            "trained with privacy.enabled: true?")
        delta = cfg.privacy.delta if cfg is not None else None
        accountant = cfg.privacy.accountant if cfg is not None else "rdp"
    else:
        raise UserError(f"{run_dir} has neither {REPORT_JSON} nor metrics.jsonl; is it a federated run folder?")
    report = write_privacy_report(run_dir, records, delta, accountant, budget=budget, echo=False)
    print(format_table(report, budget=budget, all_rounds=args.all_rounds))
    print(f"wrote {run_dir / REPORT_JSON} and {run_dir / REPORT_PNG}")
