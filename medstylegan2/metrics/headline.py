"""The few figures a run reports when it ends, read from its last evaluation record.

In: a record written by the evaluator (``<run>/eval/round_XXX.json``). Out: a short text table with
CAS, FD-domain, FID, LPIPS diversity (per class and overall) and TSTR relative to real, each row only
when the record has a value for it; a requested headline metric that failed is named with its error,
so a missing row is never silent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (row label, record key, metric name under which the evaluator records its error, decimals)
HEADLINE = (
    ("CAS", "cas", "cas", 3),
    ("FD-domain", "fd_domain", "fd_domain", 2),
    ("FID", "fid", "fid", 1),
    ("LPIPS diversity", "lpips_diversity", "lpips", 3),
    ("TSTR / real", "tstr_relative", "utility", 3),
)


def last_evaluation(run_dir: str | Path) -> dict | None:
    """The record of the run's latest evaluated round, or ``None`` when it has none."""
    from medstylegan2.metrics.plots import read_rounds

    records = read_rounds(run_dir)
    return records[-1] if records else None


def _fmt(value: Any, decimals: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{decimals}f}"
    return "-"


def format_headline(record: dict) -> str:
    class_names = list(record.get("class_names", []))
    overall, per_class = record.get("overall", {}), record.get("per_class", {})
    n = record.get("n_generated", {})
    counts = sorted(set(n.values())) if isinstance(n, dict) else []
    where = "" if record.get("round") is None else f" of round {record['round']}"
    lines = [f"evaluation{where} ({'/'.join(map(str, counts)) or '?'} generated images per class):"]
    rows = [(label, key, decimals) for label, key, _, decimals in HEADLINE
            if _fmt(overall.get(key)) != "-" or any(_fmt(per_class.get(c, {}).get(key)) != "-" for c in class_names)]
    if rows:
        width = max(len(label) for label, *_ in rows) + 2
        lines.append(" " * width + "".join(f"{c:>11}" for c in class_names + ["overall"]))
        for label, key, decimals in rows:
            values = [per_class.get(c, {}).get(key) for c in class_names] + [overall.get(key)]
            lines.append(f"{label:<{width}}" + "".join(f"{_fmt(v, decimals):>11}" for v in values))
    else:
        lines.append("  no headline figure was measured (metrics.metrics / metrics.final_metrics)")
    ceiling = (record.get("domain_classifier") or {}).get("heldout_accuracy")
    if "cas" in overall and ceiling is not None:
        lines.append(f"CAS ceiling: the real-trained classifier is {_fmt(ceiling)} accurate on real held-out images")
    networks = record.get("feature_networks", {})
    for name, key, label in (("FID", "fid", networks.get("inception")),
                             ("LPIPS", "lpips_diversity", networks.get("lpips"))):
        if label and any(key == k for _, k, _ in rows):
            lines.append(f"{name}: {label}")
    errors = record.get("errors", {})
    for label, _, metric, _ in HEADLINE:
        if metric in errors:
            lines.append(f"NOT COMPUTED {label}: {errors[metric]}")
    return "\n".join(lines)
