"""The server's evaluator after a round: ``medstylegan2.metrics.evaluate`` every
``federation.evaluate_every`` rounds with ``metrics.metrics``, and after the last round (or the round
after which every site declined) with ``metrics.metrics`` + ``metrics.final_metrics``; no evaluator
when the lists are empty.

It runs before the round's commit point (``medstylegan2.fl.round_files``): its record goes into the
round checkpoint, and the ``metrics.jsonl`` line, ``eval/round_XXX.json`` and ``metrics.png`` are
derived from there. The final metrics are part of the last round's record, so a kill while they run
leaves that round uncommitted and ``--resume`` redoes it, final metrics included. The sample grid of
every round is a derived file too (``round_files.write_grid``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from medstylegan2.config import RunConfig
from medstylegan2.fl.round_files import generator_of
from medstylegan2.runfolder import RunFolder
from medstylegan2.trainer import resolve_device
from server.logs import info, warn


class EvaluationHook:
    """The evaluator (``medstylegan2.metrics.evaluate``) on the global G_ema, when there is data for it."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, *, heldout: Any = None, train: Any = None):
        self.cfg, self.folder = cfg, folder
        self.heldout, self.train = heldout, train
        self.device = resolve_device(cfg.device)

    def active(self, *, final: bool = False) -> bool:
        """False without held-out data or without metrics for this evaluation: nothing to evaluate."""
        from medstylegan2.metrics.evaluate import metrics_for_evaluation

        return self.heldout is not None and bool(metrics_for_evaluation(self.cfg.metrics, final=final))

    def generator(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        return generator_of(self.cfg, weights, device=self.device)

    def evaluate(self, round_num: int, weights: dict[str, torch.Tensor], *, final: bool = False
                 ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(summary for the round's metrics line, the evaluator's full record or None).

        ``final``: the run's last evaluation, where ``metrics.final_metrics`` join ``metrics.metrics``.
        """
        try:
            from medstylegan2.metrics.evaluate import evaluate_generator
        except ImportError:
            return {}, None
        if not self.active(final=final):
            return {}, None
        try:
            # out_dir=<run>, no run_dir: the evaluator writes eval/round_XXX.json and its PNGs but no
            # metrics.jsonl line; the server derives that from the committed record.
            record = evaluate_generator(self.generator(weights), self.heldout, self.train, self.cfg.metrics,
                                        self.folder.root, round_num, None, str(self.device), final=final)
        except Exception as exc:  # an evaluation problem must never end a long run
            warn("round %d: evaluation failed: %s: %s", round_num, type(exc).__name__, exc)
            return {"eval": {"error": f"{type(exc).__name__}: {exc}"}}, None
        overall = dict(record.get("overall", {}))
        info("round %d: %sevaluation %s", round_num, "final " if final else "", overall)
        return {"eval": {"file": record.get("json"), "overall": overall}}, record
