"""An in-process Flower ``Grid``: the ServerApp's messages go straight to a ClientApp, one per site.

No Ray, no SuperLink, no network: every message is handled by calling the ClientApp with that
site's own ``Context`` (node config, persistent ``state``), in this process, one after the other.
The strategy and the ClientApp run exactly as under the simulation engine, which makes this the
tool for fast tests (aggregation, rejection of bad updates, resume, what leaves a site) and for
measuring what the Flower engines add on top (``bench/round_overhead.py``).

``tamper`` lets a test play a faulty or malicious site: it sees each reply and may replace it, or
drop it (return None: the reply never arrives, as from a site that timed out or disconnected).
``outgoing`` keeps every reply a site sent, for inspection.
"""

from __future__ import annotations

import itertools
import traceback
from typing import Callable, Iterable, Mapping, Optional, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

ERROR_CODE_CLIENT_EXCEPTION = 1


def _claim_task_identity() -> None:
    """Messages take their run and sender from the process' task identity, which Flower's engines
    set for a ServerApp; outside an engine we set it (as ``run_simulation`` does) if nobody has."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("run_id", 1), ("task_id", 1), ("node_id", 1)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)


class LoopbackGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: Sequence[Mapping[str, object]], *,
                 tamper: Optional[Callable[[int, Message], Optional[Message]]] = None, first_node_id: int = 1000):
        _claim_task_identity()
        self.client_app = client_app
        self.tamper = tamper
        self.contexts: dict[int, Context] = {}
        for i, node_config in enumerate(node_configs):
            node_id = first_node_id + i
            self.contexts[node_id] = Context(run_id=1, node_id=node_id, node_config=dict(node_config),
                                             state=RecordDict(), run_config={})
        self.outgoing: list[tuple[int, Message]] = []
        self._run = None
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count(1)

    # -- Grid interface --------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"loopback-{next(self._ids)}"
            reply = self._handle(message, message_id)
            if reply is not None:
                self._pending[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(mid) for mid in list(message_ids) if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- delivery --------------------------------------------------------------------------------
    def _handle(self, message: Message, message_id: str) -> Optional[Message]:
        node_id = message.metadata.dst_node_id
        context = self.contexts[node_id]
        try:
            reply = self.client_app(message, context)
        except Exception as exc:  # as the engines do: the server gets an error reply
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=ERROR_CODE_CLIENT_EXCEPTION, reason=reason), reply_to=message)
        if self.tamper is not None:
            reply = self.tamper(node_id, reply)
        if reply is not None:
            self.outgoing.append((node_id, reply))
        return reply


def run_in_process(config_path: str, overrides: list[str], run_dir: str, *, resume: bool = False,
                   server_data: bool = True) -> None:
    """A whole federated run in this process: the real strategy and ClientApp, one simulated site per
    ``federation.sites``, sites one after the other (site state in ``<run_dir>/site_state``)."""
    from pathlib import Path

    from client.client_app import app
    from medstylegan2.config import load_config
    from server.strategy import run_federation

    cfg = load_config(config_path, overrides)
    sites = cfg.federation.sites
    grid = LoopbackGrid(app, [{"partition-id": i, "num-partitions": sites} for i in range(sites)])
    run_federation(grid, cfg, run_dir, resume=resume, site_state_dir=str(Path(run_dir) / "site_state"),
                   server_data=server_data)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m server.loopback --config C --out DIR [--set k=v] [--resume]``: one process, no Ray.

    The tool of the fault-injection tests (``MEDSTYLEGAN2_FAULT`` kills this process at a named
    point; see ``medstylegan2.faults``)."""
    import argparse

    import torch

    from medstylegan2.cli_support import run_reporting_user_errors, setup_logging

    parser = argparse.ArgumentParser(prog="python -m server.loopback", description=main.__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-server-data", action="store_true", help="no evaluation data at the server")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)  # the sites run one after the other, as single-threaded as in the engines
    return run_reporting_user_errors(lambda a: run_in_process(a.config, a.overrides, a.out, resume=a.resume,
                                                              server_data=not a.no_server_data), args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
