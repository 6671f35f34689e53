"""The study's outputs: ``study.json`` (the contract), ``study.md``, ``utility.png`` and ``arms.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medstylegan2.runfolder import atomic_write_text

ARM_FILE = "arm.json"
STUDY_FILE = "study.json"
CONTRACT_KEYS = ("checkpoint", "epsilon", "cas", "tstr_relative", "fd_domain", "lpips_diversity", "minutes")


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def combine_seeds(seed_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One arm's study.json entry: contract keys, means over seeds, the first seed's checkpoint."""
    entry: dict[str, Any] = {"checkpoint": seed_results[0]["checkpoint"]}
    eps = [r.get("epsilon") for r in seed_results]
    entry["epsilon"] = None if all(e is None for e in eps) else _mean(eps)
    for key in ("cas", "tstr_relative", "fd_domain", "lpips_diversity", "minutes"):
        entry[key] = _mean([r.get(key) for r in seed_results])
    return entry


def write_study_json(out: Path, profile: str, arms: Mapping[str, Mapping[str, Any]]) -> Path:
    doc = {"profile": profile, "arms": {name: {k: arms[name][k] for k in CONTRACT_KEYS} for name in arms}}
    return atomic_write_text(out / STUDY_FILE, json.dumps(doc, indent=2) + "\n")


def validate_study_json(doc: Any) -> list[str]:
    """Problems with a ``study.json`` document against the contract; empty when it follows it."""
    problems: list[str] = []
    if not isinstance(doc, dict) or set(doc) != {"profile", "arms"}:
        return ["top level must be exactly {'profile', 'arms'}"]
    if not isinstance(doc["profile"], str):
        problems.append("'profile' must be a string")
    if not isinstance(doc["arms"], dict) or not doc["arms"]:
        return problems + ["'arms' must be a non-empty mapping"]
    for name, arm in doc["arms"].items():
        if not isinstance(arm, dict) or set(arm) != set(CONTRACT_KEYS):
            problems.append(f"arms.{name}: keys must be exactly {', '.join(CONTRACT_KEYS)}")
            continue
        if not isinstance(arm["checkpoint"], str) or Path(arm["checkpoint"]).is_absolute():
            problems.append(f"arms.{name}.checkpoint must be a path relative to the study folder")
        if arm["epsilon"] is not None and not isinstance(arm["epsilon"], (int, float)):
            problems.append(f"arms.{name}.epsilon must be a number or null")
        for key in ("cas", "tstr_relative", "fd_domain", "lpips_diversity", "minutes"):
            if not isinstance(arm[key], (int, float)) or isinstance(arm[key], bool):
                problems.append(f"arms.{name}.{key} must be a number")
    return problems


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def study_table(profile: str, arms: Mapping[str, Mapping[str, Any]], details: Mapping[str, Mapping[str, Any]]
                ) -> str:
    """The markdown table of ``study.md``."""
    classes = None
    lines = [f"# Privacy-utility study ({profile} profile)", "",
             "| arm | epsilon | CAS | CAS per class | TSTR rel. | FD-domain | LPIPS div. | minutes | seeds | declined |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        d = details.get(name, {})
        per_class = d.get("cas_per_class") or {}
        classes = classes or list(per_class)
        pc = " / ".join(_fmt(per_class[c], 2) for c in per_class) if per_class else "-"
        lines.append(f"| {name} | {_fmt(arm['epsilon'], 2)} | {_fmt(arm['cas'])} | {pc} | "
                     f"{_fmt(arm['tstr_relative'])} | {_fmt(arm['fd_domain'], 2)} | {_fmt(arm['lpips_diversity'])} | "
                     f"{_fmt(arm['minutes'], 1)} | {d.get('seeds', '-')} | {_fmt(d.get('declined_site_rounds'))} |")
    if classes:
        lines += ["", f"CAS per class: {' / '.join(classes)}. Figures are means over seeds; "
                  "minutes are training wall time per seed (the sum of its rounds' times). "
                  "Declined: site-rounds in which a site did not train, summed over seeds (e.g. its privacy "
                  "budget spent by a killed attempt), so the arm got less than its compute."]
    return "\n".join(lines) + "\n"


def plot_utility(path: Path, arms: Mapping[str, Mapping[str, Any]]) -> Path:
    """Epsilon on x (log); TSTR-relative and CAS on y; non-DP arms as horizontal lines."""
    from medstylegan2.metrics.plots import _figure

    fig = _figure(10, 4)
    dp = sorted(((a["epsilon"], n) for n, a in arms.items() if a["epsilon"] is not None))
    plain = [n for n, a in arms.items() if a["epsilon"] is None]
    for i, (key, title) in enumerate((("tstr_relative", "TSTR relative to real-trained"),
                                      ("cas", "CAS (real-trained classifier on fakes)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, name in enumerate(plain):
            if arms[name][key] is not None:
                ax.axhline(arms[name][key], linestyle="--", color=f"C{j + 1}", label=name)
        if dp:
            xs = [e for e, _ in dp]
            ys = [arms[n][key] if arms[n][key] is not None else float("nan") for _, n in dp]
            ax.plot(xs, ys, "o-", color="C0", label="DP arms")
            for (e, n), y in zip(dp, ys):
                ax.annotate(n, (e, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
        ax.set_xlabel("epsilon per site (delta <= 1e-5)")
        ax.set_ylabel(key)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_arm_grids(path: Path, grids: Mapping[str, np.ndarray], class_names: Sequence[str]) -> Path:
    """One sample grid per arm (rows: classes), side by side, titled with the arm's name."""
    from medstylegan2.metrics.plots import _figure

    n = len(grids)
    fig = _figure(3.2 * n, 3.6)
    for i, (name, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        h = grid.shape[0] / len(class_names)
        ax.set_yticks([h * (k + 0.5) for k in range(len(class_names))])
        ax.set_yticklabels(class_names if i == 0 else [""] * len(class_names), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def sample_grid(checkpoint: str | Path, per_class: int = 6, seed: int = 0) -> np.ndarray:
    from medstylegan2.tiling import tile_rows
    from medstylegan2.sampling import generate_per_class, load_generator

    G, _ = load_generator(checkpoint)
    fake = generate_per_class(G, per_class, seed=seed)
    return tile_rows([fake.images[fake.labels == k] for k in range(G.num_classes)])


def write_outputs(out: Path, profile: str, arms: Mapping[str, Mapping[str, Any]],
                  details: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Path]:
    """study.json, study.md, utility.png and arms.png for the finished arms."""
    paths = {"json": write_study_json(out, profile, arms),
             "md": atomic_write_text(out / "study.md", study_table(profile, arms, details)),
             "utility": plot_utility(out / "utility.png", arms)}
    grids = {name: sample_grid(out / arm["checkpoint"]) for name, arm in arms.items()}
    paths["arms"] = plot_arm_grids(out / "arms.png", grids, class_names)
    return paths

