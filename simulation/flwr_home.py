"""Write ``$FLWR_HOME/config.toml`` for ``flwr run .``: the connections Flower 1.42 keeps outside pyproject.

``python -m simulation.flwr_home --config configs/default.yaml`` writes a ``local`` connection (a
simulation on a SuperLink that ``flwr run`` starts on this machine) and prints the ``flwr run``
command for that config (``--federation-config`` with one virtual SuperNode per
``federation.sites`` and the config's client resources). ``--deployment HOST:PORT`` adds a
``deployment`` connection to a SuperLink's Control API, with ``--root-certificates CA.crt`` (TLS)
or ``--insecure``.

Keep FLWR_HOME inside the project (default ``.cache/flwr-home``, git-ignored) so nothing in
``~/.flwr`` changes, and export ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` before the
first ``flwr run``: otherwise the SuperLink installs this app's dependencies (a second torch) into
a fresh environment for every run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import tomli_w

from medstylegan2.config import RunConfig, load_config
from medstylegan2.runfolder import atomic_write_text

DEFAULT_HOME = ".cache/flwr-home"


def flower_config(*, deployment: Optional[str] = None, root_certificates: Optional[str] = None,
                  insecure: bool = False, default: str = "local") -> dict[str, Any]:
    """Connections only: the simulation's size and resources go on the command line
    (``--federation-config``, see ``federation_config_args``), as Flower 1.42 asks."""
    superlink: dict[str, Any] = {"default": default, "local": {"address": ":local:"}}
    if deployment:
        connection: dict[str, Any] = {"address": deployment}
        if root_certificates:
            connection["root-certificates"] = str(Path(root_certificates).resolve())
        else:
            connection["insecure"] = bool(insecure)
        superlink["deployment"] = connection
    return {"superlink": superlink}


def federation_config_args(cfg: RunConfig, sites: Optional[int] = None) -> str:
    """``flwr run --federation-config`` value: one virtual SuperNode per site, the config's resources."""
    f = cfg.federation
    return (f"num-supernodes={sites or f.sites} client-resources-num-cpus={max(1, math.ceil(f.client_num_cpus))} "
            f"client-resources-num-gpus={f.client_num_gpus:g}")


def write_flower_config(home: str | Path, config: dict[str, Any]) -> Path:
    return atomic_write_text(Path(home) / "config.toml", tomli_w.dumps(config))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.flwr_home", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=os.environ.get("FLWR_HOME", DEFAULT_HOME),
                   help=f"FLWR_HOME folder (default: $FLWR_HOME or {DEFAULT_HOME})")
    p.add_argument("--config", default="configs/default.yaml", help="YAML config: sites and client resources")
    p.add_argument("--sites", type=int, default=None, help="virtual SuperNodes (default: federation.sites)")
    p.add_argument("--deployment", default=None, metavar="HOST:PORT",
                   help="also write a 'deployment' connection to this SuperLink Control API address")
    p.add_argument("--root-certificates", default=None, help="CA certificate of the SuperLink (TLS)")
    p.add_argument("--insecure", action="store_true", help="deployment connection without TLS (testing only)")
    args = p.parse_args(argv)
    if args.deployment and not (args.root_certificates or args.insecure):
        p.error("--deployment needs --root-certificates CA.crt (TLS) or --insecure")
    if args.deployment and args.insecure:
        print("WARNING: --insecure: the connection to the SuperLink is not encrypted; for local trials only",
              file=sys.stderr)
    cfg = load_config(args.config)
    config = flower_config(deployment=args.deployment, root_certificates=args.root_certificates,
                           insecure=args.insecure)
    path = write_flower_config(args.home, config)
    home = Path(args.home).resolve()
    print(f"wrote {path}")
    print(f"export FLWR_HOME={home} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1")
    print(f"flwr run . --stream --federation-config \"{federation_config_args(cfg, args.sites)}\" "
          f"--run-config \"config-path='{args.config}' run-dir='{Path(cfg.run_dir).resolve()}'\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
