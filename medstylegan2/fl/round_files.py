"""A server round's commit point and the files derived from it: nothing lost, nothing twice.

A round is **committed** when its checkpoint ``round_XXX.pt`` atomically replaces nothing or an
older file (``fl.server_state.save_round_checkpoint``). The checkpoint carries everything the
round produced that cannot be recomputed: the weights and server optimizer state, the privacy
records, the round's ``metrics.jsonl`` lines (kind ``round``, and kind ``eval`` when the evaluator
ran) and the evaluator's full record. The evaluator runs *before* the commit, as part of the
round: a crash before the commit redoes the whole round, evaluation included; a crash after it
loses nothing.

Every other file of the round is **derived** from the committed state and written after the
commit, idempotently (``ensure_round_files``): a ``metrics.jsonl`` line is added only if its
(round, kind) is not there yet; a grid, an eval record or the privacy report is written when it
is missing or differs. The server calls it after each commit, again at the start of the next
round, and at ``--resume`` (``restore_run_folder``, which also drops what an uncommitted round left
behind: later lines, a torn last line, later grids and eval records).

Write points of a round (fault points, ``medstylegan2.faults``), in order:
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from medstylegan2.config import RunConfig
from medstylegan2.faults import fault_point
from medstylegan2.fl.server_state import ServerState, read_round_checkpoint, save_round_checkpoint
from medstylegan2.fl.wire import flatten_weights, unflatten_weights
from medstylegan2.runfolder import RunFolder, atomic_write_json, metrics_key, round_numbers_in

log = logging.getLogger(__name__)

SERVER_WRITE_POINTS: tuple[str, ...] = (
    "after_aggregation",  # new global weights in memory; nothing written for this round
    "after_evaluation",   # the evaluator's eval/ files of this round written (the round is not committed)
    "checkpoint_temp",    # round_XXX.pt's temporary file complete, not yet in place
    "after_checkpoint",   # COMMIT: round_XXX.pt in place (older ones pruned)
    "after_metrics",      # the round's metrics.jsonl lines (round, eval)
    "after_eval_files",   # eval/round_XXX.json, metrics.png
    "after_grid",         # grids/round_XXX.png
    "after_privacy",      # privacy.json, privacy.png
)
__doc__ += "".join(f"\n- ``{point}``" for point in SERVER_WRITE_POINTS) + "\n"


def commit_round(folder: RunFolder, cfg: RunConfig, state: ServerState, sites: Mapping[str, int]) -> Path:
    """Write ``state``'s round checkpoint: the round's one commit point (see the module docstring)."""
    round_num = state.round
    path = save_round_checkpoint(folder, cfg, state, sites,
                                 before_replace=lambda: fault_point("checkpoint_temp", round_num=round_num))
    fault_point("after_checkpoint", round_num=round_num)
    return path


def ensure_round_files(folder: RunFolder, cfg: RunConfig, state: ServerState, *,
                       device: torch.device | str = "cpu") -> list[str]:
    """Write every file derived from the committed round ``state.round`` that is missing or stale.

    Returns what it wrote (names relative to the run folder). Idempotent: a second call writes nothing.
    """
    round_num = state.round
    written: list[str] = []
    if round_num <= 0:
        return written

    def step(what: str, action: Callable[[], Any]) -> None:
        # One broken derived file must not keep the others from being written.
        try:
            written.extend(action())
        except Exception as exc:  # noqa: BLE001 - retried at the next round and at --resume
            log.warning("round %d: %s not written (retried at the next round or --resume): %s: %s",
                        round_num, what, type(exc).__name__, exc)

    def metrics() -> list[str]:
        added = folder.ensure_metrics(state.records)
        return [f"{folder.metrics.name} ({added} line(s))"] if added else []

    def grid() -> list[str]:
        path = folder.grid(round_num)
        if path.is_file():
            return []
        write_grid(cfg, state.weights, path, device=device)
        return [str(path.relative_to(folder.root))]

    def privacy() -> list[str]:
        if not state.privacy or not _privacy_report_stale(folder, cfg, state.privacy):
            return []
        from medstylegan2.privacy_report import write_privacy_report

        p = cfg.privacy
        write_privacy_report(folder.root, state.privacy, p.delta, p.accountant, budget=p.budget_epsilon, echo=False)
        return ["privacy.json", "privacy.png"]

    step("metrics.jsonl", metrics)
    fault_point("after_metrics", round_num=round_num)
    if state.eval_record is not None:
        step("eval record", lambda: _ensure_eval_files(folder, round_num, state.eval_record))
    fault_point("after_eval_files", round_num=round_num)
    step("sample grid", grid)
    fault_point("after_grid", round_num=round_num)
    step("privacy report", privacy)
    fault_point("after_privacy", round_num=round_num)
    return written


def restore_run_folder(folder: RunFolder, cfg: RunConfig, state: ServerState, *,
                       device: torch.device | str = "cpu") -> list[str]:
    """At ``--resume``: drop what uncommitted rounds left, restore what committed rounds miss.

    ``state`` is the newest checkpoint's. Older committed rounds whose line or grid is missing are
    restored from their own checkpoint while it is kept (``federation.keep_checkpoints``).
    """
    folder.repair_metrics(state.round)
    folder.remove_temporary_files()
    for stale in _files_after(folder, state.round):
        stale.unlink(missing_ok=True)
    written: list[str] = []
    have = {metrics_key(r) for r in folder.metrics_records()}
    for round_num in folder.checkpoint_rounds():
        if round_num >= state.round:
            continue
        if (round_num, "round") in have and folder.grid(round_num).is_file():
            continue
        try:
            older = state_of_checkpoint(folder.checkpoint(round_num))
        except Exception as exc:  # an unreadable old checkpoint costs its derived files, not the run
            log.warning("cannot restore the files of round %d from %s: %s", round_num, folder.checkpoint(round_num),
                        exc)
            continue
        older.privacy = {}  # the newest checkpoint's privacy records are the complete ones
        written += ensure_round_files(folder, cfg, older, device=device)
    written += ensure_round_files(folder, cfg, state, device=device)
    missing = [r for r in range(1, state.round + 1) if (r, "round") not in {metrics_key(x) for x in
                                                                          folder.metrics_records()}]
    if missing:
        log.warning("metrics.jsonl lacks round(s) %s and their checkpoints are gone (keep_checkpoints); "
                    "those lines cannot be restored", ", ".join(map(str, missing)))
    return written


def state_of_checkpoint(path: Path) -> ServerState:
    """The part of a round checkpoint that its derived files need (weights, records, privacy)."""
    ckpt = read_round_checkpoint(path)
    fed = ckpt["federation"]
    weights = flatten_weights({name: ckpt[name] for name in ("G", "G_ema", "D")})
    return ServerState(round=int(ckpt["round"]), weights=weights, optimizer={}, run_token=str(fed["run_token"]),
                       privacy=dict(fed.get("privacy", {})), records=list(fed.get("records", [])),
                       eval_record=fed.get("eval_record"))


def write_grid(cfg: RunConfig, weights: Mapping[str, torch.Tensor], path: Path, *,
               device: torch.device | str = "cpu") -> Path:
    """The round's sample grid from the global G_ema (fixed latents: the same file every time)."""
    from medstylegan2.sampling import save_class_grid

    return save_class_grid(generator_of(cfg, weights, device=device), path, per_class=8, seed=0, device=device)


