"""The overhead issue's GPU checks, in one short run for a lent GPU machine.

1. **No host sync on a step that does not flush.** Each workload trains 120 steps
   (detailed steps, plain steps and three flushes) under every mode with
   ``torch.cuda.set_sync_debug_mode("error")``, lifted only inside
   :meth:`Watcher.flush`, where reading back is the point. An uninstrumented control
   runs first, so a sync of the workload's own is not blamed on gradwatch.
2. **The GPU overhead table**: ``bench/overhead.py --device cuda`` for gradwatch's
   modes and the peers that run on a GPU, written as JSON and Markdown.

It needs no install of gradwatch, only torch (as on the lent machine)::

    PYTHONPATH=src python3 bench/gpu_check.py --out results/   # about 5 minutes on an H200

``--device cpu`` runs the same code without a GPU, in seconds with tiny settings,
so that the script is known to work before GPU time is spent on it (the sync check
is then vacuous).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.watch import MODES  # noqa: E402

# Peers that run on a GPU and finish within the machine's budget.
GPU_METHODS = [
    "uninstrumented",
    "gradwatch_default",
    "gradwatch_nonfinite",
    "gradwatch_grads",
    "gradwatch_full",
    "foreach_norm",
    "item_loop",
    "clip_grad_norm",
    "lightning_grad_norm",
    "detect_anomaly",
]


def _sync_mode(device: torch.device, mode: int | str) -> int:
    """Set the sync detector's mode (0 off, "error"); return the mode it had."""
    if device.type != "cuda":
        return 0
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    return previous


def train_without_syncs(
    workload: str, mode: str | None, steps: int, device: torch.device
) -> str | None:
    """Train under the sync detector; None if nothing synced, else where it did."""
    wl = overhead.WORKLOADS[workload]
    torch.manual_seed(0)
    model = wl.make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [tuple(t.to(device) for t in wl.make_batch()) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        watcher = None if mode is None else gradwatch.watch(model, opt, run=tmp, mode=mode)
        if watcher is not None:
            flush = watcher.flush

            def flush_may_sync() -> None:
                previous = _sync_mode(device, 0)  # also at close, once the detector is off
                try:
                    flush()
                finally:
                    _sync_mode(device, previous)

            watcher.flush = flush_may_sync  # type: ignore[method-assign]
        if device.type == "cuda":
            torch.cuda.synchronize()
        step = 0
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(_sync_mode, device, 0)
                _sync_mode(device, "error")
                for step in range(steps):
                    x, y = batches[step % len(batches)]
                    loss = wl.loss(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if watcher is not None:
                        watcher.log(loss)
        except RuntimeError:
            return f"step {step}:\n" + traceback.format_exc(limit=-8)
        finally:
            if watcher is not None:
                watcher.close()
    return None


def sync_checks(workloads: list[str], steps: int, device: torch.device) -> dict:
    results: dict = {}
    for workload in workloads:
        control = train_without_syncs(workload, None, steps, device)
        results[workload] = {"uninstrumented": control or "no sync"}
        for mode in MODES:
            if control is not None:
                outcome = "not checked: the workload syncs by itself"
            else:
                outcome = train_without_syncs(workload, mode, steps, device) or "no sync"
            results[workload][mode] = outcome
            print(f"  sync {workload:12s} {mode:8s} {outcome.splitlines()[0]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=120, help="steps per sync check")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument(
        "--workloads", nargs="*", default=list(overhead.WORKLOADS), choices=list(overhead.WORKLOADS)
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here; --device cpu tries the script without one")
    args.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {where}", flush=True)
    syncs = sync_checks(args.workloads, args.steps, device)
    (args.out / "gpu_syncs.json").write_text(json.dumps(syncs, indent=2))
    overhead.main(
        [
            "--device", args.device, "--rounds", str(args.rounds), "--block", str(args.block),
            "--workloads", *args.workloads,
            "--methods", *GPU_METHODS,
            "--json", str(args.out / "gpu_overhead.json"),
            "--markdown", str(args.out / "gpu_overhead.md"),
        ]
    )  # fmt: skip
    failed = [
        f"{w} {m}" for w, by_mode in syncs.items() for m, r in by_mode.items() if r != "no sync"
    ]
    print("sync check: " + ("passed" if not failed else "FAILED for " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
