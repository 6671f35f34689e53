"""The server's evaluator after a round: ``medstylegan2.metrics.evaluate`` every
``federation.evaluate_every`` rounds and after the last.

It runs before the round's commit point (``medstylegan2.fl.round_files``): its record goes into the
round checkpoint, and the ``metrics.jsonl`` line, ``eval/round_XXX.json`` and ``metrics.png`` are
derived from there. The sample grid of every round is a derived file too (``round_files.write_grid``).
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

    @property
    def active(self) -> bool:
        """False without held-out data or without metrics (``metrics.metrics: []``): nothing to evaluate."""
        return self.heldout is not None and bool(self.cfg.metrics.metrics)

    def generator(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        return generator_of(self.cfg, weights, device=self.device)

    def evaluate(self, round_num: int, weights: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """(summary for the round's metrics line, the evaluator's full record or None)."""
        if not self.active:
            return {}, None
        try:
            from medstylegan2.metrics.evaluate import evaluate_generator
        except ImportError:
            return {}, None
        try:
            # out_dir=<run>, no run_dir: the evaluator writes eval/round_XXX.json and its PNGs but no
            # metrics.jsonl line; the server derives that from the committed record.
            record = evaluate_generator(self.generator(weights), self.heldout, self.train, self.cfg.metrics,
                                        self.folder.root, round_num, None, str(self.device))
        except Exception as exc:  # an evaluation problem must never end a long run
            warn("round %d: evaluation failed: %s: %s", round_num, type(exc).__name__, exc)
            return {"eval": {"error": f"{type(exc).__name__}: {exc}"}}, None
        overall = dict(record.get("overall", {}))
        info("round %d: evaluation %s", round_num, overall)
        return {"eval": {"file": record.get("json"), "overall": overall}}, record