def generator_of(cfg: RunConfig, weights: Mapping[str, torch.Tensor], *,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """The global G_ema as a generator in eval mode."""
    from medstylegan2.networks import build_networks
    from medstylegan2.network_weights import load_state_dict_checked

    G, _ = build_networks(cfg.model)
    load_state_dict_checked(G, unflatten_weights(weights)["G_ema"], what="global G_ema")
    return G.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------


def _ensure_eval_files(folder: RunFolder, round_num: int, record: Mapping[str, Any]) -> list[str]:
    written = []
    path = folder.eval_record(round_num)
    if not path.is_file():
        atomic_write_json(path, {k: v for k, v in record.items() if k != "json"})
        written.append(str(path.relative_to(folder.root)))
    plot = folder.root / "metrics.png"
    if written or not plot.is_file() or plot.stat().st_mtime < path.stat().st_mtime:
        from medstylegan2.metrics.plots import plot_metrics

        if plot_metrics(folder.root) is not None:
            written.append(plot.name)
    return written


def _privacy_report_stale(folder: RunFolder, cfg: RunConfig, records: Mapping[str, Any]) -> bool:
    import json

    from medstylegan2.privacy_report import REPORT_JSON, REPORT_PNG, build_report
    from medstylegan2.runfolder import jsonable

    path = folder.root / REPORT_JSON
    if not path.is_file() or not (folder.root / REPORT_PNG).is_file():
        return True
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return current != jsonable(build_report(records, cfg.privacy.delta, cfg.privacy.accountant))


def _files_after(folder: RunFolder, last_round: int) -> list[Path]:
    """Grids and eval records of rounds after ``last_round``: left by a round that never committed."""
    stale = [folder.grid(r) for r in round_numbers_in(folder.grid(0).parent, ".png") if r > last_round]
    stale += [folder.eval_record(r) for r in round_numbers_in(folder.eval_dir, ".json") if r > last_round]
    return stale

