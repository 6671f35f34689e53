"""The Flower strategy of the federation: Flower messages in and out, plain calls in between.

``FederatedGAN`` is a Flower ``FedAvg`` (``flwr.serverapp.strategy``) whose round is:

1. ``configure_train``: pick this round's sites (``fraction_train``, at least ``min_sites``,
   reproducible from (seed, round): ``fl.aggregation.sample_sites``), send them the global weights
   (float32, float16 or int8, model constants excluded: ``fl.wire``) and a ConfigRecord with the
   validated run config as JSON.
2. ``aggregate_train``: turn every reply into a plain ``SiteReply`` (a chosen site without a reply:
   an error entry) and hand them to ``fl.aggregation.aggregate_round`` (errors, declines, keys,
   shapes, dtypes, NaN/Inf, outlier norms: a bad update is dropped with a log line naming the site
   and the reason; the rest combined by ``aggregation_rule`` through the server optimizer), run the
   evaluator when due (``server.evaluation_hook``), commit the round (``fl.round_files.commit_round``:
   ``round_XXX.pt`` with the round's records) and write its derived files (``ensure_round_files``:
   ``metrics.jsonl`` lines, eval record, grid, privacy report), again checked before every round.

``run_federation`` wraps a run: fresh start or resume from the last round checkpoint (global
weights, server optimizer state, run token: the sites find their own local state by it), a roll
call that maps Flower node ids to site names, then Flower's ``Strategy.start`` for the remaining
rounds. No federated evaluation round: a GAN is evaluated centrally from G_ema.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medstylegan2.config import RunConfig
from medstylegan2.errors import UserError
from medstylegan2.fl.aggregation import (SiteReply, aggregate_round, averaged_only_keys, make_server_optimizer,
                                         sample_sites)
from medstylegan2.fl.partition import load_split
from medstylegan2.faults import fault_point
from medstylegan2.fl.round_files import commit_round, ensure_round_files, restore_run_folder
from medstylegan2.fl.server_state import ServerState, load_server_state
from medstylegan2.fl.wire import (PAYLOAD_WEIGHTS, constants_digest, decode_from_transfer, encode_for_transfer,
                                  initial_weights, is_packed_int8, transferred)
from medstylegan2.metrics.evaluate import eval_metrics_line
from medstylegan2.runfolder import RunFolder
from medstylegan2.trainer import resolve_device
from server.evaluation_hook import EvaluationHook
from server.logs import emit, info, warn


@dataclass
class SiteInfo:
    node_id: int
    name: str
    num_examples: int


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
        self.optimizer = make_server_optimizer(cfg)
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
        self.plain_keys = averaged_only_keys(state.weights, buffer_keys)
        self.expected_shapes = {k: tuple(v.shape) for k, v in transferred(state.weights).items()}
        self.digest = constants_digest(state.weights)
        self.config_json = json.dumps(cfg.to_dict())
        self._round_started = 0.0
        self._sent: dict[str, torch.Tensor] = {}
        self._chosen: list[str] = []
        self._outgoing: dict[str, Message] = {}
        self._left_out: set[int] = set()  # nodes whose site name another connected node already has
        self._bytes_down = 0

    # -- Flower strategy interface -----------------------------------------------------------------
    def summary(self) -> None:
        f = self.cfg.federation
        info("\t├──> FederatedGAN: %s (server lr %g), %d site(s) known, fraction %.2f, min sites %d",
             f.aggregation, f.server_lr, len(self.sites), f.fraction_train, f.min_sites)
        info("\t└──> %d local steps per round, transfer %s, run folder %s", f.local_steps, f.transfer_dtype,
             self.folder.root)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        round_num = self.round_offset + server_round
        self._round_started = time.perf_counter()
        if self.state.stopped:
            info("round %d: skipped (no site can train any more)", round_num)
            return []
        if self._halted(round_num):
            return []
        self._ensure_round_files()  # a crash or error after the last commit may have left some out
        f = self.cfg.federation
        present = self._present_sites(grid)
        chosen = sample_sites(list(present), f.fraction_train, f.min_sites, seed=self.cfg.seed, round_num=round_num)
        info("round %d: training on %d of %d site(s): %s", round_num, len(chosen), len(present), ", ".join(chosen))

        sent = encode_for_transfer(transferred(self.state.weights), f.transfer_dtype)
        self._sent = decode_from_transfer(sent, self.expected_shapes)
        record = ArrayRecord({key: Array(value) for key, value in sent.items()})
        self._bytes_down = record.count_bytes()
        train_config = ConfigRecord({
            "round": round_num, "run_token": self.state.run_token, "run_config": self.config_json,
            "constants_digest": self.digest, "site_state_dir": self.site_state_dir,
        })
        content = RecordDict({"arrays": record, "config": train_config})
        self._chosen = list(chosen)
        self._outgoing = {name: Message(content=content, dst_node_id=present[name], message_type=MessageType.TRAIN)
                          for name in chosen}
        return list(self._outgoing.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        round_num = self.round_offset + server_round
        if self.state.stopped or self._halted(round_num):
            return None, None
        f = self.cfg.federation
        site_replies = [self._site_reply(msg) for msg in replies]
        answered = {reply.name for reply in site_replies}
        # A site that crashed, hung or lost its connection sends nothing before the round's timeout.
        site_replies += [SiteReply(name=name, bytes_down=self._bytes_down,
                                   error=f"no reply within federation.round_timeout_s={f.round_timeout_s:g} s "
                                         "(site down, disconnected or stalled)")
                         for name in self._chosen if name not in answered]
        outcome = aggregate_round(site_replies, round_num=round_num,
                                  global_weights=self.state.weights, sent=self._sent,
                                  expected_shapes=self.expected_shapes, optimizer=self.optimizer,
                                  plain_keys=self.plain_keys, min_sites=f.min_sites, known_sites=len(self.sites),
                                  rule=f.aggregation_rule, trim_fraction=f.trim_fraction,
                                  outlier_factor=f.outlier_factor)
        for level, text in outcome.events:
            emit(level, "%s", text)
        if outcome.weights is not None:
            self.state.weights.update(outcome.weights)
        for name, figures in outcome.privacy.items():
            self.state.privacy.setdefault(name, []).append({"round": round_num, **figures})
        self.state.cur_nimg += outcome.real_images_seen
        self.state.round = round_num
        self.state.optimizer = self.optimizer.state_dict()
        if outcome.all_declined:
            self.state.stopped = True
            info("round %d: every site declined (privacy budgets spent): the run ends here", round_num)
        fault_point("after_aggregation", round_num=round_num)

        final = round_num >= f.rounds or self.state.stopped  # the run's last round: final_metrics join in
        evaluate = (f.evaluate_every > 0 and round_num % f.evaluate_every == 0) or final
        summary, eval_record = self.hook.evaluate(round_num, self.state.weights, final=final) if evaluate \
            else ({}, None)
        fault_point("after_evaluation", round_num=round_num)
        seconds = time.perf_counter() - self._round_started
        aggregated = outcome.aggregated
        record = {"round": round_num, "kind": "round", "seconds": seconds, "aggregated": aggregated,
                  "sites": outcome.sites,
                  "bytes_down_per_site": self._bytes_down,
                  "bytes_up": int(sum(e.get("bytes_up", 0) for e in outcome.sites.values())),
                  "transfer_dtype": f.transfer_dtype,
                  "grid": str(self.folder.grid(round_num).relative_to(self.folder.root)),
                  "server_rss_mb": _rss_mb(), **summary}
        self.state.records = [record] + ([eval_metrics_line(eval_record)] if eval_record is not None else [])
        self.state.eval_record = eval_record
        commit_round(self.folder, self.cfg, self.state, {site.name: site.num_examples for site in self.sites.values()})
        self._ensure_round_files()
        info("round %d: %d site(s) aggregated, %s, %.1f s", round_num, outcome.contributing,
             loss_summary(aggregated), seconds)

        out_record = ArrayRecord({k: Array(v.numpy()) for k, v in transferred(self.state.weights).items()})
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
                info("stopping after round %d as asked (stop-after); continue with --resume", self.stop_after)
            return True
        return False

    def _present_sites(self, grid: Grid) -> dict[str, int]:
        """Known sites connected now (name -> node id); waits up to ``connect_timeout_s`` for ``min_sites``.

        A site whose SuperNode died and was restarted (with SuperNode authentication it keeps its
        node id) is back as soon as it has reconnected.
        """
        f = self.cfg.federation
        deadline = time.monotonic() + f.connect_timeout_s
        while True:
            connected = set(grid.get_node_ids())
            self._welcome(grid, connected)
            present = {site.name: node for node, site in self.sites.items() if node in connected}
            if len(present) >= min(f.min_sites, len(self.sites)) or time.monotonic() > deadline:
                return present
            info("waiting for sites: %d of %d known site(s) connected, min_sites %d", len(present),
                 len(self.sites), f.min_sites)
            time.sleep(1.0)

    def _welcome(self, grid: Grid, connected: set[int]) -> None:
        """Nodes that connected since the last round: a known site back under a new node id (a SuperNode
        restarted, or re-enrolled with a new key) takes the place of its old node; a new site joins."""
        unknown = sorted(connected - set(self.sites) - self._left_out)
        if not unknown:
            return
        for site in ask_sites(grid, self.cfg, unknown):
            old = next((node for node, s in self.sites.items() if s.name == site.name), None)
            if old is not None and old in connected:
                warn("node %d calls itself %r, which node %d already is; it is left out", site.node_id,
                     site.name, old)
                self._left_out.add(site.node_id)
                continue
            if old is not None:
                del self.sites[old]
                info("site %s is back (node %d, was %d)", site.name, site.node_id, old)
            else:
                info("site %s joins: %d training image(s)", site.name, site.num_examples)
            self.sites[site.node_id] = site

    def _site_of(self, msg: Message) -> str:
        # An error the SuperLink writes for a node that went away (Node Unavailable) comes from the
        # link, not from the node: the message it answers names the site.
        answered = {sent.metadata.message_id: name for name, sent in self._outgoing.items() if sent.metadata.message_id}
        if msg.metadata.reply_to_message_id and msg.metadata.reply_to_message_id in answered:
            return answered[msg.metadata.reply_to_message_id]
        node = msg.metadata.src_node_id
        if node in self.sites:
            return self.sites[node].name
        if msg.has_content() and "site" in msg.content.config_records:
            return str(msg.content["site"]["site"])
        return f"node-{node}"

    def _ensure_round_files(self) -> None:
        """The committed round's derived files (idempotent; after each commit and before each round)."""
        try:
            ensure_round_files(self.folder, self.cfg, self.state, device=self.hook.device)
        except Exception as exc:  # derived files must never end a run: retried next round / --resume
            warn("round %d: writing its files failed (retried next round): %s: %s", self.state.round,
                 type(exc).__name__, exc)

    def _site_reply(self, msg: Message) -> SiteReply:
        """A Flower reply as plain data for ``aggregate_round``."""
        reply = SiteReply(name=self._site_of(msg), bytes_down=self._bytes_down)
        if msg.has_error():
            reply.error = msg.error.reason
            return reply
        content = msg.content
        reply.metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        if "arrays" in content.array_records:
            reply.bytes_up = content["arrays"].count_bytes()
            reply.arrays = {key: array.numpy() for key, array in content["arrays"].items()}
            if is_packed_int8(reply.arrays):
                # The server decodes: per-key float32 updates from here on (fl.wire, int8 transfer).
                try:
                    decoded = decode_from_transfer(reply.arrays, self.expected_shapes)
                except ValueError as exc:
                    reply.error, reply.arrays = f"int8 update does not fit the model: {exc}", None
                    return reply
                reply.arrays = {key: value.numpy() for key, value in decoded.items()}
        if "site" in content.config_records:
            reply.payload_kind = str(content["site"]["payload"])
        else:
            reply.payload_kind = PAYLOAD_WEIGHTS
        return reply


