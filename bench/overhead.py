"""Overhead of gradwatch and of the tools people use today, paired in one process.

Every method trains its own copy of the same model on the same batches. Each round
times one block of steps of an uninstrumented twin and one of the instrumented
model, after a warm-up, interleaved step by step so that drift in machine speed hits
both alike. A method's overhead is the ratio of the median instrumented block time to
the median twin block time; the spread is the interquartile range of the per-round
ratios. A block is 100 steps, two flush periods and one detailed-step period, so
each block carries its share of gradwatch's flushes and detailed steps. The
warm-up is two blocks (one with --quick; either takes gradwatch past its dense
first 100 steps). A method too slow for that schedule (Cockpit) caps its block,
rounds and warm-up; so do methods that cost the same on every step. A method whose
work runs on after its step returns (a writer thread, a service process, numpy's
BLAS threads spinning) would hand that work to the twin's next step if interleaved
step by step; it runs whole blocks instead (see ``timed_round``), and twice the rounds,
since whole blocks do not cancel drift in the machine's speed.

    python bench/overhead.py --quick                 # the MLP only, no Cockpit, under 3 minutes
    python bench/overhead.py --json results.json     # every workload
    python bench/overhead.py --memory                # peak RSS per method, in child processes
    python bench/overhead.py --device cuda           # on a GPU: each step ends in a synchronize

On a GPU every step of both twins ends with ``torch.cuda.synchronize()``, so that a
step's time is its wall time, kernels included, and not only the host's launch time.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS, Instrument  # noqa: E402

# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(3, 16), block(16, 16), nn.MaxPool2d(2), block(16, 32), block(32, 32), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _labels(n: int) -> torch.Tensor:
    return torch.randint(0, 10, (n,))


ce = nn.functional.cross_entropy
CPU = torch.device("cpu")
WORKLOADS = {
    "mlp": Workload("mlp", _mlp, lambda: (torch.randn(128, 256), _labels(128)), ce),
    "cnn_bn": Workload("cnn_bn", _cnn, lambda: (torch.randn(32, 3, 32, 32), _labels(32)), ce),
    "transformer": Workload(
        "transformer", _Transformer, lambda: (torch.randn(16, 32, 128), _labels(16)), ce
    ),
    "lstm": Workload("lstm", _LSTM, lambda: (torch.randn(32, 40, 32), _labels(32)), ce),
}

# ----------------------------------------------------------------------------- timing


class Trainer:
    """One model, its optimizer and (optionally) an instrument around its steps."""

    def __init__(
        self,
        workload: Workload,
        base: nn.Module,
        instrument: Instrument | None,
        device: torch.device = CPU,
    ) -> None:
        self.workload = workload
        self.model = copy.deepcopy(base).to(device)
        # On an accelerator a step ends when its kernels do, not when the host has queued them.
        self.wait = torch.cuda.synchronize if device.type == "cuda" else None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.instrument = instrument
        if instrument is not None:
            instrument.attach(self.model, self.opt)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        if self.instrument is not None:
            self.instrument.before_forward()
        output = self.model(x)
        if self.instrument is not None:
            loss = self.instrument.loss(output, y, self.workload.loss)
        else:
            loss = self.workload.loss(output, y)
        self.opt.zero_grad(set_to_none=True)
        if self.instrument is not None:
            self.instrument.backward(loss)
        else:
            loss.backward()
        if self.instrument is not None:
            self.instrument.before_step(self.model, loss)
        self.opt.step()
        if self.instrument is not None:
            self.instrument.after_step(loss)
        if self.wait is not None:
            self.wait()
        return time.perf_counter() - start

    def block(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return sum(self.step(x, y) for x, y in batches)

    def close(self) -> None:
        if self.instrument is not None:
            self.instrument.close()


def timed_round(
    trainers: Sequence[Trainer],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    whole_blocks: bool = False,
) -> list[float]:
    """One block of steps of each trainer, in order; their times, in the same order.

    The blocks are interleaved step by step, so that a slow spell of the machine lands
    on both. With ``whole_blocks`` (a method that ``leaves_work`` running after its
    step) each trainer runs its block in one piece instead, after one untimed step
    that absorbs whatever the block before it left running; the method's own
    leftovers then land on its own next step, as they do in training.
    """
    times = [0.0] * len(trainers)
    if whole_blocks:
        for i, trainer in enumerate(trainers):
            trainer.step(*batches[0])
            times[i] = trainer.block(batches)
        return times
    for x, y in batches:
        for i, trainer in enumerate(trainers):
            times[i] += trainer.step(x, y)
    return times


def measure(
    workload: Workload,
    methods: list[str],
    rounds: int,
    block: int,
    warmup: int,
    device: torch.device = CPU,
) -> dict:
    torch.manual_seed(0)
    base = workload.make_model()
    batches = [tuple(t.to(device) for t in workload.make_batch()) for _ in range(block)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            peer = PEERS[method]
            instrument = peer.make(Path(tmp) / method)
            if instrument is None:
                results[method] = {"ratio": None, "spread": None, "note": peer.missing_note()}
                print(f"  {workload.name:12s} {method:24s} not installed", flush=True)
                continue
            steps, peer_rounds, peer_warmup = peer.schedule(block, rounds, warmup)
            peer_batches = batches[:steps]
            twin = Trainer(workload, base, None, device)
            watched = Trainer(workload, base, instrument, device)
            try:
                for _ in range(peer_warmup):
                    twin.block(peer_batches)
                    watched.block(peer_batches)
                ratios, twin_times, watched_times = [], [], []
                for r in range(peer_rounds):
                    # Which goes first alternates from round to round.
                    order = (twin, watched) if r % 2 == 0 else (watched, twin)
                    times = dict(
                        zip(order, timed_round(order, peer_batches, peer.leaves_work), strict=True)
                    )
                    twin_times.append(times[twin])
                    watched_times.append(times[watched])
                    ratios.append(times[watched] / times[twin])
            finally:
                watched.close()
            q = statistics.quantiles(ratios, n=4)
            ratio = statistics.median(watched_times) / statistics.median(twin_times)
            results[method] = {
                "ratio": round(ratio, 4),
                "spread": round(q[2] - q[0], 4),
                "step_ms": round(1e3 * statistics.median(twin_times) / steps, 3),
                "block": steps,
                "rounds": peer_rounds,
            }
            print(
                f"  {workload.name:12s} {method:24s} {ratio:6.3f}x  (IQR {q[2] - q[0]:.3f})",
                flush=True,
            )
    return results


# ----------------------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: clear_refs 5 resets VmHWM); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_kib(window: bool) -> int:
    if window:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # since process start


def peak_rss_child(workload: str, method: str, steps: int) -> None:
    """Run one method alone and print its peak RSS in KiB while training (a child process).

    The window opens after imports, model, data and instrument are set up, so the
    import-time peak of torch does not hide what training adds.
    """
    torch.manual_seed(0)
    wl = WORKLOADS[workload]
    base = wl.make_model()
    batches = [wl.make_batch() for _ in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        instrument = None if method == "none" else PEERS[method].make(Path(tmp) / method)
        trainer = Trainer(wl, base, instrument)
        window = _reset_peak_rss()
        trainer.block(batches)
        trainer.close()
        print(_peak_rss_kib(window))


def measure_memory(workload: str, methods: list[str], steps: int) -> dict:
    def run(method: str) -> int:
        out = subprocess.run(
            [sys.executable, __file__, "--child-memory", workload, method, str(steps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1])

    base = statistics.median(run("none") for _ in range(3))
    results = {"none": {"peak_rss_kib": base}}
    for method in methods:
        if PEERS[method].make is None or not PEERS[method].available():
            continue
        peak = statistics.median(run(method) for _ in range(3))
        results[method] = {"peak_rss_kib": peak, "overhead": round(peak / base - 1, 4)}
        print(
            f"  memory {workload:10s} {method:24s} {peak / 1024:8.1f} MiB  ({peak / base - 1:+.1%})",
            flush=True,
        )
    return results


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="MLP only, fewer rounds, no Cockpit (unless named)"
    )
    parser.add_argument(
        "--json", type=Path, help="write {workload: {method: {ratio, spread}}} here"
    )
    parser.add_argument("--workloads", nargs="*", default=None, choices=list(WORKLOADS))
    parser.add_argument("--methods", nargs="*", default=None, choices=list(PEERS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--markdown", type=Path, help="write the results as a Markdown table here")
    parser.add_argument(
        "--memory", action="store_true", help="also measure peak RSS in child processes"
    )
    parser.add_argument(
        "--child-memory", nargs=3, metavar=("WORKLOAD", "METHOD", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2: the spread is an interquartile range")
    if args.child_memory:
        peak_rss_child(args.child_memory[0], args.child_memory[1], int(args.child_memory[2]))
        return 0
    workloads = args.workloads or (["mlp"] if args.quick else list(WORKLOADS))
    methods = args.methods or [m for m in PEERS if not args.quick or PEERS[m].quick]
    rounds = args.rounds or (2 if args.quick else 8)
    # One warm-up block already takes gradwatch past its dense first 100 steps.
    warmup = 1 if args.quick else 2
    # 100 steps: two flush periods and one detailed-step period, so every block pays
    # its share of both instead of the median hiding them.
    block = args.block or 100
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, device {where}"
    )
    results: dict = {}
    for name in workloads:
        wl_methods = [m for m in methods if PEERS[m].applies(name)]
        results[name] = measure(WORKLOADS[name], wl_methods, rounds, block, warmup, device)
    if args.memory:
        results["_memory"] = {
            "mlp": measure_memory("mlp", [m for m in methods if m.startswith("gradwatch")], 150)
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown_table(results))
    return 0


def markdown_table(results: dict) -> str:
    """Methods as rows, workloads as columns: 'ratio (IQR)' or the reason there is none."""
    workloads = [w for w in results if not w.startswith("_")]
    methods = list(dict.fromkeys(m for w in workloads for m in results[w]))
    lines = ["| method | " + " | ".join(workloads) + " |", "|---" * (len(workloads) + 1) + "|"]
    for method in methods:
        cells = []
        for w in workloads:
            r = results[w].get(method)
            if r is None:
                cells.append("")
            elif r["ratio"] is None:
                cells.append(r.get("note", "n/a"))
            else:
                cells.append(f"{r['ratio']:.3f}x ({r['spread']:.3f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    memory = results.get("_memory", {}).get("mlp")
    if memory:
        lines += ["", "| method (MLP) | peak RSS | overhead |", "|---|---|---|"]
        for method, r in memory.items():
            lines.append(
                f"| {method} | {r['peak_rss_kib'] / 1024:.1f} MiB | {r.get('overhead', 0):+.1%} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
