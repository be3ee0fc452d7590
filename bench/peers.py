"""The methods bench/overhead.py times: gradwatch's modes and the tools people use today.

Each method is an :class:`Instrument` with hooks around one training step. Optional
peers (Lightning, W&B, TensorBoard, Cockpit) are imported when present; absent ones
are reported as "not installed" rather than failing the benchmark.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class Instrument:
    """Hooks around a training step. The default does nothing."""

    def attach(self, model: nn.Module, opt: torch.optim.Optimizer) -> None: ...
    def before_forward(self) -> None: ...
    def loss(
        self, output: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        # A hook here because some tools (Cockpit) need the outputs and labels themselves.
        return loss_fn(output, y)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def before_step(self, model: nn.Module, loss: torch.Tensor) -> None: ...
    def after_step(self, loss: torch.Tensor) -> None: ...
    def close(self) -> None: ...


class Gradwatch(Instrument):
    def __init__(self, run: Path, mode: str, **options) -> None:
        self.run, self.mode, self.options, self.watcher = run, mode, options, None

    def attach(self, model, opt):
        import gradwatch

        self.watcher = gradwatch.watch(model, opt, run=self.run, mode=self.mode, **self.options)

    def after_step(self, loss):
        self.watcher.log(loss=loss)

    def close(self):
        self.watcher.close()


class ForeachNorm(Instrument):
    """Per-parameter norms with one fused kernel per (device, dtype), kept on the device."""

    def attach(self, model, opt):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.kept: list[torch.Tensor] = []

    def before_step(self, model, loss):
        grads = [p.grad for p in self.params if p.grad is not None]
        self.kept.append(torch.stack(torch._foreach_norm(grads)))
        if len(self.kept) > 50:
            self.kept.clear()


class ItemLoop(Instrument):
    """The seed texts' monitor: one ``.norm().item()`` per parameter, every step."""

    def attach(self, model, opt):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def before_step(self, model, loss):
        self.last = {n: p.grad.norm().item() for n, p in self.named if p.grad is not None}


class ClipGradNorm(Instrument):
    def attach(self, model, opt):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def before_step(self, model, loss):
        torch.nn.utils.clip_grad_norm_(self.params, max_norm=1e9)


class DetectAnomaly(Instrument):
    """torch.autograd's anomaly mode around forward and backward (restored after each step)."""

    def before_forward(self):
        torch.autograd.set_detect_anomaly(True)

    def after_step(self, loss):
        torch.autograd.set_detect_anomaly(False)

    def close(self):
        torch.autograd.set_detect_anomaly(False)


class LightningGradNorm(Instrument):
    def before_step(self, model, loss):
        from lightning.pytorch.utilities import grad_norm

        self.last = grad_norm(model, norm_type=2)


class TensorBoardHistograms(Instrument):
    """A histogram of every gradient, every step."""

    def __init__(self, run: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run))
        self.step = 0

    def attach(self, model, opt):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def before_step(self, model, loss):
        for name, p in self.named:
            if p.grad is not None:
                self.writer.add_histogram(name, p.grad, self.step)
        self.step += 1

    def close(self):
        self.writer.close()


class WandbWatch(Instrument):
    def __init__(self, run: Path, log_freq: int) -> None:
        import wandb

        run.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            mode="offline",
            dir=str(run),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True),
        )
        self.log_freq = log_freq

    def attach(self, model, opt):
        self.wandb.watch(model, log="gradients", log_freq=self.log_freq)

    def after_step(self, loss):
        self.wandb.log({"loss": loss.detach()})

    def close(self):
        self.wandb.unwatch()
        self.run.finish()