def loss_summary(aggregated: Mapping[str, float]) -> str:
    """The round's losses for the log. Under DP no site sends D's loss on real images (it is computed
    on real data outside the DP mechanism), so D's loss is then its loss on fakes, named as such."""
    text = f"loss_g {aggregated.get('loss_g', float('nan')):.4f}"
    if "loss_d_fake" in aggregated and "loss_d_real" in aggregated:
        return f"{text}, loss_d {aggregated['loss_d_fake'] + aggregated['loss_d_real']:.4f}"
    if "loss_d_fake" in aggregated:
        return f"{text}, loss_d_fake {aggregated['loss_d_fake']:.4f} (sites under DP send no loss on real images)"
    return text


def _rss_mb() -> Optional[float]:
    """This (server) process' resident memory in MB, for leak watching over long runs (Linux)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------
# A whole run


def ask_sites(grid: Grid, cfg: RunConfig, nodes: Iterable[int]) -> list[SiteInfo]:
    """Ask the given nodes for their site name and example count (a QUERY message each)."""
    config = ConfigRecord({"run_config": json.dumps(cfg.to_dict())})
    messages = [Message(content=RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    found = []
    for msg in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s):
        node = msg.metadata.src_node_id
        if msg.has_error():
            warn("site at node %d cannot take part: %s", node, msg.error.reason)
            continue
        found.append(SiteInfo(node_id=node, name=str(msg.content["site"]["site"]),
                              num_examples=int(msg.content["metrics"]["num_examples"])))
    return found


def roll_call(grid: Grid, cfg: RunConfig) -> dict[int, SiteInfo]:
    """Wait for the sites, ask each for its name and example count; node id -> SiteInfo."""
    f = cfg.federation
    deadline = time.monotonic() + f.connect_timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= f.sites or time.monotonic() > deadline:
            break
        info("waiting for sites: %d of %d connected", len(nodes), f.sites)
        time.sleep(1.0)
    if len(nodes) < f.min_sites:
        raise UserError(f"only {len(nodes)} site(s) connected within {f.connect_timeout_s:g} s; "
                        f"federation.min_sites is {f.min_sites}")
    sites: dict[int, SiteInfo] = {}
    for site in ask_sites(grid, cfg, nodes):
        if site.name in {s.name for s in sites.values()}:
            warn("two nodes call themselves %r; node %d is left out (give each SuperNode its own site-name)",
                 site.name, site.node_id)
            continue
        sites[site.node_id] = site
    if len(sites) < f.min_sites:
        raise UserError(f"only {len(sites)} site(s) answered the roll call; federation.min_sites is {f.min_sites}")
    for site in sorted(sites.values(), key=lambda s: s.name):
        info("site %s: %d training image(s)", site.name, site.num_examples)
    return sites


def run_federation(grid: Grid, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                   site_state_dir: str = "", server_data: bool = True, stop_after: int = 0) -> ServerState:
    """Train ``cfg.federation.rounds`` rounds (or the rest of them with ``resume``) over the grid."""
    folder = RunFolder(Path(run_dir))
    if resume:
        state = load_server_state(folder, cfg)
        info("resuming %s after round %d of %d", folder.root, state.round, cfg.federation.rounds)
        restored = restore_run_folder(folder, cfg, state, device=resolve_device(cfg.device))
        if restored:
            info("restored from the round checkpoints: %s", ", ".join(restored))
        _, buffer_keys = initial_weights(cfg)
    else:
        if folder.checkpoint_rounds():
            raise UserError(f"{folder.root} already holds round checkpoints; pass --resume to continue that run "
                            "or choose another --out")
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.metrics.unlink(missing_ok=True)
        weights, buffer_keys = initial_weights(cfg)
        state = ServerState(round=0, weights=weights, optimizer={}, run_token=uuid.uuid4().hex)
    folder.write_config(cfg.to_dict())

    remaining = cfg.federation.rounds - state.round
    if remaining <= 0 or state.stopped:
        info("nothing to do: %s is at round %d of %d", folder.root, state.round, cfg.federation.rounds)
        return state

    heldout = train = None
    if server_data:
        try:
            train, heldout = load_split(cfg)
        except Exception as exc:  # the server may have no data at all (deployment)
            warn("server-side evaluation data unavailable (%s: %s); writing sample grids only",
                 type(exc).__name__, exc)
    hook = EvaluationHook(cfg, folder, heldout=heldout, train=train)

    sites = roll_call(grid, cfg)
    strategy = FederatedGAN(cfg, folder, state, sites, buffer_keys=buffer_keys, hook=hook,
                            site_state_dir=site_state_dir, stop_after=stop_after)
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in transferred(state.weights).items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=cfg.federation.round_timeout_s)
    strategy._ensure_round_files()  # the last round's files, if writing them failed the first time
    return state
