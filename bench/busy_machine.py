"""Why a busy machine slows the simulation down: where the CPU goes, with and without CPU hogs.

    python bench/busy_machine.py [--hogs 0 3] [--variants defaults lean] [--rounds 3] [--repo PATH]

Runs ``python -m simulation --config configs/smoke.yaml`` once per (variant, number of hog
processes) and prints, per run, the wall time and the CPU seconds every process of the run's
process tree used, grouped by kind (the driver: server + Flower's threads; the Ray actors that host
the sites; Ray's own processes: GCS, raylet, dashboard/metrics agents, log monitor, ...). A hog is
a Python busy loop (one core's worth of demand), standing in for the other people's jobs on a
shared machine. Variants: ``defaults`` (Ray as Flower starts it: ``MEDSTYLEGAN2_RAY_DEFAULTS=1``),
``lean`` (``simulation.runtime``). ``--repo`` runs another checkout's simulation (e.g. the commit
before a change) with this measuring code.

CPU time is read from /proc every 0.2 s for every descendant (a process that ends between two
reads loses at most its last 0.2 s). The figures include whatever else the machine runs: compare
rows of one run of this script, not with other days.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            children[int(fields[1])].append(int(entry))
        except (OSError, IndexError):
            continue
    return children


def descendants(root: int) -> list[int]:
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kind_of(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    for marker, kind in (("ClientAppActor", "site actors"), ("ray::IDLE", "site actors"),
                         ("default_worker.py", "site actors"), ("gcs_server", "ray gcs"),
                         ("raylet/raylet", "ray raylet"), ("dashboard", "ray agents"), ("runtime_env", "ray agents"),
                         ("DashboardAgent", "ray agents"), ("RuntimeEnvAgent", "ray agents"), ("monitor.py", "ray other"),
                         ("log_monitor", "ray log monitor"), ("reaper", "ray other"), ("ray", "ray other")):
        if marker in cmd:
            return kind
    return "other"


def watch(process: subprocess.Popen, interval: float = 0.2) -> tuple[dict[str, float], int]:
    """CPU seconds per kind over the run, and the peak summed RSS of the tree."""
    last: dict[int, tuple[str, float]] = {}
    peak = 0
    while process.poll() is None:
        total_rss = 0
        for pid in descendants(process.pid):
            try:
                # Read the kind every time: a worker renames itself (default_worker.py -> ray::...).
                last[pid] = (kind_of(pid, process.pid), cpu_seconds(pid))
                total_rss += rss_bytes(pid)
            except (OSError, IndexError, ValueError):
                continue
        peak = max(peak, total_rss)
        time.sleep(interval)
    per_kind: dict[str, float] = defaultdict(float)
    for kind, seconds in last.values():
        per_kind[kind] += seconds
    return dict(per_kind), peak


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_once(repo: Path, variant: str, hogs: int, rounds: int) -> tuple[float, dict[str, float], int, int]:
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=_hog, args=(stop,), daemon=True) for _ in range(hogs)]
    for w in workers:
        w.start()
    env = dict(os.environ, PYTHONPATH=str(repo))
    if variant == "defaults":
        env["MEDSTYLEGAN2_RAY_DEFAULTS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "simulation", "--config", "configs/smoke.yaml", "--rounds", str(rounds),
                   "--out", str(Path(tmp) / "run")]
        started = time.perf_counter()
        with open(Path(tmp) / "log", "w") as log:
            process = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
            per_kind, peak = watch(process)
        wall = time.perf_counter() - started
    stop.set()
    for w in workers:
        w.join(timeout=5)
    return wall, per_kind, peak, process.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 3])
    p.add_argument("--variants", nargs="+", default=["defaults", "lean"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repo", default=str(REPO))
    args = p.parse_args()
    kinds = ["driver", "site actors", "ray raylet", "ray gcs", "ray agents", "ray log monitor", "ray other", "other"]
    print(f"smoke config, {args.rounds} rounds, {os.cpu_count()} cores, load average before: "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'variant':>9} {'hogs':>4} {'wall s':>7} {'cpu s':>7} " + " ".join(f"{k[:12]:>12}" for k in kinds)
          + f" {'peak RSS GB':>11} rc")
    for hogs in args.hogs:
        for variant in args.variants:
            wall, per_kind, peak, rc = run_once(Path(args.repo), variant, hogs, args.rounds)
            total = sum(per_kind.values())
            print(f"{variant:>9} {hogs:>4} {wall:7.1f} {total:7.1f} "
                  + " ".join(f"{per_kind.get(k, 0.0):12.1f}" for k in kinds) + f" {peak / 1e9:11.2f} {rc}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
