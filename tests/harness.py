"""Helpers shared by test files: invoking the CLI, and training a model to its diagnosis."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app


def cli(*args, env: dict[str, str] | None = None, script_fails: bool = False):
    """Invoke the app; a traceback is allowed only for a failing script, and only its own."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if script_fails:
        assert "gradwatch/" not in result.output.split("run store:")[0], result.output
    else:
        assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    """Output with rich's line breaks undone, to look for a message in it."""
    return " ".join(text.split())


def train_and_diagnose(tmp_path, model, optimizer, batch, loss_fn, steps, scheduler=None):
    """Train ``steps`` steps on ``batch(step)`` under gradwatch; the run's diagnosis."""
    with gradwatch.watch(model, optimizer, run=tmp_path / "run") as w:
        for step in range(steps):
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            w.log(loss=loss)
    return gradwatch.diagnose(tmp_path / "run")


def sgd_step(model, opt, x, w=None) -> torch.Tensor:
    """One step on the mean square of ``model(x)``; its loss, logged to ``w`` if given."""
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if w is not None:
        w.log(loss=loss)
    return loss


def train_on_noise(model, run, steps: int, **kwargs) -> gradwatch.Watcher:
    """``steps`` SGD steps of ``model`` (4 inputs) on random batches of 8 under gradwatch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=run, **kwargs) as w:
        for _ in range(steps):
            sgd_step(model, opt, torch.randn(8, 4), w)
    return w


def he_relu_mlp(depth: int, n_in: int = 16, width: int = 64) -> nn.Sequential:
    """``depth`` He-initialised Linear+ReLU layers (zero biases) and a linear head of one output."""
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(n_in if i == 0 else width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))
