"""The simulation's Ray and its process: a fresh local Ray kept lean, sites that die restarted, signals.

- **Which Ray.** Without ``--ray-address`` (and without ``$RAY_ADDRESS``) the simulation starts a
  fresh local Ray (``address="local"``). Ray's own default (``address=None``) would first look for
  the address file a ``ray start`` left in ``/tmp/ray``, and if that cluster was killed uncleanly,
  wait for its dead GCS for minutes.
- **A lean Ray.** On a small shared machine every idle cycle Ray spends is taken from the sites:
  no dashboard, no usage-stats reporting, metrics export and event recording off, a small object
  store; the number of CPUs is stated (``federation.client_num_cpus`` per site decides how many sites
  train at once). See ``bench/busy_machine.py``.
- **Sites that die.** The actors that host virtual sites are restarted by Ray when their process
  dies (``max_restarts``): that site's message fails (an error reply: a failed site for that round,
  logged by the server), and the next round goes to a fresh actor. Without it Flower would keep
  handing messages to the dead actor for the rest of the run.
- **Many sites.** Flower's simulation engine looks for new messages every 0.1 s by asking its
  message store once per virtual node, and each ask scans every stored message: O(total sites x
  messages) twenty times a second, in the server's process, also for the sites that are not
  sampled. ``deliver_by_pending_nodes`` replaces that loop with one scan per sweep that asks only
  for the nodes that have a message waiting (Flower's own ``get_message_ins`` still delivers it).
- **Signals.** SIGINT (Ctrl-C) and SIGTERM (a batch scheduler, ``timeout``) end the run at once with
  one line, ``stopped after round N; continue with --resume``, and exit status 130 / 143. Every
  committed round is complete on disk (``medstylegan2.fl.round_files``); the round in flight is
  redone by ``--resume``. Waiting for Flower's threads instead would take up to a round (its
  ServerApp thread is not a daemon and ignores both signals), and Ray's processes, which get a
  terminal's or scheduler's signal too, would be gone before it ended.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from medstylegan2.config import RunConfig

log = logging.getLogger("medstylegan2.simulation")

# Ray's processes read these at start-up (they inherit the driver's environment).
LEAN_RAY_ENV = {
    # Idle OpenMP threads sleep instead of spinning (torch's default spins for a while): on a shared
    # machine a spinning thread burns the core another process was waiting for. Read when torch
    # loads, so it is set before the first torch import (driver) and inherited by the site actors.
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_USAGE_STATS_ENABLED": "0",           # no usage-stats thread phoning home
    "RAY_enable_metrics_collection": "0",     # no metrics agent scraping every process
    "RAY_event_stats": "0",                   # no per-event timing in the raylet and GCS
    "RAY_DEDUP_LOGS": "0",                    # the driver prints worker lines as they come
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # (silences a FutureWarning at start-up)
}
OBJECT_STORE_BYTES = 512 * 1024**2
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def ray_address(requested: Optional[str]) -> str:
    """The Ray to use: ``--ray-address``, else ``$RAY_ADDRESS``, else a fresh local one (``local``)."""
    return requested or os.environ.get("RAY_ADDRESS") or "local"


def backend_config(cfg: RunConfig, requested_address: Optional[str] = None, *, lean: bool = True) -> dict[str, Any]:
    """Flower's backend config: Ray resources per virtual site, restartable actors, Ray's init args.

    ``lean=False`` leaves Ray's defaults (for ``bench/busy_machine.py``'s comparison).
    """
    import torch

    f = cfg.federation
    address = ray_address(requested_address)
    if address != "local":  # GPUs live on the cluster's nodes, not necessarily here
        gpus = f.client_num_gpus
    else:
        gpus = f.client_num_gpus if torch.cuda.is_available() else 0.0
        if f.client_num_gpus > 0 and gpus == 0:
            log.warning("federation.client_num_gpus=%g but CUDA is not available: sites train on the CPU",
                        f.client_num_gpus)
    resources: dict[str, Any] = {"num_cpus": f.client_num_cpus, "num_gpus": gpus}
    init_args: dict[str, Any] = {"address": address}
    if lean:
        resources["max_restarts"] = -1  # a site's process that dies comes back for the next round
        # A message that reaches an actor while Ray restarts it waits for the restart (one retry)
        # instead of failing with ActorUnavailableError: whichever site the pool hands that actor
        # next is not failed by how long the restart happens to take on a busy machine.
        resources["max_task_retries"] = 1
        _terminate_without_retry()
        if address == "local":
            init_args.update(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                             object_store_memory=OBJECT_STORE_BYTES)
    return {"client_resources": resources, "init_args": init_args}


def _terminate_without_retry() -> None:
    """Flower ends each site's actor with ``terminate``, which exits the actor on purpose; with the
    actor-wide retry above Ray would log that exit as a failed task and send ``terminate`` again.
    Ray reads per-method retries from the class's method table when it creates an actor."""
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    table = getattr(getattr(ClientAppActor, "__ray_metadata__", None), "method_meta", None)
    if table is not None and isinstance(getattr(table, "max_task_retries", None), dict):
        table.max_task_retries["terminate"] = 0


