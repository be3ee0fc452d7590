"""Cost of a diagnosis: a 10,000-step, 100-layer run must be diagnosed in under 2 s.

The store is written the way the watcher writes it (schema 2): per-layer grad_norm
on every step, act_mean for the layers checked every step, the detailed metrics on
the default schedule, per-parameter rows on detailed steps. Values follow a healthy
run with noise, so every rule runs its full analysis rather than an early exit.

    python bench/diagnose_cost.py            # prints the timing, exits 1 over budget
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gradwatch import diagnose
from gradwatch.schedule import Schedule
from gradwatch.store import LayerRow, RunWriter

BUDGET_S = 2.0  # issue 3: "Diagnosing a 10,000-step, 100-layer run takes under 2 s."


def write_run(path: Path, steps: int, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = RunWriter(path)
    linear = list(range(0, layers, 2))  # Linear, ReLU, Linear, ReLU, ...
    rows = [
        LayerRow(i, str(i), "Linear" if i in linear else "ReLU", None if i in linear else "relu",
                 i, 256 if i in linear else None, 65792 if i in linear else 0)
        for i in range(layers)
    ]  # fmt: skip
    params = [(k, f"{i}.weight", i, "256x256", 65536) for k, i in enumerate(linear)]
    schedule = Schedule()
    chunk = 50
    for start in range(0, steps, chunk):
        span = range(start, min(start + chunk, steps))
        loss = 2.3 * np.exp(-np.array(span) / 3000) + 0.05 * rng.random(len(span))
        step_rows = [
            (s, float(v), int(schedule(s)), 0, 0, None, None, 0)
            for s, v in zip(span, loss, strict=True)
        ]
        lm, pm = [], []
        for s in span:
            grad = 10 ** rng.normal(-2, 0.05, len(linear))
            lm += [(s, i, "grad_norm", float(g)) for i, g in zip(linear, grad, strict=True)]
            if not schedule(s):
                continue
            for i in range(layers):
                lm += [(s, i, "act_mean", float(rng.normal(0.3, 0.01))),
                       (s, i, "act_std", float(rng.normal(0.5, 0.01))),
                       (s, i, "error_norm", float(10 ** rng.normal(-2, 0.05))),
                       (s, i, "error_rms", float(10 ** rng.normal(-4, 0.05)))]  # fmt: skip
                if i in linear:
                    lm += [(s, i, "update_ratio", float(10 ** rng.normal(-3, 0.1))),
                           (s, i, "weight_norm", 10.0), (s, i, "grad_zero_frac", 0.0)]  # fmt: skip
                else:
                    lm += [(s, i, "zero_frac", 0.5), (s, i, "dead_frac", 0.0)]
            pm += [(s, k, "grad_norm", 0.01) for k in range(len(linear))]
        writer.write(rows if start == 0 else [], params if start == 0 else [], step_rows, lm, pm)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_run(Path(tmp), args.steps, args.layers)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            report = diagnose(tmp)
            times.append(time.perf_counter() - start)
    best = min(times)
    print(
        f"diagnose: {args.steps} steps x {args.layers} layers in {best:.2f} s "
        f"(budget {BUDGET_S} s; {len(report.findings)} findings)"
    )
    return 0 if best <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
