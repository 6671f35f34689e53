"""Deployment engine on loopback: a TLS SuperLink and two SuperNodes as real processes, ``flwr run``.

Selected with ``-m deployment``; about 1-2 minutes each on 2 cores. Every process is stopped in
the fixture's teardown, also when a test fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from medstylegan2.phantoms import write_phantom_folder
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.sampling import load_generator

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

pytestmark = [pytest.mark.deployment, pytest.mark.slow]


def _deploy_module():
    spec = importlib.util.spec_from_file_location("deploy_local", REPO / "scripts" / "deploy_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    _need("openssl")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO / "scripts" / "make_certs.sh"), str(out)], check=True, capture_output=True, timeout=60)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_tls_supernodes_with_their_own_folders_train_two_rounds(tmp_path, certs):
    _need("flower-superlink", "flower-supernode", "flwr")
    deploy = _deploy_module()
    sites = {}
    for i, name in enumerate(("hospital-a", "hospital-b")):
        sites[name] = tmp_path / "data" / name
        write_phantom_folder(sites[name], per_class=8, resolution=32, seed=10 + i)
    run_dir = tmp_path / "run"
    pyproject = _sha(REPO / "pyproject.toml")

    with deploy.LocalDeployment(tmp_path / "deployment", sites, certs=certs) as deployment:
        result = deployment.run({"config-path": str(SMOKE), "run-dir": str(run_dir), "server-data": "none"},
                                timeout=480)
        link_log = (deployment.logs / "superlink.log").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "https://127.0.0.1" in link_log  # the SuperLink served TLS

    final = run_dir / "round_002.pt"
    state = read_checkpoint(final)
    assert state["round"] == 2 and set(state["federation"]["sites"]) == {"hospital-a", "hospital-b"}
    G, cfg = load_generator(final)
    assert cfg.model.resolution == 32
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if line.get("kind") == "round"]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert {s: v["status"] for s, v in line["sites"].items()} == {"hospital-a": "ok", "hospital-b": "ok"}
    # Each hospital kept its own local state in its own folder, keyed by the run.
    assert list((tmp_path / "deployment" / "site-state" / "hospital-a").glob("*/hospital-a/round_002.pt"))
    assert _sha(REPO / "pyproject.toml") == pyproject


def test_a_killed_supernode_costs_its_site_one_round_and_rejoins_after_a_restart(tmp_path, certs):
    """TLS + SuperNode authentication (registered keys). hospital-b's ClientApp kills its SuperNode's whole
    process group at a named point of round 2 (SuperNode, SuperExec, ClientApp: ``kill-group``); the test
    restarts that SuperNode (re-enrolled with a new key: Flower 1.42 keeps a killed node's old identity
    "online" for a while) as soon as it has exited (an event, not a timer). The server recognises the
    new node as hospital-b at the start of round 3 (it waits for min_sites=2), and asks it again."""
    import threading

    _need("flower-superlink", "flower-supernode", "flwr", "ssh-keygen")
    deploy = _deploy_module()
    sites = {}
    for i, name in enumerate(("hospital-a", "hospital-b")):
        sites[name] = tmp_path / "data" / name
        write_phantom_folder(sites[name], per_class=8, resolution=32, seed=10 + i)
    run_dir = tmp_path / "run"
    fault = {"hospital-b": {"MEDSTYLEGAN2_FAULT": "site_train:2:kill-group:site=hospital-b"}}
    restarted = threading.Event()

    with deploy.LocalDeployment(tmp_path / "deployment", sites, certs=certs, node_env=fault) as deployment:
        assert deployment.auth
        victim = deployment.nodes["hospital-b"]

        def restart_when_dead() -> None:
            victim.wait()  # returns when the fault point has killed it
            deployment.register_node("hospital-b", new_key=True)  # re-enrolled: a new node id
            deployment.start_node("hospital-b")
            restarted.set()

        watcher = threading.Thread(target=restart_when_dead, daemon=True)
        watcher.start()
        result = deployment.run({"config-path": str(SMOKE), "run-dir": str(run_dir), "server-data": "none",
                                 # min_sites=2: round 3 waits until hospital-b has reconnected
                                 "overrides": "federation.rounds=3 federation.round_timeout_s=90 "
                                              "federation.min_sites=2 federation.connect_timeout_s=300"},
                                timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert restarted.is_set() and victim.returncode is not None
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    status = {line["round"]: {s: v["status"] for s, v in line["sites"].items()} for line in lines
              if line.get("kind") == "round"}
    assert status[1] == {"hospital-a": "ok", "hospital-b": "ok"}
    assert status[2]["hospital-a"] == "ok" and status[2]["hospital-b"].startswith("error")
    assert status[3] == {"hospital-a": "ok", "hospital-b": "ok"}
    assert "hospital-b" in result.stdout + result.stderr  # the failure is logged with the site's name
    assert "--enable-supernode-auth" in " ".join(deployment.processes_started["superlink"])


def test_flwr_run_simulation_uses_the_app_config_and_leaves_pyproject_alone(tmp_path):
    _need("flower-superlink", "flwr")
    deploy = _deploy_module()
    run_dir = tmp_path / "run"
    pyproject = _sha(REPO / "pyproject.toml")
    with deploy.LocalDeployment(tmp_path / "link", {}, certs=None, simulation=True) as link:
        result = link.run({"config-path": "configs/smoke.yaml", "run-dir": str(run_dir)}, timeout=480,
                          federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_checkpoint(run_dir / "round_002.pt")["round"] == 2
    assert (run_dir / "grids" / "round_002.png").is_file()
    assert _sha(REPO / "pyproject.toml") == pyproject
