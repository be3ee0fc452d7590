"""More training patterns checked against plain autograd: conversions after watch(), NaN outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch


def layer_norm(module: nn.Module) -> float:
    """The L2 norm of a module's parameter gradients, in float64 (the reference)."""
    grads = [p.grad.double().reshape(-1) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("detailed", [False, True])
def test_a_model_converted_after_watch_has_its_gradient_norms_taken_anew(tmp_path, dtype, detailed):
    """model.half() after watch() used to leave the float32 norm plan in place: a
    256x256 layer's norm of ~600 was summed in float16 by BLAS's dot, read inf, and
    the run was diagnosed non-finite with every gradient finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    expected = []
    run = tmp_path / "run"
    with gradwatch.watch(model, opt, run=run, detail=lambda step: detailed) as w:
        for step in range(4):
            if step == 2:
                model.to(dtype)
            x = torch.randn(8, 256, dtype=next(model.parameters()).dtype)
            loss = model(x).float().pow(2).mean() * 500
            opt.zero_grad()
            loss.backward()
            assert all(bool(p.grad.isfinite().all()) for p in model.parameters())
            expected.append([layer_norm(model[0]), layer_norm(model[2])])
            opt.step()
            w.log(loss=loss)
    recorded = gradwatch.open_run(run)
    got = recorded.matrix("grad_norm")[:, [recorded.layers.index("0"), recorded.layers.index("2")]]
    # float32 sums of float16/bfloat16/float64 gradients against float64 ones
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5)
    assert not any(row["nonfinite"] for row in recorded.step_table())
    if detailed:
        assert np.isfinite(recorded.matrix("update_ratio")[:, recorded.layers.index("0")]).all()


class NanAt(nn.Module):
    """A hidden layer feeding tanh, ReLU and sigmoid; its output turns NaN on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.tanh, self.relu, self.sig = nn.Tanh(), nn.ReLU(), nn.Sigmoid()
        self.out = nn.Linear(8, 1)
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.poison:
            h = h * math.nan
        return self.out(self.tanh(h) + self.relu(h) + self.sig(h))


def test_nan_outputs_are_neither_saturated_nor_zero_nor_dead(tmp_path):
    """An all-NaN tanh/sigmoid/ReLU output used to read saturated_frac = 0 and zero_frac = 0
    (NaN compares false), and a window with NaN ReLU outputs dead_frac = 1."""
    torch.manual_seed(0)
    model = NanAt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[str, list[torch.Tensor]] = {"tanh": [], "relu": []}
    model.tanh.register_forward_hook(lambda m, a, y: seen["tanh"].append(y.detach()))
    model.relu.register_forward_hook(lambda m, a, y: seen["relu"].append(y.detach()))
    run = tmp_path / "run"
    with gradwatch.watch(model, opt, run=run, detail=1, flush_every=1) as w:
        for step in range(3):
            model.poison = step == 1
            loss = model(torch.randn(16, 4) * 4).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():  # the weights stay finite for the next step
                p.grad.nan_to_num_(0.0)
            opt.step()
            w.log(loss=loss)
    recorded = gradwatch.open_run(run)
    cols = [recorded.layers.index(name) for name in ("tanh", "relu", "sig")]
    saturated = recorded.matrix("saturated_frac")
    zeros = recorded.matrix("zero_frac")
    dead = recorded.matrix("dead_frac")
    tanh, relu, sig = cols
    # Finite steps measure as before; the reference: counts on the outputs themselves.
    for step in (0, 2):
        y, r = seen["tanh"][step], seen["relu"][step]
        assert saturated[step, tanh] == pytest.approx(float((y.abs() > 0.99**0.5).double().mean()))
        assert zeros[step, relu] == pytest.approx(float((r == 0).double().mean()))
        assert dead[step, relu] == pytest.approx(float((r.amax(0) <= 0).double().mean()))
    assert np.isfinite(saturated[[0, 2], sig]).all()
    # The NaN step measures nothing it cannot know.
    assert np.isnan(saturated[1, [tanh, sig]]).all()
    assert np.isnan(zeros[1, relu])
    assert np.isnan(dead[1, relu])
    assert recorded.step_table()[1]["nonfinite"] == 1
