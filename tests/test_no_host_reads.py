"""No step reads a device value back to the host; only flushes do.

On an accelerator a host read waits for every queued kernel (a "sync"). CI has no
GPU, so these tests train on the ``meta`` device instead: meta tensors carry shapes
and no data, so any host read (``.item()``, ``bool()``, ``.cpu()``, ``nonzero()``)
raises there. Steps on a device that is not the CPU take the accelerator's path
(every checked layer queues its own sum; see ``Watcher._defers_checks``).

The watcher flushes its first step at once, to write the layer table; that flush
fails on meta tensors and is reported in a warning. No later flush comes within
the test, so every other step must pass without reading anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.watch import GradwatchWarning

STEPS = 12  # detailed steps 0-9 and plain steps 10-11 under the default schedule


class LastOfLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


MODELS = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
        ),
        (4, 8),
    ),
    "cnn_bn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 1)
        ),
        (4, 3, 8, 8),
    ),
    "lstm": (LastOfLSTM, (4, 5, 8)),
    "transformer": (
        lambda: nn.Sequential(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2),
            nn.Flatten(),
            nn.Linear(40, 1),
        ),
        (4, 5, 8),
    ),
}


def train_on_meta(model_name: str, tmp_path, **options) -> tuple[gradwatch.Watcher, list]:
    make, shape = MODELS[model_name]
    model = make().to("meta")
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, opt, run=tmp_path, flush_every=10**6, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            loss = model(torch.randn(*shape, device="meta")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            watcher.log(loss)
    return watcher, caught


@pytest.mark.parametrize("mode", ["default", "grads", "full"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_steps_read_nothing_back_until_a_flush(tmp_path, model_name, mode):
    watcher, caught = train_on_meta(model_name, tmp_path, mode=mode)
    messages = [str(w.message) for w in caught if issubclass(w.category, GradwatchWarning)]
    assert len(messages) == 1 and "Cannot copy out of meta tensor" in messages[0]
    assert watcher.steps_recorded == STEPS
    assert len(watcher._pending) == STEPS - 1  # all but the first, whose flush failed
    watcher._pending.clear()  # they cannot be written
    watcher.close()


def test_the_meta_device_catches_a_host_read(tmp_path):
    """stop_on_nonfinite reads every step's sums back: on meta tensors that raises."""
    with pytest.raises((NotImplementedError, RuntimeError)):
        train_on_meta("mlp", tmp_path, stop_on_nonfinite=True)
