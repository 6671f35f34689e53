"""The hospital site: a Flower ClientApp that trains the global GAN for K steps on local images.

Thin by design: records in, records out. The site's round itself is ``medstylegan2.fl.site_round``
(``run_site_round``), its data ``medstylegan2.fl.partition`` (``load_site_data``).

What arrives (from the ServerApp): the global G, G_ema and D weights as the ArrayRecord
``arrays`` (float32, float16 or packed int8, model constants excluded) and the ConfigRecord ``config`` with
the run's validated configuration (``run_config``, JSON), the round, the run token and the
digest of the model constants.

What leaves: the ArrayRecord ``arrays`` (new weights, or the float16 or int8 update), the MetricRecord
``metrics`` (num_examples, losses, images/s, privacy figures ``dp_*`` under DP) and the ConfigRecord
``site`` (site name, payload kind). Never images, labels per image or anything of image shape.

What stays (``Context.state``, and ``<state-dir>/<run token>/<site>/round_XXX.pt`` when a state
folder is known): optimizer moments, path-length mean, batch sampler, counters and the privacy
accountant; see ``medstylegan2.fl.site_round.local_state_of``.

Node config (deployment): ``data-dir`` (required: ``<class>/*.png``, a DICOM archive, or a
COVID-QU-Ex root), ``site-name`` (default: the folder's name), ``state-dir`` (optional: local state
survives a restart), ``device`` (default: CUDA when present), ``num-threads`` (default: torch's,
all cores); the archive's own settings ``labels-csv``, ``label-map``, ``frontal-only``,
``salt-file``, ``cache-dir`` (see docs/data.md; the server's values for these are ignored).
Simulation: ``partition-id``/``num-partitions``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medstylegan2.config import RunConfig, from_dict
from medstylegan2.faults import fault_point
from medstylegan2.fl.partition import load_site_data
from medstylegan2.fl.site_round import LocalStateStore, local_state_from_bytes, local_state_to_bytes, run_site_round
from medstylegan2.runfolder import site_state_folder
from medstylegan2.trainer import resolve_device

log = logging.getLogger(__name__)

STATE_KEY = "medstylegan2_local_state"

app = ClientApp()


def config_of(message: Message) -> tuple[RunConfig, ConfigRecord]:
    record = message.content["config"]
    cfg = from_dict(json.loads(str(record["run_config"])), where="run_config from the server").validate()
    return cfg, record


@app.query()
def roll_call(message: Message, context: Context) -> Message:
    """Say who this site is and how many training images it has (a count, nothing else)."""
    cfg, _ = config_of(message)
    data = load_site_data(cfg, context.node_config)
    content = RecordDict({"site": ConfigRecord({"site": data.name}),
                          "metrics": MetricRecord({"num_examples": int(len(data.labels))})})
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    cfg, config = config_of(message)
    round_num, token = int(config["round"]), str(config["run_token"])
    data = load_site_data(cfg, context.node_config)
    fault_point("site_train", round_num=round_num, site=data.name)  # tests crash a named site here
    store = _state_store(context, config, token, data.name)
    local_state = _previous_local_state(context, store, token, round_num)
    received = {key: array.numpy() for key, array in message.content["arrays"].items()}

    _set_threads(cfg, context.node_config)
    privacy_factory = None
    if cfg.privacy.enabled:
        from medstylegan2.privacy.engine import make_privacy_engine
        privacy_factory = make_privacy_engine
    device = str(context.node_config.get("device", "")) or str(resolve_device(cfg.device))
    result = run_site_round(cfg, data.images, data.labels, received, round_num=round_num, site=data.name,
                                local_state=local_state, privacy_factory=privacy_factory, device=device,
                                constants_check=str(config["constants_digest"]))

    if result.local_state is not None:
        blob = local_state_to_bytes(result.local_state)
        if store is not None:  # on disk only: a simulation's contexts (all sites) live in the driver's memory
            store.save(round_num, blob)
            context.state.pop(STATE_KEY, None)
        else:
            context.state[STATE_KEY] = ConfigRecord({"round": round_num, "run_token": token, "state": blob})

    content = RecordDict({"metrics": MetricRecord(result.metrics),
                          "site": ConfigRecord({"site": data.name, "payload": result.payload_kind})})
    if result.payload:  # a site that declines (privacy budget spent) sends no weights
        content["arrays"] = ArrayRecord({key: Array(value) for key, value in result.payload.items()})
    return Message(content=content, reply_to=message)


def _set_threads(cfg: RunConfig, node_config: Mapping[str, Any]) -> None:
    """Torch threads: node config ``num-threads``; in a simulation, the site's CPU share (at least 1).

    Ray does not cap a worker's threads, and torch would start one per core in every worker: with
    several sites per machine that oversubscribes the cores many times over.
    """
    import torch

    threads = int(node_config.get("num-threads", 0) or 0)
    if not threads and "partition-id" in node_config and "data-dir" not in node_config:
        threads = max(1, int(cfg.federation.client_num_cpus))
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _state_store(context: Context, config: ConfigRecord, token: str, site: str) -> Optional[LocalStateStore]:
    """The site's own state folder: node config ``state-dir``; in a simulation, the run's folder.

    A real site never writes where the server says: the server's ``site_state_dir`` is used only
    by simulated sites (``partition-id`` and no ``data-dir`` in the node config).
    """
    node = context.node_config
    root = str(node.get("state-dir", ""))
    if not root and "partition-id" in node and "data-dir" not in node:
        root = str(config.get("site_state_dir", ""))
    if not root:
        return None
    return LocalStateStore(site_state_folder(root, token, site))


def _previous_local_state(context: Context, store: Optional[LocalStateStore], token: str,
                          round_num: int) -> Optional[dict[str, Any]]:
    """This site's state after its latest earlier round of this run: memory first, then disk."""
    if STATE_KEY in context.state:
        saved = context.state[STATE_KEY]
        if str(saved["run_token"]) == token and int(saved["round"]) < round_num:
            return local_state_from_bytes(bytes(saved["state"]))
    if store is not None:
        found = store.latest_before(round_num)
        if found is not None:
            log.info("round %d: restoring local state of round %d from %s", round_num, found[0], store.folder)
            return local_state_from_bytes(found[1])
    return None
