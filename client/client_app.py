"""The hospital site: a Flower ClientApp that trains the global GAN for K steps on local images.

Thin by design: records in, records out. The site's round itself is ``medstylegan2.fl.site_round``
(``run_site_round``), its data ``medstylegan2.fl.partition`` (``load_site_data``).

What arrives (from the ServerApp): the global G, G_ema and D weights as the ArrayRecord
``arrays`` (float32, float16 or packed int8, model constants excluded) and the ConfigRecord ``config`` with
the run's validated configuration (``run_config``, JSON), the round, the run token and the
digest of the model constants.

What leaves: the ArrayRecord ``arrays`` (new weights, or the float16 or int8 update), the MetricRecord
``metrics`` (num_examples, losses, images/s; under DP only the allow-list of
``medstylegan2.privacy.reply``: the policy's nominal size as num_examples, G/D-on-fake losses and the
privacy figures ``dp_*`` from the site's ledger) and the ConfigRecord ``site`` (site name, payload
kind). Never images, labels per image or anything of image shape. A round the site's privacy
policy refuses is an error reply (code ``PRIVACY_REFUSED``) whose reason says why.

Privacy (``medstylegan2.privacy.site``): the site's own policy file, node config
``privacy-policy`` (a simulated site: the file its simulation driver wrote for it), decides
whether and how it trains under DP; the server's run config only asks. Every DP round: ledger
lock, request check, budget check, train, ledger record (fsync), then the reply.

What stays (``Context.state``, and ``<state-dir>/<run token>/<site>/round_XXX.pt`` when a state
folder is known): optimizer moments, path-length mean, batch sampler, counters and a copy of the
privacy accountant; see ``medstylegan2.fl.site_round.local_state_of``. What the site spent is not
local state: it is in the site's lifetime ledger, which losing local state does not touch.

Node config (deployment): ``data-dir`` (required: ``<class>/*.png``, a DICOM archive, or a
COVID-QU-Ex root), ``site-name`` (default: the folder's name), ``state-dir`` (optional: local state
survives a restart), ``device`` (default: CUDA when present), ``num-threads`` (default: torch's,
all cores), ``privacy-policy`` (the site's privacy policy file, docs/privacy.md); the archive's
own settings ``labels-csv``, ``label-map``, ``frontal-only``, ``salt-file``, ``cache-dir`` (see
docs/data.md; the server's values for these are ignored).
Simulation: ``partition-id``/``num-partitions``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medstylegan2.config import RunConfig, from_dict
from medstylegan2.faults import FaultInjected, fault_point
from medstylegan2.fl.partition import load_site_data
from medstylegan2.fl.site_round import LocalStateStore, local_state_from_bytes, local_state_to_bytes, run_site_round
from medstylegan2.privacy.ledger import LedgerError
from medstylegan2.privacy.reply import reply_error_text
from medstylegan2.privacy.request import request_from_run_config
from medstylegan2.privacy.site import PrivacyRefusal, SitePrivacy
from medstylegan2.runfolder import site_state_folder
from medstylegan2.trainer import resolve_device

log = logging.getLogger(__name__)

STATE_KEY = "medstylegan2_local_state"
# Error codes of a site's reply (Flower's own are below 100).
PRIVACY_REFUSED = 401        # the site's privacy policy refuses the round as asked (reason: why)
PRIVACY_GENERIC_ERROR = 402  # a round under DP failed; the details are in the site's own log

app = ClientApp()


def config_of(message: Message) -> tuple[RunConfig, ConfigRecord]:
    record = message.content["config"]
    cfg = from_dict(json.loads(str(record["run_config"])), where="run_config from the server").validate()
    return cfg, record


@app.query()
def roll_call(message: Message, context: Context) -> Message:
    """Say who this site is and how many training images it has (under a DP policy: its public nominal size)."""
    cfg, _ = config_of(message)
    data = load_site_data(cfg, context.node_config)
    count = SitePrivacy.of_node(context.node_config, data.name).reported_size(len(data.labels))
    content = RecordDict({"site": ConfigRecord({"site": data.name}),
                          "metrics": MetricRecord({"num_examples": int(count)})})
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
    # The site's own policy decides its privacy; the server's run config only asks (privacy.site).
    site_privacy = SitePrivacy.of_node(context.node_config, data.name)
    request = request_from_run_config(cfg)
    dp = request.dp or site_privacy.dp_required
    device = str(context.node_config.get("device", "")) or str(resolve_device(cfg.device))
    try:
        with site_privacy.round(request, data.images, data.labels, run=token, round_num=round_num,
                                groups=data.groups, sources=data.sources) as privacy:
            result = run_site_round(cfg, data.images, data.labels, received, round_num=round_num, site=data.name,
                                    local_state=local_state, privacy=privacy, device=device,
                                    constants_check=str(config["constants_digest"]))
    except PrivacyRefusal as exc:  # the reason comes from the policy and the request, never the data
        log.warning("site %s: round %d %s", data.name, round_num, exc)
        return Message(Error(code=PRIVACY_REFUSED, reason=str(exc)), reply_to=message)
    except (LedgerError, FaultInjected):
        raise  # the ledger's own error names its file and says what to do; it holds no data
    except Exception as exc:
        if not dp:
            raise
        # Under DP an error may depend on the data (out of memory on a large Poisson batch): the
        # details stay in this site's log, the server gets a generic text.
        return Message(Error(code=PRIVACY_GENERIC_ERROR, reason=reply_error_text(exc, dp=True)), reply_to=message)

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
