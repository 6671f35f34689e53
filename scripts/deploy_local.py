#!/usr/bin/env python
"""A whole deployment on one machine: one SuperLink, one SuperNode per hospital folder, ``flwr run``.

This is the deployment engine of docs/federation.md on loopback, with real processes: what each
hospital would start on its own machine, started here side by side. It is the tool behind
``tests/test_deployment.py`` and a way to try a deployment before spreading it over machines.

    python scripts/deploy_local.py --site hospital-a=/data/a --site hospital-b=/data/b \\
        --config configs/smoke.yaml --out runs/deploy-smoke [--certs certs | --insecure]
    python scripts/deploy_local.py --phantom-sites 2 --config configs/smoke.yaml --out runs/deploy-smoke

TLS is the default: ``--certs DIR`` uses ``DIR/ca.crt``, ``server.crt`` and ``server.key`` (from
``scripts/make_certs.sh``; made there if missing). With TLS, SuperNode authentication is on too
(Flower's CLI-managed node auth): the SuperLink runs with ``--enable-supernode-auth``, every
hospital gets an ECDSA key pair (``ssh-keygen``), its public key is registered with ``flwr supernode
register`` before its SuperNode starts with ``--auth-supernode-private-key``; a SuperNode whose key
is not registered cannot join. ``--insecure`` (no TLS, no authentication) is for local trials only
and says so. Every process gets its own free loopback port, and all of them are stopped at the end,
also on errors.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}; "
                               f"log:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")


INSECURE_WARNING = ("WARNING: --insecure: no TLS and no SuperNode authentication; weights and metrics travel in "
                    "clear text and any process that reaches the port can join. For local trials only.")


class LocalDeployment:
    """SuperLink + SuperNodes as subprocesses on loopback; a context manager that always stops them."""

    def __init__(self, workdir: str | Path, sites: dict[str, str | Path], *, certs: Optional[str | Path] = None,
                 state_dirs: bool = True, simulation: bool = False, auth: Optional[bool] = None,
                 node_env: Optional[dict[str, dict[str, str]]] = None):
        """``simulation=True``: a SuperLink with the simulation runtime and no SuperNodes (``flwr run``
        then starts virtual ones, ``--federation-config num-supernodes=N``). ``auth`` (default: on
        with TLS) turns on SuperNode authentication. ``node_env``: extra environment per site."""
        self.workdir = Path(workdir).resolve()
        self.sites = {name: Path(path).resolve() for name, path in sites.items()}
        self.certs = Path(certs).resolve() if certs else None
        self.auth = (self.certs is not None and not simulation) if auth is None else auth
        if self.auth and self.certs is None:
            raise ValueError("SuperNode authentication needs TLS (give certs)")
        self.state_dirs = state_dirs
        self.simulation = simulation
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.keys = self.workdir / "keys"
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.processes_started: dict[str, list[str]] = {}  # name -> its (last) command line
        self.key_of: dict[str, Path] = {}
        self.enrolments: dict[str, int] = {}
        self.node_env = node_env or {}
        self.port = 0
        self.env = dict(os.environ, FLWR_HOME=str(self.flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
        if self.certs is None:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str], env: Optional[dict[str, str]] = None
               ) -> tuple[subprocess.Popen, Path]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        handle = log.open("a")
        # A session of its own: stopping it stops the ServerApp/ClientApp processes it spawned.
        process = subprocess.Popen(command, cwd=self.workdir, env=env or self.env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        self.processes_started[name] = list(command)
        return process, log

    def _tls_link(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.crt"),
                "--ssl-keyfile", str(self.certs / "server.key"), *(["--enable-supernode-auth"] if self.auth else [])]

    def _tls_node(self) -> list[str]:
        return ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs / "ca.crt")]

    def start(self, timeout: float = 60.0) -> "LocalDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link, log = self._spawn("superlink", ["flower-superlink", *self._tls_link(), "--host", "127.0.0.1",
                                              "--port", str(self.port), "--isolation", "subprocess",
                                              "--disable-runtime-dependency-installation",
                                              *(["--simulation"] if self.simulation else [])])
        wait_for_port(self.port, timeout, link, log)
        self._write_flower_config()
        for name in self.sites:
            if self.auth:
                self.register_node(name)
            self.start_node(name, timeout)
        return self

    def register_node(self, name: str, *, new_key: bool = False) -> None:
        """An ECDSA key pair for the site, its public key registered with the SuperLink (``flwr``).

        ``new_key``: re-enrol the site with a fresh key pair (a new node id). Flower 1.42 does not let a
        SuperNode that was killed back in under its old key while the SuperLink still counts the old
        connection as online."""
        self.keys.mkdir(parents=True, exist_ok=True)
        key = self.keys / name
        if new_key:
            self.enrolments[name] = self.enrolments.get(name, 1) + 1
            key = self.keys / f"{name}-{self.enrolments[name]}"
        self.key_of[name] = key
        if not key.is_file():
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", str(key)],
                           check=True, capture_output=True, timeout=60)
        result = subprocess.run(["flwr", "supernode", "register", str(key) + ".pub", "deployment"], cwd=self.workdir,
                                env=self.env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register {name} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start_node(self, name: str, timeout: float = 60.0) -> subprocess.Popen:
        """Start (or restart) the SuperNode of ``name``; with authentication it keeps its node id."""
        node_config = f"data-dir='{self.sites[name]}' site-name='{name}'"
        if self.state_dirs:
            node_config += f" state-dir='{self.workdir / 'site-state' / name}'"
        # The sites share this machine's cores: one equal share of threads each (a real hospital
        # would leave torch its default of all cores).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.sites))))
        env = dict(self.env, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **self.node_env.get(name, {}))
        auth = ["--auth-supernode-private-key", str(self.key_of[name])] if self.auth else []
        node_port = free_port()
        node, node_log = self._spawn(f"supernode-{name}", [
            "flower-supernode", *self._tls_node(), *auth, "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(node_port), "--node-config", node_config], env=env)
        wait_for_port(node_port, timeout, node, node_log)
        self.nodes[name] = node
        return node

    def _write_flower_config(self) -> None:
        sys.path.insert(0, str(REPO))
        from simulation.flwr_home import flower_config, write_flower_config

        write_flower_config(self.flwr_home, flower_config(
            deployment=f"127.0.0.1:{self.port}", root_certificates=str(self.certs / "ca.crt") if self.certs else None,
            insecure=self.certs is None, default="deployment"))

    def run(self, run_config: dict[str, object], *, timeout: float = 600.0, app: Path = REPO,
            federation_config: Optional[dict[str, object]] = None) -> subprocess.CompletedProcess:
        """``flwr run APP deployment --stream`` with the given run config; output captured."""
        pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        command = ["flwr", "run", str(app), "deployment", "--stream", "--run-config", pairs]
        if federation_config:
            command += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        return subprocess.run(command, cwd=app, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to each process group (SuperNodes first), SIGKILL what is left after ``grace`` s."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=5)
        for _, process in self.processes:
            _signal_group(process, signal.SIGKILL)  # children that outlived their parent
        self.processes.clear()

    def __enter__(self) -> "LocalDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "") + "'"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", action="append", default=[], metavar="NAME=DIR", help="a hospital and its data folder")
    p.add_argument("--phantom-sites", type=int, default=0, help="make N phantom folders (one per site) instead")
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--out", default="runs/deploy-local", help="run folder (checkpoints, metrics, grids)")
    p.add_argument("--workdir", default=None, help="logs, FLWR_HOME, site state (default: OUT/deployment)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--certs", default="certs", help="folder with ca.crt, server.crt, server.key (made if missing)")
    tls.add_argument("--insecure", action="store_true",
                     help="no TLS and no SuperNode authentication (local trials only; prints a warning)")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else out.parent / (out.name + "-deployment")
    sites = dict(item.split("=", 1) for item in args.site)
    if args.phantom_sites:
        sys.path.insert(0, str(REPO))
        from medstylegan2.config import load_config
        from medstylegan2.phantoms import write_phantom_folder

        cfg = load_config(args.config)
        for i in range(args.phantom_sites):
            folder = workdir / "data" / f"hospital-{i}"
            write_phantom_folder(folder, per_class=cfg.data.phantoms_per_class, resolution=cfg.model.resolution,
                                 seed=100 + i)
            sites[f"hospital-{i}"] = folder
    if not sites:
        p.error("give --site NAME=DIR (repeatable) or --phantom-sites N")
    certs = None
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    else:
        certs = Path(args.certs)
        if not (certs / "server.crt").is_file():
            subprocess.run([str(REPO / "scripts" / "make_certs.sh"), str(certs)], check=True)
    with LocalDeployment(workdir, sites, certs=certs) as deployment:
        print(f"SuperLink on 127.0.0.1:{deployment.port} ({'TLS' if certs else 'insecure'}), "
              f"{len(sites)} SuperNode(s); logs in {deployment.logs}")
        result = deployment.run({"config-path": str(Path(args.config).resolve()), "run-dir": str(out),
                                 "server-data": "none"})
        print(result.stdout[-6000:])
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return result.returncode
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
