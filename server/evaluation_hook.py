"""The server's evaluation hook after each round: a sample grid every round, the evaluator every
``federation.evaluate_every`` rounds and after the last (``medstylegan2.metrics.evaluate``), where
``metrics.final_metrics`` join ``metrics.metrics``; no evaluator when both lists are empty."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from medstylegan2.config import RunConfig
from medstylegan2.fl.wire import unflatten_weights
from medstylegan2.networks import build_networks
from medstylegan2.runfolder import RunFolder
from medstylegan2.sampling import save_class_grid
from medstylegan2.trainer import load_state_dict_checked, resolve_device
from server.logs import info, warn


class EvaluationHook:
    """Per-round sample grid, and the evaluator (``medstylegan2.metrics.evaluate``) when present."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, *, heldout: Any = None, train: Any = None):
        self.cfg, self.folder = cfg, folder
        self.heldout, self.train = heldout, train
        self.device = resolve_device(cfg.device)

    def generator(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        G, _ = build_networks(self.cfg.model)
        load_state_dict_checked(G, unflatten_weights(weights)["G_ema"], what="global G_ema")
        return G.to(self.device).eval().requires_grad_(False)

    def __call__(self, round_num: int, weights: dict[str, torch.Tensor], *, evaluate: bool,
                 final: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        G = self.generator(weights)
        try:
            path = save_class_grid(G, self.folder.grid(round_num), per_class=8, seed=0, device=self.device)
            out["grid"] = str(Path(path).relative_to(self.folder.root))
        except Exception as exc:  # a grid must never end a long run
            warn("round %d: sample grid failed: %s: %s", round_num, type(exc).__name__, exc)
        if evaluate and self.heldout is not None:
            result = self._evaluate(G, round_num, final)
            if result is not None:
                out["eval"] = result
        return out

    def _evaluate(self, G: torch.nn.Module, round_num: int, final: bool) -> Optional[dict[str, Any]]:
        try:
            from medstylegan2.metrics.evaluate import evaluate_generator, metrics_for_evaluation
        except ImportError:
            return None
        if not metrics_for_evaluation(self.cfg.metrics, final=final):
            return None  # metrics.metrics: [] - sample grids only
        try:
            # Writes <run>/eval/round_XXX.json and its own "kind": "eval" line in metrics.jsonl.
            result = evaluate_generator(G, self.heldout, self.train, self.cfg.metrics, self.folder.eval_dir,
                                        round_num, self.folder.root, str(self.device), final=final)
        except Exception as exc:  # an evaluation problem must never end a long run
            warn("round %d: evaluation failed: %s: %s", round_num, type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        overall = dict(result.get("overall", {})) if isinstance(result, dict) else {}
        info("round %d: evaluation %s", round_num, overall)
        return {"file": result.get("json") if isinstance(result, dict) else None, "overall": overall}
