"""The demo: a deep sigmoid network that cannot learn, its diagnosis, the fix, and the proof.

It trains a 10-layer sigmoid MLP on the handwritten digits (8x8 images), shows
gradwatch's diagnosis, applies the top remedies that can be applied to a model
(ReLU in place of sigmoid, He init), retrains from the same seed, and shows the
new diagnosis with the loss before and after.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .diagnose import Report, diagnose
from .diagnose.causes import REMEDIES_FOR
from .remedies import APPLICABLE, apply_remedies
from .watch import watch

DEPTH, WIDTH = 10, 64
SUB_RUNS = ("before", "after")  # the two run directories under the demo's out
LR = 0.02  # with momentum 0.9: the same setting trains the fixed ReLU net to ~99% in 300 steps


def load_digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """The digits as (x in [0, 1], labels, source): scikit-learn's copy if installed, else ours."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits

        data = sklearn_digits()
        images, target, source = data.data, data.target, "scikit-learn's load_digits"
    except ImportError:
        with resources.files("gradwatch.data").joinpath("digits.npz").open("rb") as f:
            arrays = np.load(f, allow_pickle=False)
            images, target = arrays["images"], arrays["target"]
        source = "gradwatch's bundled copy (UCI optdigits, CC BY 4.0)"
    x = torch.tensor(np.asarray(images, dtype=np.float32) / 16.0)
    return x, torch.tensor(np.asarray(target, dtype=np.int64)), source


def sigmoid_mlp(depth: int = DEPTH, width: int = WIDTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@dataclass
class Trial:
    name: str
    report: Report
    losses: list[float]
    accuracy: float
    run_dir: Path


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    run_dir: Path,
    name: str,
    overwrite: bool = False,
) -> Trial:
    """SGD on mini-batches of 128 under gradwatch; returns the diagnosis and the losses."""
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    with watch(model, opt, run=run_dir, overwrite=overwrite) as watcher:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=generator)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            watcher.log(loss=loss)
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return Trial(name, diagnose(run_dir), losses, accuracy, run_dir)


ACTIVATION_SWAPS = {"relu", "gelu", "leaky_relu"}
INITS = {"he_init", "xavier_init", "orthogonal_init"}


def top_applicable_remedies(report: Report) -> list[str]:
    """For the worst finding, the best appliable remedy of each of its causes.

    One activation swap and one init at most; a swap to a rectifier brings He init
    with it, since the old init was chosen for the old activation.
    """
    for finding in report.findings:
        chosen: list[str] = []
        for cause in finding.causes:
            for rid in REMEDIES_FOR.get(cause.id, []):
                if rid in APPLICABLE:
                    group = ACTIVATION_SWAPS if rid in ACTIVATION_SWAPS else INITS
                    if not group & set(chosen):
                        chosen.append(rid)
                    break
        if chosen and set(chosen) & ACTIVATION_SWAPS and not set(chosen) & INITS:
            chosen.append("he_init")
        if chosen:
            return chosen
    return []


def run_demo(
    steps: int = 300,
    out: Path | None = None,
    console: Console | None = None,
    overwrite: bool = False,
) -> tuple[Trial, Trial]:
    """Run the demo and print it; returns the trial before and after the fix.

    The two runs are stored in ``out/before`` and ``out/after``; ``overwrite`` replaces
    those of an earlier demo there (without it, they raise :class:`gradwatch.store.RunExistsError`).

    Example:
        >>> before, after = run_demo(steps=60, console=Console(file=open("/dev/null", "w")))  # doctest: +SKIP
    """
    console = console or Console()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gradwatch-demo-"))
    torch.manual_seed(0)
    x, y, source = load_digits()
    model = sigmoid_mlp()
    initial = copy.deepcopy(model)
    console.rule("[bold]1. A 10-layer sigmoid MLP on the handwritten digits")
    console.print(f"{len(x)} images from {source}; SGD with momentum, {steps} steps of 128.")
    before = train(model, x, y, steps, out / SUB_RUNS[0], "sigmoid", overwrite)
    console.print(before.report)
    fixes = top_applicable_remedies(before.report)
    if not fixes:
        console.print("No appliable remedy was proposed; nothing to treat.")
        return before, before
    console.rule(f"[bold]2. Treat: apply {', '.join(fixes)} and retrain from the same start")
    treated = apply_remedies(copy.deepcopy(initial), fixes)
    after = train(treated, x, y, steps, out / SUB_RUNS[1], "+".join(fixes), overwrite)
    console.print(after.report)
    console.rule("[bold]3. Did it help?")
    table = Table(caption="loss: the mean over the first or the last 10 steps")
    for col in ("model", "first loss", "last loss", "train accuracy"):
        table.add_column(col)
    table.add_column("diagnosis", overflow="fold")
    for trial in (before, after):
        table.add_row(
            trial.name,
            f"{np.mean(trial.losses[:10]):.3f}",
            f"{np.mean(trial.losses[-10:]):.3f}",
            f"{trial.accuracy:.1%}",
            "healthy"
            if trial.report.healthy
            else "\n".join(sorted({f.kind for f in trial.report.findings})),
        )
    console.print(table)
    # The paths go below the table: in a column, an 80-wide terminal cut them to "/tmp/gra…".
    for trial in (before, after):
        console.print(f"{trial.name}: gradwatch show {trial.run_dir}", soft_wrap=True, markup=False)
    return before, after
