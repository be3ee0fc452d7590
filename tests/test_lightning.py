"""The Lightning callback against gradient norms read in the LightningModule itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")  # the optional gradwatch[lightning] extra

import gradwatch  # noqa: E402
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402


class Net(pl.LightningModule):
    """Records each layer's gradient norm just before Lightning steps the optimizer."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        self.automatic_optimization = not manual
        self.norms: list[list[float]] = []

    def _note_norms(self):
        self.norms.append(
            [
                torch.cat([p.grad.flatten() for p in self.net[i].parameters()]).norm().item()
                for i in (0, 2)
            ]
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self._note_norms()
        opt.step()
        return {"loss": loss.detach()}

    def on_before_optimizer_step(self, optimizer):
        if self.automatic_optimization:
            self._note_norms()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(tmp_path, manual=False, accumulate=1):
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    model = Net(manual)
    callback = GradwatchCallback(run=tmp_path / "run", print_report=False)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    return model, callback


@pytest.mark.parametrize(("manual", "accumulate"), [(False, 1), (False, 2), (True, 1)])
def test_lightning_fit_records_each_optimizer_step(tmp_path, manual, accumulate):
    model, callback = fit(tmp_path, manual, accumulate)
    run = gradwatch.open_run(tmp_path / "run")
    assert len(run.steps) == len(model.norms) == 12 // accumulate
    np.testing.assert_allclose(run.matrix("grad_norm")[:, [0, 2]], model.norms, rtol=1e-5)
    assert np.isfinite(run.loss).all()
    assert callback.report is not None and callback.watcher is None
    hooks = [h for m in model.modules() for h in (*m._forward_hooks, *m._forward_pre_hooks)]
    assert hooks == []


def test_a_second_fit_of_the_same_callback_goes_to_a_run_of_its_own(tmp_path):
    """A second fit with run= fixed raised RunExistsError from inside Lightning."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16
    )
    callback = GradwatchCallback(run=tmp_path / "run", print_report=False)
    model = Net()
    for epochs in (1, 2):  # a second stage, on a new Trainer: 1 epoch, then 2 more
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader)
    assert [p.name for p in callback.runs] == ["run", "run-2"]
    assert gradwatch.open_run(tmp_path / "run").steps.tolist() == [0, 1, 2, 3]
    assert gradwatch.open_run(tmp_path / "run-2").steps.tolist() == list(range(8))
    assert callback.run_dir == tmp_path / "run-2"
