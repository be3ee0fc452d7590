"""A Lightning callback that watches ``Trainer.fit`` and diagnoses it when training ends.

Needs ``pip install 'gradwatch[lightning]'``. Lightning steps its optimizers through
``optimizer.step(closure)``; the watcher reads the gradients after the closure has run
them, so automatic and manual optimization, gradient accumulation and mixed precision
all record one step per optimizer step. Only the process of global rank 0 watches:
after the all-reduce, every rank holds the same gradients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradwatch.integrations.lightning needs Lightning: pip install 'gradwatch[lightning]'"
    ) from exc

import torch

from ..diagnose import Report
from ..store import fresh_path
from ..watch import Watcher, watch


class GradwatchCallback(pl.Callback):
    """Watch a LightningModule's training with gradwatch; ``report`` holds the diagnosis after fit.

    A store holds one run, so each ``fit`` of the same callback after the first (a second
    training stage, a resumed run) goes to a fresh directory beside ``run``: ``run-2``,
    ``run-3``, ...; ``runs`` lists them in order, and ``run_dir`` is the latest.

    Args:
        run: the run directory (default: a new one under ``./gradwatch-runs``).
        print_report: print the diagnosis to the terminal when training ends.
        **options: further keyword arguments of :func:`gradwatch.watch` (``mode``,
            ``detail``, ``flush_every``, ...).

    Example:
        >>> import tempfile, torch, lightning.pytorch as pl
        >>> from torch import nn
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.mse_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.05)
        >>> x = torch.randn(64, 4); data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        >>> run = tempfile.mkdtemp()
        >>> callback = GradwatchCallback(run=run, print_report=False)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> import gradwatch
        >>> gradwatch.open_run(run).steps.tolist()  # 4 batches a epoch, 2 epochs
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> callback.report is not None
        True
    """

    def __init__(
        self, run: str | os.PathLike | None = None, *, print_report: bool = True, **options: Any
    ) -> None:
        self.run = run
        self.print_report = print_report
        self.options = options
        self.watcher: Watcher | None = None
        self.report: Report | None = None
        self.runs: list[Path] = []  # the run directory of each fit, in order

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # A later fit must neither be refused by nor replace the store of an earlier one.
        run = (
            fresh_path(self.runs[0])
            if self.runs and not self.options.get("overwrite")
            else self.run
        )
        self.watcher = watch(pl_module, trainer.optimizers, run=run, scaler=scaler, **self.options)
        self.runs.append(Path(self.watcher.run_dir))

    @property
    def run_dir(self) -> Path | None:
        """The run directory of the latest fit, or None before the first."""
        return self.runs[-1] if self.runs else None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.watcher is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.watcher.log(loss=loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish(exception)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.watcher is None:
            return
        watcher, self.watcher = self.watcher, None
        watcher.close(error=error)
        self.report = watcher.diagnose()
        if self.print_report:
            from rich.console import Console

            from ..report.terminal import render_report

            Console().print(render_report(self.report))
