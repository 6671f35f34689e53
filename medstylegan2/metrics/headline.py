"""The few figures a run reports when it ends, read from its last evaluation record.

In: a record written by the evaluator (``<run>/eval/round_XXX.json``). Out: a short text table with
CAS, FD-domain, FID, LPIPS diversity (per class and overall) and TSTR relative to real, each row only
when the record has a value for it; a requested headline metric that failed is named with its error,
and FID or LPIPS (the seed paper's figures) left out of the metric lists are named too, so a missing
row is never silent.
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
# The seed paper's figures: a run that leaves them out says so rather than printing nothing.
MISSION_METRICS = ("fid", "lpips")


def last_evaluation(run_dir: str | Path) -> dict | None:
    """The record of the run's latest evaluated round, or ``None`` when it has none."""
    from medstylegan2.metrics.plots import read_rounds

    records = read_rounds(run_dir)
    return records[-1] if records else None


def _fmt(value: Any, decimals: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{decimals}f}"
    return "-"


def _image_counts(record: dict, key: str) -> str:
    """`` (N generated vs M real images per class)`` for FID when the evaluator capped its images."""
    counts = (record.get("images_per_class") or {}).get("inception") if key == "fid" else None
    if not counts:
        return ""
    gen, real = (sorted(set(counts.get(side, {}).values())) for side in ("generated", "real"))
    return (f" ({'/'.join(map(str, gen))} generated vs {'/'.join(map(str, real))} real images per class: "
            "few images bias FID upwards, compare equal counts only)")


def format_headline(record: dict) -> str:
    class_names = list(record.get("class_names", []))
    overall, per_class = record.get("overall", {}), record.get("per_class", {})
    n = record.get("n_generated", {})
    counts = sorted(set(n.values())) if isinstance(n, dict) else []
    where = "" if record.get("round") is None else f" of round {record['round']}"
    kind = "final evaluation" if record.get("final") else "evaluation"
    lines = [f"{kind}{where} ({'/'.join(map(str, counts)) or '?'} generated images per class):"]
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
            lines.append(f"{name}: {label}{_image_counts(record, key)}")
    errors = record.get("errors", {})
    requested = record.get("metrics_requested", [])
    for label, key, metric, _ in HEADLINE:
        if metric in errors:
            lines.append(f"NOT COMPUTED {label}: {errors[metric]}")
        elif metric in MISSION_METRICS and metric not in requested and all(key != k for _, k, _ in rows):
            lines.append(f"NOT MEASURED {label}: '{metric}' is in neither metrics.metrics nor metrics.final_metrics")
    return "\n".join(lines)