def lean_ray_environment() -> None:
    """Set ``LEAN_RAY_ENV`` (where the user has not) before Ray starts its processes."""
    for key, value in LEAN_RAY_ENV.items():
        os.environ.setdefault(key, value)


def start_ray(backend: dict[str, Any]) -> None:
    """``ray.init`` here, in the main thread, before Flower's backend would (it skips an initialised
    Ray): then the stop handlers below can be installed after Ray installed its own SIGTERM handler."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    os.environ["PYTHONPATH"] = pythonpath  # the sites import this project like the driver does
    if backend["init_args"].get("address", "local") == "local":
        # Ray's processes started here inherit this environment, PYTHONPATH included: no runtime
        # environment to build per worker (one agent round trip each, slow on a crowded machine).
        ray.init(logging_level="WARNING", **backend["init_args"])
    else:  # another machine's workers need the path handed over
        env_vars = {"PYTHONPATH": pythonpath}
        # The simulated sites' own policy files (written by the driver; a shared folder is needed).
        for key in ("MEDSTYLEGAN2_SITE_POLICIES",):
            if key in os.environ:
                env_vars[key] = os.environ[key]
        ray.init(runtime_env={"env_vars": env_vars}, logging_level="WARNING", **backend["init_args"])


def deliver_by_pending_nodes() -> None:
    """Patch Flower's simulation engine loop ``add_messages_to_queue`` (see the module docstring).

    Falls back to Flower's loop for a state store without the in-memory fields this reads.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    if getattr(original, "_medstylegan2", False):
        return

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        if not (hasattr(state, "message_ins_store") and hasattr(state, "lock")):
            return original(state, queue, nodes_mapping, f_stop)
        nodes = set(nodes_mapping.keys())
        while not f_stop.is_set():
            with state.lock:
                waiting = {m.metadata.dst_node_id for m in list(state.message_ins_store.values())
                           if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes}
            for node_id in sorted(waiting):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(0.1)

    add_messages_to_queue._medstylegan2 = True
    vce_api.add_messages_to_queue = add_messages_to_queue


def last_committed_round(run_dir: Path) -> int:
    from medstylegan2.runfolder import RunFolder

    rounds = RunFolder(run_dir).checkpoint_rounds()
    return rounds[-1] if rounds else 0


def install_stop_handlers(run_dir: Path) -> None:
    """SIGINT and SIGTERM end the run now, with one line saying how to continue (module docstring)."""

    def stop(signum: int, _frame: Any) -> None:
        logging.disable(logging.CRITICAL)  # Flower's threads may be about to log the Ray processes' exit
        rounds = last_committed_round(run_dir)
        name = signal.Signals(signum).name
        where = f"after round {rounds}" if rounds else "before the first round was complete"
        sys.stderr.write(f"{name}: stopped {where}; continue with --resume (run folder {run_dir})\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_STATUS.get(signum, 128 + signum))

    for sig in EXIT_STATUS:
        signal.signal(sig, stop)
