"""Non-finite values that are not failures, and failures that must still be caught.

Two ways a healthy run used to read as broken: logits masked with -inf stopped
``stop_on_nonfinite=True`` at step 0, and under a GradScaler whose scale had grown
past about 2**60 the errors' float32 squares overflowed, so their norms read inf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

STEPS = 25  # detailed steps 0-10 and 20, plain steps 11-19, 21-24 (the default schedule)
ARMED_STEP = 13  # a plain step


class MaskLogits(nn.Module):
    """Sets the logits of invalid actions to -inf, as policies and decoders do."""

    def forward(self, logits, valid):
        return logits.masked_fill(~valid, float("-inf"))


class NaNWhenArmed(nn.Module):
    """log of a negative number (NaN) while armed, the identity otherwise."""

    armed = False

    def forward(self, x):
        return torch.log(x - 10.0) if self.armed else x


class Policy(nn.Module):
    """A masked policy head beside a value head that may turn NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.policy = nn.Linear(16, 5)
        self.mask = MaskLogits()
        self.value = nn.Sequential(nn.Linear(16, 8), NaNWhenArmed(), nn.Linear(8, 1))

    def forward(self, x, valid):
        h = self.body(x)
        return self.mask(self.policy(h), valid), self.value(h)


def train_policy(model, watcher, steps=STEPS):
    opt = watcher._optimizers[0]
    with watcher as w:
        for step in range(steps):
            model.value[1].armed = step == ARMED_STEP
            x, target = torch.randn(8, 6), torch.randint(0, 5, (8,))
            valid = torch.rand(8, 5) > 0.4
            valid[torch.arange(8), target] = True  # the target is never masked
            logits, value = model(x, valid)
            loss = F.cross_entropy(logits, target) + value.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)


def stopping_watcher(model, run_dir, defer):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, opt, run=run_dir, stop_on_nonfinite=True)
    if not defer:  # behave as on an accelerator: every layer sums as it goes
        watcher._defers_checks = lambda root, args: False
    return watcher


class Masked(Policy):
    def forward(self, x, valid):  # no value head: the mask alone
        return self.mask(self.policy(self.body(x)), valid), torch.zeros(1, requires_grad=True)


@pytest.mark.parametrize("defer", [True, False], ids=["cpu-deferred", "per-layer"])
def test_stop_on_nonfinite_trains_a_model_whose_logits_are_masked(tmp_path, defer):
    model = Masked()
    before = model.policy.weight.detach().clone()
    train_policy(model, stopping_watcher(model, tmp_path, defer))
    run = gradwatch.open_run(tmp_path)
    assert len(run.steps) == STEPS
    assert not torch.equal(before, model.policy.weight)  # it trained
    findings = [f for f in gradwatch.diagnose(tmp_path).findings if f.kind == "nonfinite"]
    assert [f.severity for f in findings] == ["info"]  # the mask's note, not a failure


@pytest.mark.parametrize("defer", [True, False], ids=["cpu-deferred", "per-layer"])
def test_stop_on_nonfinite_still_names_a_nan_layer_beside_a_mask(tmp_path, defer):
    model = Policy()
    stops = pytest.raises(gradwatch.NonFiniteError, match="'value.1'")
    with stops as caught:
        train_policy(model, stopping_watcher(model, tmp_path, defer))
    assert caught.value.step == ARMED_STEP and caught.value.where == "forward output"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class LogOfZeroWhenArmed(nn.Module):
    armed = False

    def forward(self, x):
        return torch.log(x * 0) if self.armed else x


@pytest.mark.parametrize("defer", [True, False], ids=["cpu-deferred", "per-layer"])
def test_a_nan_that_follows_an_unknown_minus_inf_is_blamed_on_the_minus_inf(tmp_path, defer):
    """log(0) = -inf does not stop by itself; the NaN it makes in the next layer names it."""
    model = nn.Sequential(nn.Linear(4, 4), LogOfZeroWhenArmed(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = gradwatch.watch(model, opt, run=tmp_path, stop_on_nonfinite=True)
    if not defer:
        watcher._defers_checks = lambda root, args: False
    with pytest.raises(gradwatch.NonFiniteError, match="'1'") as caught, watcher:
        for step in range(ARMED_STEP + 1):
            model[1].armed = step == ARMED_STEP
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert caught.value.step == ARMED_STEP


# ---------------------------------------------------------------- large loss scales
SCALE = 2.0**70  # a long AMP run without overflows doubles its scale every 2000 steps


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )


def reference_errors(model, x, y) -> np.ndarray:
    """||dL/d(output)|| of each top-level layer, by plain autograd, in float64."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in model]
    try:
        loss = (model(x) - y).pow(2).mean()
    finally:
        for h in hooks:
            h.remove()
    return np.array([float(e.double().norm()) for e in torch.autograd.grad(loss, outs)])


def test_error_norms_under_a_large_loss_scale_are_finite_and_right(tmp_path):
    model = mlp()
    x, y = torch.randn(128, 64), torch.randn(128, 10)
    expected = reference_errors(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with gradwatch.watch(model, opt, run=tmp_path, scaler=scaler, detail=1) as w:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        # The scaled errors' squares pass float32's max; the gradients stay finite.
        assert (SCALE * expected[1:]).min() > math.sqrt(torch.finfo(torch.float32).max)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        scaler.step(opt)
        scaler.update()
        w.log(loss=loss)
    assert w.scaler_skips == 0  # the optimizer stepped: a real step
    run = gradwatch.open_run(tmp_path)
    got = run.matrix("error_norm")[0, [run.layers.index(str(i)) for i in range(5)]]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert [r["nonfinite"] for r in run.step_table()] == [0]
    assert not [f for f in gradwatch.diagnose(tmp_path).findings if f.kind == "nonfinite"]


def test_wide_norm_overflows_only_past_float32s_range():
    from gradwatch.probes.grads import wide_norm

    big = torch.full((4096,), 1e19)  # squares of 1e38 each: float32 sums overflow
    assert float(wide_norm(big)) == pytest.approx(64e19, rel=1e-6)
    assert float(wide_norm(big[::2])) == pytest.approx(math.sqrt(2048) * 1e19, rel=1e-6)
    assert float(wide_norm(big.bfloat16())) == pytest.approx(64e19, rel=1e-2)
    assert float(wide_norm(torch.tensor([3.0, 4.0]))) == 5.0
    assert math.isinf(wide_norm(torch.tensor([1.0, math.inf])))
    assert math.isnan(wide_norm(torch.tensor([1.0, math.nan])))