class CockpitEconomy(Instrument):
    """Cockpit's "economy" quantities on every step, the way its docs set it up.

    BackPACK hooks the (copied) model and a mean loss module; Cockpit also takes the
    per-sample losses. Every workload's loss is cross-entropy, so the modules are too.
    """

    def attach(self, model, opt):
        import backpack
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration

        backpack.extend(model)
        self.mean_loss = backpack.extend(nn.CrossEntropyLoss())
        self.individual_loss = nn.CrossEntropyLoss(reduction="none")
        self.cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
        self.opt, self.step = opt, 0

    def loss(self, output, y, loss_fn):
        self.info = {
            "batch_size": len(y),
            "individual_losses": self.individual_loss(output, y).detach(),
            "optimizer": self.opt,
        }
        return self.mean_loss(output, y)

    def backward(self, loss):
        with self.cockpit(self.step, info={**self.info, "loss": loss}):
            loss.backward(create_graph=self.cockpit.create_graph(self.step))
        self.step += 1


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class Peer:
    """A method: how to make its instrument, whether it is installed, and where it applies."""

    factory: Callable[[Path], Instrument]
    requires: str | None = None
    workloads: tuple[str, ...] | None = None
    comparable: bool = True  # records per-layer gradient information comparable to gradwatch's
    notes: list[str] = field(default_factory=list)
    # Caps on the harness's steps per block, timed rounds and warm-up blocks, for a
    # method too slow to run the full schedule in a sitting.
    block: int | None = None
    rounds: int | None = None
    warmup: int | None = None
    quick: bool = True  # part of --quick's default methods
    # Its work runs on after its step returns: a writer thread, a service process, or
    # numpy's OpenBLAS threads spinning after a dot product and taking a core from the
    # next step. Timed step by step against the twin, that work would land on the
    # twin's steps (TensorBoard read 0.8x on the CNN); overhead.py times it in blocks.
    leaves_work: bool = False

    def available(self) -> bool:
        return self.requires is None or _has(self.requires)

    @property
    def make(self) -> Callable[[Path], Instrument | None]:
        return lambda run: self.factory(run) if self.available() else None

    def missing_note(self) -> str:
        return f"not installed ({self.requires})"

    def applies(self, workload: str) -> bool:
        return self.workloads is None or workload in self.workloads

    def schedule(self, block: int, rounds: int, warmup: int) -> tuple[int, int, int]:
        """The harness's block, rounds and warm-up, each capped by this method's own.

        A method timed in whole blocks (``leaves_work``) gets twice the rounds: whole
        blocks do not cancel drift in the machine's speed as step-by-step pairs do.
        """

        def cap(n: int, mine: int | None) -> int:
            return n if mine is None else min(n, mine)

        rounds = cap(rounds, self.rounds) * (2 if self.leaves_work else 1)
        return cap(block, self.block), rounds, cap(warmup, self.warmup)


PEERS: dict[str, Peer] = {
    # A second uninstrumented copy: the noise floor of the pairing itself.
    "uninstrumented": Peer(lambda run: Instrument(), comparable=False),
    "gradwatch_default": Peer(lambda run: Gradwatch(run, "default")),
    # Only what runs on every step (gradient norms and the non-finite checks): the
    # always-on localization, next to detect_anomaly.
    "gradwatch_nonfinite": Peer(lambda run: Gradwatch(run, "default", detail=lambda step: False)),
    "gradwatch_grads": Peer(lambda run: Gradwatch(run, "grads")),
    "gradwatch_full": Peer(lambda run: Gradwatch(run, "full")),
    "foreach_norm": Peer(lambda run: ForeachNorm()),
    "item_loop": Peer(lambda run: ItemLoop()),
    "clip_grad_norm": Peer(lambda run: ClipGradNorm()),
    "detect_anomaly": Peer(lambda run: DetectAnomaly(), comparable=False),
    "lightning_grad_norm": Peer(lambda run: LightningGradNorm(), requires="lightning"),
    # TensorBoard and W&B every step cost the same on every step, so 25-step blocks lose
    # nothing; W&B every 100 steps keeps the full block, which holds its one logging step.
    "tensorboard_histograms": Peer(
        TensorBoardHistograms, requires="tensorboard", block=25, leaves_work=True
    ),
    "wandb_watch_100": Peer(lambda run: WandbWatch(run, 100), requires="wandb", leaves_work=True),
    "wandb_watch_1": Peer(
        lambda run: WandbWatch(run, 1), requires="wandb", block=25, leaves_work=True
    ),
    # BackPACK has no per-sample gradients for attention, nor for LSTMs of more than one
    # layer; with BatchNorm they run but mix samples (BackPACK warns). A step takes
    # about 5 s on the MLP, so 3-step blocks keep --quick within minutes.
    "cockpit_economy": Peer(
        lambda run: CockpitEconomy(),
        requires="cockpit",
        workloads=("mlp", "cnn_bn"),
        block=3,
        rounds=3,
        warmup=1,
        quick=False,
    ),
}
