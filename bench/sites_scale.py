"""Many virtual sites on one small machine: round time and peak memory against total and sampled sites.

    python bench/sites_scale.py [--rounds 3] [--totals 10 30 100] [--sampled 5 10 20]

Runs ``python -m simulation`` on the smoke config (phantoms, 32 px) with ``federation.sites`` virtual
sites of which ``ceil(fraction_train * sites)`` train per round, and prints per run: seconds per
round (median of the rounds after the first, from ``metrics.jsonl``), the whole run's wall time
(Ray start-up, roll call, ...), and the peak resident memory of the whole process tree (driver +
Ray's processes + site actors, summed from /proc every 0.2 s) and the CPU seconds of the driver
(server, Flower's engine threads) and of the whole tree. Two series: total sites at a fixed
number of sampled sites (round time should stay flat), and sampled sites at 100 total (round time
should grow linearly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from busy_machine import watch  # noqa: E402  (process-tree CPU and memory from /proc)

# Enough phantoms that 100 sites get about 9 training images each.
DATA = ["data.phantoms_per_class=400", "data.heldout_fraction=0.25"]


def run(total: int, sampled: int, rounds: int) -> tuple[float, float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "simulation", "--config", "configs/smoke.yaml", "--rounds", str(rounds),
                   "--out", str(run_dir), "--set", f"federation.sites={total}",
                   "--set", f"federation.fraction_train={sampled / total}", "--set", "federation.min_sites=1"]
        for item in DATA:
            command += ["--set", item]
        started = time.perf_counter()
        with open(Path(tmp) / "log", "w") as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, PYTHONPATH=str(REPO)))
            per_kind, peak = watch(process)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            print((Path(tmp) / "log").read_text()[-3000:], file=sys.stderr)
            return float("nan"), wall, peak / 2**30, 0, per_kind
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds_ = [line for line in lines if line.get("kind") == "round"]
        per_round = statistics.median(line["seconds"] for line in rounds_[1:]) if len(rounds_) > 1 else float("nan")
        trained = int(statistics.median(line["aggregated"]["sites"] for line in rounds_))
        statuses = Counter(entry["status"].split(":")[0] for line in rounds_ for entry in line["sites"].values())
        if set(statuses) != {"ok"}:
            print(f"  ({total} sites: site statuses over all rounds: {dict(statuses)})", flush=True)
    return per_round, wall, peak / 2**30, trained, per_kind


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--totals", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--sampled", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--fixed-sampled", type=int, default=5)
    p.add_argument("--fixed-total", type=int, default=100)
    args = p.parse_args()
    cases = [(t, args.fixed_sampled) for t in args.totals]
    cases += [(args.fixed_total, s) for s in args.sampled if (args.fixed_total, s) not in cases]
    print(f"smoke config (32 px, 3 local steps), {args.rounds} rounds, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'total sites':>11} {'sampled':>7} {'trained':>7} {'s/round':>8} {'run wall s':>10} {'peak RSS GiB':>12} "
          f"{'driver cpu s':>12} {'all cpu s':>9}")
    for total, sampled in cases:
        per_round, wall, peak, trained, cpu = run(total, sampled, args.rounds)
        print(f"{total:>11} {sampled:>7} {trained:>7} {per_round:8.1f} {wall:10.0f} {peak:12.2f} "
              f"{cpu.get('driver', 0.0):12.1f} {sum(cpu.values()):9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
