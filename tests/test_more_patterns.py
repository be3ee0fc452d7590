"""More training patterns checked against plain autograd: conversions after watch()."""

from __future__ import annotations

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
