"""Release speed and memory: images/s of ``medstylegan2 release`` at 64 and 256 px, and the peak memory of a
release of 8,000 images per class at 64 px.

    python bench/release_speed.py [--per-class 128] [--big-per-class 8000] [--threads N] [--skip-big]

Models: the default config's widths at each resolution with random weights (speed does not depend on
training). Rows, all measured in this one run:

- ``release``: the whole command (load, generate in fixed 16-image blocks with oneDNN off, encode PNG or npz,
  sha256, manifest, card), images/s over all classes; on CUDA too when present (skipped otherwise);
- ``G only``: the bare generator forward at batch 64 with oneDNN on (the fastest way to get pixels, not
  reproducible across batch sizes), for the cost of reproducibility and of writing files;
- ``batch/threads invariance``: manifests of four small releases (--batch 16 and 64; 1 thread and all threads)
  compared hash by hash;
- ``peak RSS``: the high-water mark (VmHWM) of a child process that runs one release, for
  ``--big-per-class / 10`` and for ``--big-per-class`` images per class, so the two can be compared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medstylegan2.config import load_config  # noqa: E402
from medstylegan2.networks import build_networks  # noqa: E402
from medstylegan2.release import ReleaseOptions, write_release  # noqa: E402
from medstylegan2.runfolder import write_checkpoint  # noqa: E402


def make_checkpoint(resolution: int, path: Path) -> Path:
    cfg = load_config(None, [f"model.resolution={resolution}"])
    torch.manual_seed(0)
    G, D = build_networks(cfg.model)
    return write_checkpoint(path, {"config": cfg.to_dict(), "G": G.state_dict(), "G_ema": G.state_dict(),
                                   "D": D.state_dict(), "step": 0, "cur_nimg": 0})


def time_release(checkpoint: Path, out: Path, per_class: int, **options) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    write_release(ReleaseOptions(checkpoint=checkpoint, out=out, per_class=per_class, quiet=True, **options))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def time_bare_generator(checkpoint: Path, n: int, device: str) -> float:
    from medstylegan2.sampling import load_generator

    G, _ = load_generator(checkpoint, device)
    z = torch.randn(64, G.z_dim, device=device)
    c = torch.arange(64, device=device) % 3
    G(z, c, noise_mode="const")  # warm-up
    start = time.perf_counter()
    for _ in range(max(1, n // 64)):
        G(z, c, noise_mode="const")
    if device == "cuda":
        torch.cuda.synchronize()
    return max(1, n // 64) * 64 / (time.perf_counter() - start)


def manifest_hashes(out: Path) -> list[str]:
    return [line.split(",")[6] for line in (out / "manifest.csv").read_text().splitlines()[1:]]


CHILD = """
import sys
from medstylegan2.release import ReleaseOptions, write_release

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

base = status_kb("VmRSS")
write_release(ReleaseOptions(checkpoint=sys.argv[1], out=sys.argv[2], per_class=int(sys.argv[3]), batch=64,
                             quiet=True))
print("BASE_KB", base, "PEAK_KB", status_kb("VmHWM"))
"""


def peak_rss_mb(checkpoint: Path, out: Path, per_class: int, threads: int) -> tuple[float, float, float]:
    """(peak RSS MB, RSS MB after the imports, seconds) of a child process running one release.

    Read by the child from its own /proc/self/status: the parent's ``RUSAGE_CHILDREN`` would also count the
    parent's pages that the child shares between fork and exec.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(out), str(per_class)], check=True,
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    fields = result.stdout.split()
    base, peak = int(fields[fields.index("BASE_KB") + 1]), int(fields[fields.index("PEAK_KB") + 1])
    return peak / 1024, base / 1024, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=128, help="images per class for the speed rows")
    p.add_argument("--big-per-class", type=int, default=8000, help="images per class of the memory row")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for speed rows")
    p.add_argument("--big-threads", type=int, default=1, help="threads of the memory run's child process")
    p.add_argument("--skip-big", action="store_true", help="skip the peak-memory rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" not in devices:
        print("CUDA not available: GPU rows skipped", flush=True)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"  {what}: {value} {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for res in (64, 256):
            ckpt = make_checkpoint(res, tmp / f"g{res}.pt")
            n = args.per_class if res == 64 else max(16, args.per_class // 4)
            for device in devices:
                time_release(ckpt, tmp / "out", 1, device=device)  # warm-up: first-call costs are not speed
                for fmt in ("png", "npz") if res == 64 else ("png",):
                    s = time_release(ckpt, tmp / "out", n, device=device, format=fmt, batch=64)
                    row(f"release {res}px {fmt} {device}", f"{3 * n / s:.1f} img/s", f"({3 * n} images, {s:.1f} s)")
                bare = time_bare_generator(ckpt, 3 * n, device)
                row(f"G only {res}px {device}, batch 64, oneDNN on", f"{bare:.1f} img/s",
                    "(no files, not reproducible)")

        ckpt64 = tmp / "g64.pt"
        hashes = {}
        many = max(2, args.threads)
        for batch, threads in ((16, 1), (64, 1), (16, many), (64, many)):
            torch.set_num_threads(threads)
            time_release(ckpt64, tmp / "inv", 40, batch=batch, truncation=0.7)
            hashes[(batch, threads)] = manifest_hashes(tmp / "inv")
        torch.set_num_threads(args.threads)
        same = all(h == hashes[(16, 1)] for h in hashes.values())
        row("batch/threads invariance 64px", "identical" if same else "DIFFERENT",
            f"(120 images; batch 16/64 x threads 1/{many})")

        if not args.skip_big:
            small = max(1, args.big_per_class // 10)
            for per_class in (small, args.big_per_class):
                mb, base, s = peak_rss_mb(ckpt64, tmp / "big", per_class, args.big_threads)
                row(f"peak RSS, release of {per_class}/class at 64px", f"{mb:.0f} MB",
                    f"({base:.0f} MB after importing torch; {3 * per_class} PNGs in {s:.0f} s, "
                    f"{3 * per_class / s:.1f} img/s incl. start-up, {args.big_threads} thread)")

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'what':<{width}} | value | note |\n|{'-' * (width + 2)}|---|---|")
    for what, value, note in rows:
        print(f"| {what:<{width}} | {value} | {note} |")


if __name__ == "__main__":
    main()
