"""What federation costs: seconds per round versus the same local steps in one process, and bytes.

    python bench/round_overhead.py [--config configs/default.yaml] [--rounds 3] [--local-steps K]

Measures, for one round (every site trains ``local_steps`` steps):

- ``local``: the same number of G+D steps (sites x local_steps) by one ``SiteTrainer`` in this
  process on one torch thread (what each simulated site gets): no Flower, no aggregation, no
  checkpoints;
- ``loopback``: the real strategy and ClientApp in this process (``server.loopback``), sites one
  after the other: Flower records, (de)serialization, validation, aggregation, checkpoint, grid;
- ``simulation``: ``python -m simulation`` (Ray, sites in parallel, one core each), per round from
  ``metrics.jsonl`` (rounds after the first) and the whole run's wall time;

and the bytes one site receives and sends per round in float32, float16 and int8 (Flower's
``ArrayRecord.count_bytes``: array data, numpy headers and keys; int8 is one packed array of
values and one of per-tensor scales).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRANSFER_DTYPES = ("float32", "float16", "int8")


def _round_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("kind") == "round"]


def bench_local(cfg, steps: int) -> float:
    import torch

    from medstylegan2.fl.partition import simulation_partitions
    from medstylegan2.trainer import SiteTrainer

    train, parts = simulation_partitions(cfg, cfg.federation.sites)
    idx = parts[0]
    trainer = SiteTrainer(cfg, train.images[idx], train.labels[idx], device="cpu", seed=cfg.seed)
    trainer.train_steps(2)  # warm-up
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer.train_steps(steps)
    return time.perf_counter() - start


def bench_loopback(cfg, rounds: int, out: Path) -> list[float]:
    from client.client_app import app
    from server.loopback import LoopbackGrid
    from server.strategy import run_federation

    grid = LoopbackGrid(app, [{"partition-id": i, "num-partitions": cfg.federation.sites}
                              for i in range(cfg.federation.sites)])
    run_federation(grid, cfg, out, site_state_dir=str(out / "site_state"), server_data=False)
    return [line["seconds"] for line in _round_lines(out)]


def bench_simulation(config: str, overrides: list[str], out: Path) -> tuple[list[float], float, dict]:
    args = [sys.executable, "-m", "simulation", "--config", config, "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"simulation failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    lines = _round_lines(out)
    return [line["seconds"] for line in lines], wall, lines[-1]


def transfer_bytes(cfg) -> dict[str, int]:
    from flwr.app import Array, ArrayRecord

    from medstylegan2.fl.wire import encode_for_transfer, initial_weights, transferred

    weights, _ = initial_weights(cfg)
    sent = transferred(weights)
    out = {}
    for dtype in TRANSFER_DTYPES:
        arrays = encode_for_transfer(sent, dtype)
        out[dtype] = ArrayRecord({k: Array(v) for k, v in arrays.items()}).count_bytes()
    out["parameters"] = int(sum(v.numel() for v in sent.values()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--rounds", type=int, default=3, help="rounds per federated run (>= 2: the first is warm-up)")
    p.add_argument("--local-steps", type=int, default=None, help="federation.local_steps (default: the config's)")
    p.add_argument("--skip-simulation", action="store_true", help="no Ray run (local and loopback only)")
    p.add_argument("--bytes-only", action="store_true", help="only the bytes per site per round (no training)")
    args = p.parse_args(argv)

    import torch

    from medstylegan2.config import load_config

    torch.set_num_threads(1)  # one thread per site, as the simulation gives each site
    overrides = [f"federation.rounds={args.rounds}", "federation.evaluate_every=0", "metrics.metrics=[]",
                 "device=cpu"]
    if args.local_steps:
        overrides.append(f"federation.local_steps={args.local_steps}")
    cfg = load_config(REPO / args.config, overrides)
    f = cfg.federation
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config {args.config}: {f.sites} sites x {f.local_steps} local steps per round, {cfg.model.resolution} px, "
          f"batch {cfg.train.batch_size}, {os.cpu_count()} CPU(s), 1 torch thread per site, "
          f"load average {load:.1f} at start", flush=True)

    if not args.bytes_only:
        time_rounds(cfg, args, overrides)
    print_bytes(cfg)
    return 0


def time_rounds(cfg, args, overrides: list[str]) -> None:
    f = cfg.federation
    steps = f.sites * f.local_steps
    rows: list[tuple[str, float, str]] = []
    local = bench_local(cfg, steps)
    rows.append((f"local: {steps} steps, one process", local, ""))
    with tempfile.TemporaryDirectory() as tmp:
        loop = bench_loopback(cfg, args.rounds, Path(tmp) / "loopback")
        per_round = sum(loop[1:]) / max(1, len(loop) - 1)
        rows.append(("federated, in-process loopback (sites in turn)", per_round, ""))
        if not args.skip_simulation:
            sim, wall, _ = bench_simulation(args.config, overrides, Path(tmp) / "simulation")
            per_round = sum(sim[1:]) / max(1, len(sim) - 1)
            rows.append((f"federated, Ray simulation ({f.client_num_cpus:g} CPU per site)", per_round,
                         f"whole run {wall:.0f} s for {args.rounds} rounds incl. start-up"))

    print(f"\n{'mode':<52} {'s/round':>8} {'ratio':>6}")
    for name, seconds, note in rows:
        print(f"{name:<52} {seconds:8.1f} {seconds / local:6.2f}  {note}")


def print_bytes(cfg) -> None:
    sizes = transfer_bytes(cfg)
    print(f"\nbytes per site per round ({sizes['parameters']:,} parameters of G, G_ema, D travel; "
          "noise constants stay home):")
    print("| transfer dtype | down | up | down + up | vs float32 |")
    print("|---|---|---|---|---|")
    for dtype in TRANSFER_DTYPES:
        mb = sizes[dtype] / 2**20
        print(f"| {dtype} | {sizes[dtype]:,} B | {sizes[dtype]:,} B | {2 * mb:.2f} MiB | "
              f"{sizes[dtype] / sizes['float32']:.3f}x |")


if __name__ == "__main__":
    sys.exit(main())
