"""The server side of the federation: aggregation, round checkpoints, resume and the evaluation hook.

``FederatedGAN`` is a Flower ``FedAvg`` (``flwr.serverapp.strategy``) whose round is:

1. ``configure_train``: pick this round's sites (``fraction_train``, at least ``min_sites``,
   reproducible from (seed, round)), send them the global weights (float32 or float16, model
   constants excluded) and a ConfigRecord with the validated run config as JSON.
2. ``aggregate_train``: check every reply (errors, declines under DP, zero-example sites, keys,
   shapes, dtypes, NaN/Inf: a bad update is dropped with a log line naming the site and the key),
   average the updates of the remaining sites weighted by their examples, apply the server
   optimizer (FedAvg / FedAvgM / FedAdam; G_ema and buffers are averaged as they are), save
   ``round_XXX.pt``, run the evaluation hook (sample grid every round; the evaluator every
   ``evaluate_every`` rounds and at the end) and append one line to ``metrics.jsonl``.

``run_federation`` wraps a run: fresh start or resume from the last round checkpoint (global
weights, server optimizer state, run token: the sites find their own local state by it), a roll
call that maps Flower node ids to site names, then Flower's ``Strategy.start`` for the remaining
rounds. No federated evaluation round: a GAN is evaluated centrally from G_ema.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medstylegan2 import federation as fed
from medstylegan2.config import RunConfig
from medstylegan2.errors import CheckpointError, UserError
from medstylegan2.runfolder import RunFolder, read_checkpoint
from medstylegan2.trainer import resolve_device

log = logging.getLogger("medstylegan2.server")

LOSS_KEYS = ("loss_g", "loss_d_fake", "loss_d_real", "loss_pl", "loss_ds", "loss_r1")


def _info(msg: str, *args: Any) -> None:
    # Flower's own logger is what `flwr run --stream` and the simulation print; mirror to ours.
    from flwr.common.logger import log as flwr_log

    flwr_log(logging.INFO, msg, *args)


def _warn(msg: str, *args: Any) -> None:
    from flwr.common.logger import log as flwr_log

    flwr_log(logging.WARNING, msg, *args)


# ----------------------------------------------------------------------------------------------
# Evaluation hook


class EvaluationHook:
    """Per-round sample grid, and the evaluator (``medstylegan2.metrics.evaluate``) when present."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, *, heldout: Any = None, train: Any = None):
        self.cfg, self.folder = cfg, folder
        self.heldout, self.train = heldout, train
        self.device = resolve_device(cfg.device)

    def generator(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        from medstylegan2.networks import build_networks
        from medstylegan2.trainer import load_state_dict_checked

        G, _ = build_networks(self.cfg.model)
        load_state_dict_checked(G, fed.unflatten_weights(weights)["G_ema"], what="global G_ema")
        return G.to(self.device).eval().requires_grad_(False)

    def __call__(self, round_num: int, weights: dict[str, torch.Tensor], *, evaluate: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        G = self.generator(weights)
        try:
            from medstylegan2.sampling import save_class_grid

            path = save_class_grid(G, self.folder.grid(round_num), per_class=8, seed=0, device=self.device)
            out["grid"] = str(Path(path).relative_to(self.folder.root))
        except Exception as exc:  # a grid must never end a long run
            _warn("round %d: sample grid failed: %s: %s", round_num, type(exc).__name__, exc)
        if evaluate and self.heldout is not None:
            out["eval"] = self._evaluate(G, round_num)
        return out

    def _evaluate(self, G: torch.nn.Module, round_num: int) -> Optional[dict[str, Any]]:
        try:
            from medstylegan2.metrics.evaluate import evaluate_generator
        except ImportError:
            return None
        try:
            # Writes <run>/eval/round_XXX.json and its own "kind": "eval" line in metrics.jsonl.
            result = evaluate_generator(G, self.heldout, self.train, self.cfg.metrics, self.folder.root / "eval",
                                        round_num, self.folder.root, str(self.device))
        except Exception as exc:  # an evaluation problem must never end a long run
            _warn("round %d: evaluation failed: %s: %s", round_num, type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        overall = dict(result.get("overall", {})) if isinstance(result, dict) else {}
        _info("round %d: evaluation %s", round_num, overall)
        return {"file": result.get("json") if isinstance(result, dict) else None, "overall": overall}


# ----------------------------------------------------------------------------------------------
# The strategy


@dataclass
class SiteInfo:
    node_id: int
    name: str
    num_examples: int


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


class FederatedGAN(FedAvg):
    def __init__(self, cfg: RunConfig, folder: RunFolder, state: ServerState, sites: dict[int, SiteInfo], *,
                 buffer_keys: set[str], hook: EvaluationHook, site_state_dir: str = "", stop_after: int = 0):
        f = cfg.federation
        super().__init__(fraction_train=f.fraction_train, fraction_evaluate=0.0, min_train_nodes=f.min_sites,
                         min_evaluate_nodes=0, min_available_nodes=f.min_sites)
        self.cfg, self.folder, self.state, self.sites, self.hook = cfg, folder, state, sites, hook
        self.site_state_dir = site_state_dir
        self.stop_after = stop_after
        self.round_offset = state.round
        self.optimizer = fed.make_server_optimizer(cfg)
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
        self.plain_keys = fed.averaged_only_keys(state.weights, buffer_keys)
        self.expected_shapes = {k: tuple(v.shape) for k, v in fed.transferred(state.weights).items()}
        self.digest = fed.constants_digest(state.weights)
        self.config_json = json.dumps(cfg.to_dict())
        self._round_started = 0.0
        self._sent: dict[str, torch.Tensor] = {}
        self._bytes_down = 0

    # -- Flower strategy interface -----------------------------------------------------------------
    def summary(self) -> None:
        f = self.cfg.federation
        _info("\t├──> FederatedGAN: %s (server lr %g), %d site(s) known, fraction %.2f, min sites %d",
              f.aggregation, f.server_lr, len(self.sites), f.fraction_train, f.min_sites)
        _info("\t└──> %d local steps per round, transfer %s, run folder %s", f.local_steps, f.transfer_dtype,
              self.folder.root)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_num = self.round_offset + server_round
        self._round_started = time.perf_counter()
        if self.state.stopped:
            _info("round %d: skipped (no site can train any more)", round_num)
            return []
        if self._halted(round_num):
            return []
        f = self.cfg.federation
        connected = set(grid.get_node_ids())
        present = {info.name: node for node, info in self.sites.items() if node in connected}
        chosen = fed.sample_sites(list(present), f.fraction_train, f.min_sites, seed=self.cfg.seed,
                                  round_num=round_num)
        _info("round %d: training on %d of %d site(s): %s", round_num, len(chosen), len(present), ", ".join(chosen))

        sent = fed.encode_for_transfer(fed.transferred(self.state.weights), f.transfer_dtype)
        self._sent = fed.decode_from_transfer(sent)
        record = ArrayRecord({key: Array(value) for key, value in sent.items()})
        self._bytes_down = record.count_bytes()
        train_config = ConfigRecord({
            "round": round_num, "server-round": round_num, "run-token": self.state.run_token,
            "run-config": self.config_json, "constants-digest": self.digest,
            "site-state-dir": self.site_state_dir,
        })
        content = RecordDict({"arrays": record, "config": train_config})
        return [Message(content=content, dst_node_id=present[name], message_type=MessageType.TRAIN)
                for name in chosen]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        round_num = self.round_offset + server_round
        if self.state.stopped or self._halted(round_num):
            return None, None
        f = self.cfg.federation
        replies = list(replies)
        accepted: list[tuple[str, dict[str, torch.Tensor], float, dict[str, float]]] = []
        per_site: dict[str, dict[str, Any]] = {}
        declined = 0
        for msg in replies:
            name = self._site_of(msg)
            entry: dict[str, Any] = {"bytes_down": self._bytes_down}
            per_site[name] = entry
            if msg.has_error():
                entry["status"] = f"error: {msg.error.reason}"
                _warn("round %d: site %s failed: %s", round_num, name, msg.error.reason)
                continue
            content = msg.content
            metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
            entry.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            entry["bytes_up"] = content["arrays"].count_bytes() if "arrays" in content.array_records else 0
            if "num-examples" not in metrics or float(metrics["num-examples"]) < 0:
                entry["status"] = "rejected: no valid num-examples"
                _warn("round %d: rejected the update of site %s: key 'num-examples' is missing or negative",
                      round_num, name)
                continue
            self._record_privacy(name, round_num, metrics)
            if float(metrics.get("declined", 0)) > 0:
                declined += 1
                entry["status"] = "declined"
                _info("round %d: site %s declined: one more round would exceed its privacy budget "
                      "(epsilon %.3g)", round_num, name, float(metrics.get("dp-epsilon", float("nan"))))
                continue
            weight = float(metrics["num-examples"])
            if weight == 0:
                entry["status"] = "no examples"
                _info("round %d: site %s has no training images; it contributes nothing", round_num, name)
                continue
            if "arrays" not in content.array_records:
                entry["status"] = "rejected: no weights"
                _warn("round %d: rejected the update of site %s: key 'arrays' (the weights) is missing",
                      round_num, name)
                continue
            arrays = {key: array.numpy() for key, array in content["arrays"].items()}
            problems = fed.validate_update(arrays, self.expected_shapes)
            kind = str(content["site"]["payload"]) if "site" in content.config_records else fed.PAYLOAD_WEIGHTS
            if kind not in (fed.PAYLOAD_WEIGHTS, fed.PAYLOAD_DELTA):
                problems.append(f"key 'payload' is {kind!r}")
            if problems:
                entry["status"] = "rejected: " + "; ".join(problems)
                _warn("round %d: rejected the update of site %s: %s", round_num, name, "; ".join(problems))
                continue
            update = fed.site_update(fed.decode_from_transfer(arrays), kind, self._sent)
            accepted.append((name, update, weight, metrics))
            entry["status"] = "ok"

        accepted.sort(key=lambda item: item[0])  # summation order fixed: resumable bit for bit
        contributing = len(accepted)
        if contributing and contributing >= min(f.min_sites, len(self.sites)):
            average = fed.weighted_average([u for _, u, _, _ in accepted], [w for _, _, w, _ in accepted])
            new = fed.transferred(self.state.weights)
            new = self.optimizer.step(new, average, self.plain_keys)
            self.state.weights.update(new)
        elif contributing:
            _warn("round %d: only %d valid update(s), fewer than min_sites=%d: global weights unchanged",
                  round_num, contributing, f.min_sites)
        else:
            _warn("round %d: no valid update: global weights unchanged", round_num)

        num_examples = sum(w for _, _, w, _ in accepted)
        aggregated = fed.weighted_metrics([m for *_, m in accepted], [w for _, _, w, _ in accepted], LOSS_KEYS)
        aggregated["num-examples"] = num_examples
        aggregated["sites"] = contributing
        aggregated["images_per_second"] = sum(m.get("images_per_second", 0.0) for *_, m in accepted)
        self.state.cur_nimg += int(sum(m.get("real_images_seen", 0.0) for *_, m in accepted))
        self.state.round = round_num
        self.state.optimizer = self.optimizer.state_dict()
        total_rounds = self.cfg.federation.rounds
        if replies and declined == len(replies):
            self.state.stopped = True
            _info("round %d: every site declined (privacy budgets spent): the run ends here", round_num)
        self.save_checkpoint()

        evaluate = (f.evaluate_every > 0 and round_num % f.evaluate_every == 0) or round_num >= total_rounds \
            or self.state.stopped
        extra = self.hook(round_num, self.state.weights, evaluate=evaluate)
        seconds = time.perf_counter() - self._round_started
        record = {"round": round_num, "kind": "round", "seconds": seconds, "aggregated": aggregated,
                  "sites": per_site,
                  "bytes_down_per_site": self._bytes_down,
                  "bytes_up": int(sum(e.get("bytes_up", 0) for e in per_site.values())),
                  "transfer_dtype": f.transfer_dtype, **extra}
        self.folder.append_metrics(record)
        self._write_privacy_report()
        _info("round %d: %d site(s) aggregated, loss_g %.4f, loss_d %.4f, %.1f s", round_num, contributing,
              aggregated.get("loss_g", float("nan")),
              aggregated.get("loss_d_fake", float("nan")) + aggregated.get("loss_d_real", float("nan")), seconds)

        out_record = ArrayRecord({k: Array(v.numpy()) for k, v in fed.transferred(self.state.weights).items()})
        out_metrics = MetricRecord({k: float(v) for k, v in aggregated.items()})
        return out_record, out_metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluated centrally from G_ema (see EvaluationHook)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _halted(self, round_num: int) -> bool:
        """True after ``stop_after`` rounds: the run ends as if the server had been killed."""
        if self.stop_after and round_num > self.stop_after:
            if round_num == self.stop_after + 1:
                _info("stopping after round %d as asked (stop-after); continue with --resume", self.stop_after)
            return True
        return False

    def _site_of(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if node in self.sites:
            return self.sites[node].name
        if msg.has_content() and "site" in msg.content.config_records:
            return str(msg.content["site"]["site"])
        return f"node-{node}"

    def _record_privacy(self, name: str, round_num: int, metrics: dict[str, Any]) -> None:
        figures = {k[3:]: float(v) for k, v in metrics.items() if k.startswith("dp-")}
        if figures:
            self.state.privacy.setdefault(name, []).append({"round": round_num, **figures})

    def _write_privacy_report(self) -> None:
        """``privacy.json`` + ``privacy.png`` (the contract of ``medstylegan2.privacy_report``)."""
        if not self.state.privacy:
            return
        from medstylegan2.privacy_report import write_privacy_report

        p = self.cfg.privacy
        try:
            write_privacy_report(self.folder.root, self.state.privacy, p.delta, p.accountant, budget=p.budget_epsilon,
                                 echo=False)
        except Exception as exc:  # a report problem must never end a run; metrics.jsonl has the figures
            _warn("privacy report not written: %s: %s", type(exc).__name__, exc)

    def save_checkpoint(self) -> Path:
        nested = fed.unflatten_weights(self.state.weights)
        state = {
            "config": self.cfg.to_dict(),
            "G": nested["G"], "G_ema": nested["G_ema"], "D": nested["D"],
            # Counters in the trainer's terms: G+D steps each participating site took, and all
            # real images shown to D over all sites.
            "step": self.state.round * self.cfg.federation.local_steps,
            "cur_nimg": self.state.cur_nimg,
            "round": self.state.round,
            "federation": {"run_token": self.state.run_token, "optimizer": self.state.optimizer,
                           "stopped": self.state.stopped, "privacy": self.state.privacy,
                           "sites": {info.name: info.num_examples for info in self.sites.values()}},
        }
        return self.folder.write_checkpoint(self.state.round, state, keep=self.cfg.federation.keep_checkpoints)


# ----------------------------------------------------------------------------------------------
# A whole run


def load_server_state(folder: RunFolder, cfg: RunConfig) -> ServerState:
    """The state of the last round checkpoint in ``folder`` (for --resume)."""
    rounds = folder.checkpoint_rounds()
    if not rounds:
        raise UserError(f"--resume: no round_XXX.pt in {folder.root}; start without --resume")
    path = folder.checkpoint(rounds[-1])
    ckpt = read_checkpoint(path)
    if "federation" not in ckpt:
        raise CheckpointError(f"{path} is not a federated round checkpoint (no 'federation' section)")
    if ckpt["config"]["model"] != cfg.to_dict()["model"] or ckpt["config"]["seed"] != cfg.seed:
        raise UserError(f"--resume: {path} was written with another model config or seed than this run's; "
                        "resume with the same config (only federation.rounds and training settings may change)")
    weights = fed.flatten_weights({name: ckpt[name] for name in ("G", "G_ema", "D")})
    fed_state = ckpt["federation"]
    return ServerState(round=int(ckpt["round"]), weights={k: v.float() if v.is_floating_point() else v
                                                          for k, v in weights.items()},
                       optimizer=fed_state["optimizer"], run_token=fed_state["run_token"],
                       cur_nimg=int(ckpt["cur_nimg"]), stopped=bool(fed_state.get("stopped", False)),
                       privacy=dict(fed_state.get("privacy", {})))


def roll_call(grid: Grid, cfg: RunConfig) -> dict[int, SiteInfo]:
    """Wait for the sites, ask each for its name and example count; node id -> SiteInfo."""
    f = cfg.federation
    deadline = time.monotonic() + f.connect_timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= f.sites or time.monotonic() > deadline:
            break
        _info("waiting for sites: %d of %d connected", len(nodes), f.sites)
        time.sleep(1.0)
    if len(nodes) < f.min_sites:
        raise UserError(f"only {len(nodes)} site(s) connected within {f.connect_timeout_s:g} s; "
                        f"federation.min_sites is {f.min_sites}")
    config = ConfigRecord({"run-config": json.dumps(cfg.to_dict())})
    messages = [Message(content=RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    replies = grid.send_and_receive(messages, timeout=f.round_timeout_s)
    sites: dict[int, SiteInfo] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            _warn("site at node %d cannot take part: %s", node, msg.error.reason)
            continue
        name = str(msg.content["site"]["site"])
        if name in {s.name for s in sites.values()}:
            _warn("two nodes call themselves %r; node %d is left out (give each SuperNode its own site-name)",
                  name, node)
            continue
        sites[node] = SiteInfo(node_id=node, name=name, num_examples=int(msg.content["metrics"]["num-examples"]))
    if len(sites) < f.min_sites:
        raise UserError(f"only {len(sites)} site(s) answered the roll call; federation.min_sites is {f.min_sites}")
    for info in sorted(sites.values(), key=lambda s: s.name):
        _info("site %s: %d training image(s)", info.name, info.num_examples)
    return sites


def run_federation(grid: Grid, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                   site_state_dir: str = "", server_data: bool = True, stop_after: int = 0) -> ServerState:
    """Train ``cfg.federation.rounds`` rounds (or the rest of them with ``resume``) over the grid."""
    folder = RunFolder(Path(run_dir))
    if resume:
        state = load_server_state(folder, cfg)
        folder.truncate_metrics(state.round)
        _info("resuming %s after round %d of %d", folder.root, state.round, cfg.federation.rounds)
        _, buffer_keys = fed.initial_weights(cfg)
    else:
        if folder.checkpoint_rounds():
            raise UserError(f"{folder.root} already holds round checkpoints; pass --resume to continue that run "
                            "or choose another --out")
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.metrics.unlink(missing_ok=True)
        weights, buffer_keys = fed.initial_weights(cfg)
        state = ServerState(round=0, weights=weights, optimizer={}, run_token=uuid.uuid4().hex)
    folder.write_config(cfg.to_dict())

    remaining = cfg.federation.rounds - state.round
    if remaining <= 0 or state.stopped:
        _info("nothing to do: %s is at round %d of %d", folder.root, state.round, cfg.federation.rounds)
        return state

    heldout = train = None
    if server_data:
        try:
            train, heldout = fed.load_split(cfg)
        except Exception as exc:  # the server may have no data at all (deployment)
            _warn("server-side evaluation data unavailable (%s: %s); writing sample grids only",
                  type(exc).__name__, exc)
    hook = EvaluationHook(cfg, folder, heldout=heldout, train=train)

    sites = roll_call(grid, cfg)
    strategy = FederatedGAN(cfg, folder, state, sites, buffer_keys=buffer_keys, hook=hook,
                            site_state_dir=site_state_dir, stop_after=stop_after)
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in fed.transferred(state.weights).items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=cfg.federation.round_timeout_s)
    return state
