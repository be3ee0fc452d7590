"""Speed of the mean-field theory: the 100 x 100 phase diagram must take under 2 s on CPU.

Each timing is the best of several runs after a warm-up call (the best run is the one
least disturbed by other processes). The budget applies to tanh, the activation of the
issue; the others show what quadrature-only (gelu) and closed-form (relu, erf)
activations cost.

    python bench/theory_meanfield.py               # table
    python bench/theory_meanfield.py --json out.json
    python bench/theory_meanfield.py --threads 1   # torch intra-op threads (default: torch's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gradwatch.theory import MeanField, critical_sigma_w2, phase_diagram  # noqa: E402

BUDGET_S = 2.0  # issue 4: "A 100x100 phase diagram takes under 2 s"
GRID_W = np.linspace(0.5, 4.0, 100)
GRID_B = np.linspace(0.0, 1.0, 100)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: quadrature rules are cached, torch kernels loaded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for activation in ("tanh", "gelu", "erf", "relu"):
        seconds = best_of(lambda a=activation: phase_diagram(a, GRID_W, GRID_B), args.repeats)
        rows.append({"what": f"phase_diagram 100x100 {activation}", "seconds": seconds})
    rows.append(
        {
            "what": "MeanField tanh (chaotic, 2D quadrature)",
            "seconds": best_of(lambda: MeanField("tanh", 2.5, 0.05), args.repeats),
        }
    )
    rows.append(
        {
            "what": "critical_sigma_w2 tanh (brentq)",
            "seconds": best_of(lambda: critical_sigma_w2("tanh", 0.05), args.repeats),
        }
    )
    tanh = rows[0]["seconds"]
    verdict = "PASS" if tanh < BUDGET_S else "FAIL"
    print(f"{'what':45s} {'seconds':>9s}")
    for row in rows:
        print(f"{row['what']:45s} {row['seconds']:9.3f}")
    print(f"tanh 100x100 phase diagram: {tanh:.3f} s against a {BUDGET_S:g} s budget: {verdict}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {platform.processor() or platform.machine()}"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "budget_s": BUDGET_S, "verdict": verdict}, indent=2)
        )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
