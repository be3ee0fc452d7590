"""The diagnosis on small models whose truth is known by construction: pathologies and traps.

Each trap is a healthy model that naive rules flag (a first/last gradient ratio, a
threshold on one step); each pathology is one that such rules miss. The independent
check is the construction itself, verified here with plain autograd where it matters.
"""

from __future__ import annotations

import pytest
import torch
from harness import he_relu_mlp
from torch import nn

import gradwatch


def train(tmp_path, model, make_batch, steps=60, lr=0.05, opt="sgd", params=None, **watch_kwargs):
    torch.manual_seed(0)
    params = list(model.parameters()) if params is None else params
    optimizer = torch.optim.SGD(params, lr=lr) if opt == "sgd" else torch.optim.Adam(params, lr=lr)
    with gradwatch.watch(model, optimizer, run=tmp_path / "run", **watch_kwargs) as w:
        for _ in range(steps):
            x, y = make_batch()
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.log(loss=loss)
    return gradwatch.diagnose(tmp_path / "run")


def regression(n_in=16, n_out=1, scale=1.0):
    teacher = nn.Linear(n_in, n_out)

    def batch():
        x = torch.randn(64, n_in)
        with torch.no_grad():
            return x, scale * torch.tanh(teacher(x))

    return batch


def kinds(report):
    return {f.kind: f for f in report.findings}


def loud(report):
    return [
        (f.kind, f.severity, f.layers[:4], f.summary)
        for f in report.findings
        if f.severity != "info"
    ]


def test_deep_linear_half_identity_vanishes_although_weight_gradients_are_flat(tmp_path):
    """W = 0.5 I: the error halves per layer while the input shrinks alike, so weight grads look flat."""
    depth = 24
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(depth)])
    for layer in model:
        nn.init.eye_(layer.weight)
        layer.weight.data.mul_(0.5)
    x = torch.randn(32, 16)
    # The independent check: weight-gradient norms are flat across depth (within 10x) ...
    out = model(x)
    out.pow(2).sum().backward()
    norms = [layer.weight.grad.norm().item() for layer in model]
    assert max(norms) / min(norms) < 10
    model.zero_grad()
    report = train(
        tmp_path, model, lambda: (torch.randn(32, 16), torch.randn(32, 16)), steps=30, lr=0.01
    )
    found = kinds(report)
    assert "vanishing_gradient" in found, loud(report)
    assert found["vanishing_gradient"].layers[0] == "0"
    assert abs(found["vanishing_gradient"].evidence["gain_per_layer"] - 0.5) < 0.05


def test_he_relu_mlp_is_healthy(tmp_path):
    model = he_relu_mlp(10)
    report = train(tmp_path, model, regression(), steps=80, lr=0.01)
    assert report.healthy, loud(report)


def test_relu_mlp_with_tiny_init_vanishes_with_the_init_as_cause(tmp_path):
    layers = []
    for i in range(10):
        lin = nn.Linear(16 if i == 0 else 64, 64)
        nn.init.normal_(lin.weight, std=0.01)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 1))
    report = train(tmp_path, model, regression(), steps=40)
    found = kinds(report)
    assert "vanishing_gradient" in found, loud(report)
    finding = found["vanishing_gradient"]
    assert finding.causes[0].id == "init_too_small"
    assert finding.remedies[0].id == "he_init"


def test_zero_initialised_residual_branches_are_healthy(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
            nn.init.zeros_(self.f[2].weight)  # the branch starts as exactly 0
            nn.init.zeros_(self.f[2].bias)

        def forward(self, x):
            return x + self.f(x)

    model = nn.Sequential(nn.Linear(16, 32), *[Block() for _ in range(6)], nn.Linear(32, 1))
    report = train(tmp_path, model, regression(), steps=60, lr=0.02)
    assert report.healthy, loud(report)


def test_large_but_stable_gradients_from_a_large_target_scale_are_healthy(tmp_path):
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    report = train(tmp_path, model, regression(scale=1000.0), steps=80, lr=1e-2, opt="adam")
    assert "exploding_gradient" not in kinds(report), loud(report)


def test_frozen_layers_raise_nothing(tmp_path):
    model = nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(32, 32), nn.Tanh())], nn.Linear(32, 1)
    )
    model[0] = nn.Linear(16, 32)
    for p in list(model.parameters())[:6]:
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = train(tmp_path, model, regression(), steps=60, lr=0.05, params=trainable)
    assert report.healthy, loud(report)


def test_a_head_with_larger_gradients_than_the_body_is_healthy(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()
            )
            self.head = nn.Linear(64, 8)

        def forward(self, x):
            return 30.0 * self.head(self.body(x))  # the head's error is 30x the body's input scale

    report = train(tmp_path, Net(), regression(n_out=8), steps=60, lr=1e-3, opt="adam")
    assert report.healthy, loud(report)


def test_stacked_lstms_whose_first_layer_gets_smaller_gradients_are_healthy(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm1 = nn.LSTM(4, 32, batch_first=True)
            self.lstm2 = nn.LSTM(32, 32, batch_first=True)
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.lstm2(self.lstm1(x)[0])[0][:, -1])

    def batch():
        x = torch.randn(16, 20, 4)
        return x, x[:, -5:, :1].mean(1)

    report = train(tmp_path, Net(), batch, steps=60, lr=3e-3, opt="adam")
    assert report.healthy, loud(report)


