"""The ``simulate`` command: a federated run with virtual hospitals on Flower's simulation engine.

The same ServerApp and ClientApp run under ``flwr run .`` and on real SuperNodes; here
``flwr.simulation.run_simulation`` hosts them in one process (server) plus Ray workers (sites).
``run_simulation`` does not read ``[tool.flwr.app.config]``, so the settings are baked into the
ServerApp (``create_server_app``); the sites get the validated config from the server's messages.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from medstylegan2.cli_support import run_reporting_user_errors, setup_logging
from medstylegan2.config import RunConfig, load_config
from medstylegan2.errors import UserError
from medstylegan2.metrics.headline import format_headline, last_evaluation
from simulation import runtime

COMMAND_HELP = ("Run a federated simulation: N virtual hospital sites (Flower simulation engine) over "
                "partitioned data, with round checkpoints, metrics.jsonl and sample grids.")

log = logging.getLogger("medstylegan2.simulation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/default.yaml", help="YAML config (default configs/default.yaml)")
    p.add_argument("--out", default=None, help="run folder (default: <out_dir>/<name> of the config)")
    p.add_argument("--rounds", type=int, default=None, help="federation.rounds")
    p.add_argument("--sites", type=int, default=None, help="federation.sites (virtual hospitals)")
    p.add_argument("--local-steps", type=int, default=None, help="federation.local_steps")
    p.add_argument("--partitioner", choices=["iid", "dirichlet", "quantity"], default=None,
                   help="federation.partitioner")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set federation.aggregation=fedavgm (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last round_XXX.pt in the run folder")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run the sites on an existing Ray cluster ('auto' or HOST:PORT of its head; "
                        "default: $RAY_ADDRESS, else a fresh Ray instance on this machine)")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="end after round N as if interrupted (to try --resume); 0: run all rounds")


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    flags = {"federation.rounds": args.rounds, "federation.sites": args.sites,
             "federation.local_steps": args.local_steps, "federation.partitioner": args.partitioner}
    overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    return overrides


def _absolute_data_paths(cfg: RunConfig) -> list[str]:
    """Overrides that pin data paths to absolute ones: Ray workers may not share our cwd."""
    extra = []
    if cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute():
        extra.append(f"data.cache_dir={Path(cfg.data.cache_dir).resolve()}")
    if cfg.data.root and not Path(cfg.data.root).is_absolute():
        extra.append(f"data.root={Path(cfg.data.root).resolve()}")
    if cfg.privacy.policy and not Path(cfg.privacy.policy).is_absolute():
        extra.append(f"privacy.policy={Path(cfg.privacy.policy).resolve()}")
    return extra


@contextlib.contextmanager
def _site_policies(cfg: RunConfig, run_dir: Path, site_sizes: dict[str, int]) -> Iterator[None]:
    """Each virtual site's own policy file (``privacy.site.write_simulated_policies``); the folder is
    named in the driver's own environment while the simulation runs, which the site processes
    inherit (the server's messages never carry it). Afterwards the environment is as it was: a
    later run in the same process (the study's next arm, a test) must not find this run's policies."""
    from medstylegan2.privacy.site import SIMULATED_POLICIES_ENV, write_simulated_policies

    before = os.environ.get(SIMULATED_POLICIES_ENV)
    folder = write_simulated_policies(cfg, run_dir, site_sizes)
    _set_environment(SIMULATED_POLICIES_ENV, None if folder is None else str(folder))
    try:
        yield
    finally:
        _set_environment(SIMULATED_POLICIES_ENV, before)


def _set_environment(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def simulate(config_path: str | Path, overrides: list[str], *, run_dir: Optional[str | Path] = None,
             resume: bool = False, stop_after: int = 0, ray_address: Optional[str] = None,
             verbose: bool = False) -> Path:
    """Run the simulation; returns the run folder. Raises on failure."""
    lean = os.environ.get("MEDSTYLEGAN2_RAY_DEFAULTS") != "1"  # "1": Ray as Flower leaves it (benchmarks)
    if lean:
        runtime.lean_ray_environment()  # before torch is imported here and before Ray starts
    config_path = Path(config_path).resolve()
    cfg = load_config(config_path, overrides)  # config errors first, before the slow imports
    overrides = overrides + _absolute_data_paths(cfg)
    cfg = load_config(config_path, overrides)

    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from medstylegan2.fl.partition import (format_partition_table, partition_table, simulation_partitions,
                                           write_partition_csv)
    from server.server_app import create_server_app

    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir).resolve()
    sites = cfg.federation.sites
    if resume:  # a missing, damaged or foreign checkpoint: one clear line now, not a traceback from Ray
        from medstylegan2.fl.server_state import load_server_state
        from medstylegan2.runfolder import RunFolder

        load_server_state(RunFolder(run_dir), cfg)

    train, parts = simulation_partitions(cfg, sites)
    rows = partition_table(train.labels, parts, train.class_names)
    print(f"partition ({cfg.federation.partitioner}, {sites} sites, {len(train.labels)} training images):")
    print(format_partition_table(rows, train.class_names))
    write_partition_csv(rows, run_dir / "partition.csv", train.class_names)
    if any(r["total"] == 0 for r in rows):
        log.warning("some sites have no training images: they will return their weights unchanged")

    server_app = create_server_app({"config-path": str(config_path), "overrides": shlex.join(overrides),
                                    "run-dir": str(run_dir), "resume": resume, "site-state-dir": "auto",
                                    "server-data": "config", "stop-after": stop_after})
    backend = runtime.backend_config(cfg, ray_address, lean=lean)
    with _site_policies(cfg, run_dir, {f"site-{i}": int(len(part)) for i, part in enumerate(parts)}):
        runtime.start_ray(backend)
        if lean:
            runtime.deliver_by_pending_nodes()
        runtime.install_stop_handlers(run_dir)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=sites,
                       backend_config=backend, verbose_logging=verbose)
    return run_dir


def quiet_flower_duplicates() -> None:
    """Flower prints through its own handler; without this its lines also reach ours, twice."""
    logging.getLogger("flwr").propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database set-up chatter


def run(args: argparse.Namespace) -> int:
    quiet_flower_duplicates()
    start = time.perf_counter()
    try:
        run_dir = simulate(args.config, _overrides(args), run_dir=args.out, resume=args.resume,
                           stop_after=args.stop_after, ray_address=args.ray_address,
                           verbose=getattr(args, "verbose", False))
    except KeyboardInterrupt:  # before the stop handlers are installed (simulation.runtime)
        print("interrupted before the first round; start again (or --resume)", file=sys.stderr, flush=True)
        os._exit(130)
    rounds = sorted(run_dir.glob("round_*.pt"))
    if not rounds:
        raise UserError(f"the simulation wrote no round checkpoint into {run_dir}; see the log above")
    print(f"done in {time.perf_counter() - start:.0f} s: {run_dir} (last checkpoint {rounds[-1].name}, "
          f"metrics {run_dir / 'metrics.jsonl'}, grids {run_dir / 'grids'})")
    record = last_evaluation(run_dir)
    if record is not None:
        print("\n" + format_headline(record), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=COMMAND_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quiet_flower_duplicates()
    return run_reporting_user_errors(run, args)
