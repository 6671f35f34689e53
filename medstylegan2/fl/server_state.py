"""The server's state between rounds, and the round checkpoint that carries it.

A round checkpoint ``round_XXX.pt`` is a regular Med-StyleGAN2 checkpoint (``G``, ``G_ema``, ``D``,
``config``, ``step``, ``cur_nimg``: ``medstylegan2 sample`` and ``evaluate`` read it) plus
``round`` and a ``federation`` section: the server optimizer's state, the run token (sites find
their own local state by it), whether the run stopped, the per-site privacy records, the sites
with their example counts, and the round's own records (its ``metrics.jsonl`` lines and, when the
evaluator ran, its full ``eval/round_XXX.json`` record). That is enough to resume a run exactly
(``load_server_state``) and to restore every file the round derived (``fl.round_files``): writing
this file is the round's one commit point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from medstylegan2.config import RunConfig
from medstylegan2.errors import CheckpointError, UserError
from medstylegan2.fl.wire import flatten_weights, unflatten_weights
from medstylegan2.runfolder import RunFolder, config_from_checkpoint, read_checkpoint


@dataclass
class ServerState:
    """What a round checkpoint holds beyond the networks (enough to resume exactly)."""

    round: int
    weights: dict[str, torch.Tensor]       # full global weights, float32, constants included
    optimizer: dict[str, Any]
    run_token: str
    cur_nimg: int = 0
    stopped: bool = False
    privacy: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    # The committed round's own records: its metrics.jsonl lines (kind "round", and "eval" when the
    # evaluator ran) and the evaluator's full record (eval/round_XXX.json).
    records: list[dict[str, Any]] = field(default_factory=list)
    eval_record: Optional[dict[str, Any]] = None


def save_round_checkpoint(folder: RunFolder, cfg: RunConfig, state: ServerState, sites: Mapping[str, int], *,
                          before_replace: Optional[Callable[[], None]] = None) -> Path:
    """``round_XXX.pt`` of ``state.round`` (atomic; only the newest ``keep_checkpoints`` stay).

    ``sites``: every known site's name and training-image count. ``before_replace`` runs when the
    temporary file is complete, before it replaces the target (a fault point).
    """
    nested = unflatten_weights(state.weights)
    checkpoint = {
        "config": cfg.to_dict(),
        "G": nested["G"], "G_ema": nested["G_ema"], "D": nested["D"],
        # Counters in the trainer's terms: G+D steps each participating site took, and all
        # real images shown to D over all sites.
        "step": state.round * cfg.federation.local_steps,
        "cur_nimg": state.cur_nimg,
        "round": state.round,
        "federation": {"run_token": state.run_token, "optimizer": state.optimizer,
                       "stopped": state.stopped, "privacy": state.privacy,
                       "sites": dict(sites), "records": state.records, "eval_record": state.eval_record},
    }
    return folder.write_checkpoint(state.round, checkpoint, keep=cfg.federation.keep_checkpoints,
                                   before_replace=before_replace)


def load_server_state(folder: RunFolder, cfg: RunConfig) -> ServerState:
    """The state of the last round checkpoint in ``folder`` (for --resume)."""
    rounds = folder.checkpoint_rounds()
    if not rounds:
        raise UserError(f"--resume: no round_XXX.pt in {folder.root}; start without --resume")
    path = folder.checkpoint(rounds[-1])
    ckpt = read_round_checkpoint(path)
    saved = config_from_checkpoint(ckpt, path).to_dict()
    if saved["model"] != cfg.to_dict()["model"] or saved["seed"] != cfg.seed:
        raise UserError(f"--resume: {path} was written with another model config or seed than this run's; "
                        "resume with the same config (only federation.rounds and training settings may change)")
    weights = flatten_weights({name: ckpt[name] for name in ("G", "G_ema", "D")})
    fed_state = ckpt["federation"]
    return ServerState(round=int(ckpt["round"]), weights={k: v.float() if v.is_floating_point() else v
                                                          for k, v in weights.items()},
                       optimizer=fed_state["optimizer"], run_token=fed_state["run_token"],
                       cur_nimg=int(ckpt["cur_nimg"]), stopped=bool(fed_state.get("stopped", False)),
                       privacy=dict(fed_state.get("privacy", {})), records=list(fed_state.get("records", [])),
                       eval_record=fed_state.get("eval_record"))


def read_round_checkpoint(path: Path) -> dict[str, Any]:
    """A federated round checkpoint; ``CheckpointError`` naming the file for anything else."""
    ckpt = read_checkpoint(path)
    fed_state = ckpt.get("federation")
    if not isinstance(fed_state, dict) or not {"run_token", "optimizer"} <= set(fed_state) or "round" not in ckpt:
        raise CheckpointError(f"{path} is not a federated round checkpoint (no 'federation' section)")
    if not all(isinstance(ckpt.get(name), dict) for name in ("G", "G_ema", "D")):
        raise CheckpointError(f"{path} lacks the G, G_ema or D weights (damaged?)")
    return ckpt