def test_one_gradient_spike_without_harm_is_not_a_finding(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, run=tmp_path / "run") as w:
        for step in range(60):
            x = torch.randn(32, 8) * (300.0 if step == 30 else 1.0)  # one outlier batch
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert "exploding_gradient" not in kinds(gradwatch.diagnose(tmp_path / "run"))


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh])
def test_saturated_activations_are_found_where_they_are(tmp_path, act):
    layers = []
    for i in range(5):
        lin = nn.Linear(16 if i == 0 else 32, 32)
        nn.init.constant_(lin.bias, 8.0)  # every unit starts deep in the flat part
        layers += [lin, act()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    report = train(tmp_path, model, regression(), steps=40)
    found = kinds(report)
    assert "saturation" in found, loud(report)
    assert set(found["saturation"].layers) >= {"1", "3", "5", "7", "9"}


def test_the_report_is_json_ready(tmp_path):
    import json

    model = nn.Sequential(
        *[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 1)
    )
    report = train(tmp_path, model, lambda: (torch.randn(32, 16), torch.randn(32, 1)), steps=40)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["healthy"] is False
    finding = data["findings"][0]
    assert set(finding) >= {
        "kind",
        "severity",
        "layers",
        "first_step",
        "last_step",
        "evidence",
        "causes",
        "remedies",
    }
    assert {"id", "text", "code"} <= set(finding["remedies"][0])
    assert data["run"]["steps"] == 40


class ScaledExp(nn.Module):
    """exp(scale * x): moderate outputs until the scale jumps, then inf in every precision."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.scale * x)


@pytest.mark.parametrize(
    "dtype, cause",
    [
        (None, "float32_overflow"),
        (torch.bfloat16, "float32_overflow"),
        (torch.float16, "low_precision_overflow"),
    ],
)
def test_an_overflow_from_moderate_values_is_blamed_on_the_precision_the_run_used(
    tmp_path, dtype, cause
):
    torch.manual_seed(0)
    exp = ScaledExp()
    model = nn.Sequential(nn.Linear(8, 16), exp, nn.Linear(16, 1))
    with torch.no_grad():  # the scale the layer works at before the jump: far below any overflow
        assert torch.exp(model[0](torch.randn(1000, 8))).max() < 1e3
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, run=tmp_path / "run") as w:
        for step in range(20):
            exp.scale = 300.0 if step == 12 else 1.0  # exp(300 x) passes 3.4e38 from x = 0.3
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(torch.randn(32, 8)).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    finding = kinds(gradwatch.diagnose(tmp_path / "run"))["nonfinite"]
    assert finding.first_step == 12 and finding.layers == ["1"], finding
    assert finding.causes[0].id == cause, [c.text for c in finding.causes]
    expected = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert expected in finding.causes[0].text


def test_unsaturated_sigmoids_are_blamed_for_their_derivative_bound_not_for_saturating(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 1)
    )
    with torch.no_grad():  # plain torch: sigmoid' < 1% of its maximum on almost no unit
        h, saturated = torch.randn(256, 16), []
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.Sigmoid):
                saturated.append((4 * h * (1 - h) < 0.01).float().mean().item())
    assert max(saturated) < 0.01
    report = train(tmp_path, model, lambda: (torch.randn(32, 16), torch.randn(32, 1)), steps=40)
    cause = next(
        c for c in kinds(report)["vanishing_gradient"].causes if c.id == "saturating_activation"
    )
    assert "almost none of their units saturated" in cause.text and "0.25^12" in cause.text, (
        cause.text
    )


def test_a_finite_gradient_whose_norm_overflows_float32_is_told_apart_from_nan(tmp_path):
    """Entries of 1e18 are finite, but 64x64 of them square past 3.4e38: the norm reads inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    scales = [1e12] * 8 + [1e18] * 2
    with torch.no_grad():  # plain torch, float64 as the reference: finite entries, norm > 1.8e19
        grad = torch.ones(64, 1, dtype=torch.float64) * torch.full((1, 64), 1e18).double()
        assert torch.isfinite(grad.float()).all() and grad.norm() > 1.8e19
        assert torch.linalg.vector_norm(grad.float()) == float("inf")
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)  # the weights stay where they are
    with gradwatch.watch(model, opt, run=tmp_path / "run"):
        for scale in scales:
            loss = model(torch.full((1, 64), scale)).sum()  # d loss / d W = x, for every row
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(model[0].weight.grad).all()
            opt.step()
    finding = kinds(gradwatch.diagnose(tmp_path / "run"))["nonfinite"]
    assert finding.first_step == 8 and finding.layers == ["0"], finding
    cause = finding.causes[0]
    assert cause.id == "gradient_norm_overflow", [c.text for c in finding.causes]
    assert "1.8e+19" in cause.text and "inf, not NaN" in cause.text
    # the norm the step before: 64 x 64 entries of 1e12, 6.4e13
    assert cause.evidence["step_before"] == 7
    assert cause.evidence["grad_norm_before"] == pytest.approx(64 * 1e12, rel=1e-5)
    assert [r.id for r in finding.remedies][:1] == ["clip_grad_norm"]
