"""Every metric the watcher stores, against plain autograd (tests/reference.py), to 1e-5 relative."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from reference import Reference, compare
from torch import nn

import gradwatch

METRICS = [
    "grad_norm",
    "grad_zero_frac",
    "error_norm",
    "error_rms",
    "act_mean",
    "act_std",
    "saturated_frac",
    "act_derivative",
    "zero_frac",
    "update_ratio",
]
RTOL = 1e-5


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 3),
    )  # fmt: skip
    return model, torch.randn(64, 12), torch.randint(0, 3, (64,))


def cnn_bn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )  # fmt: skip
    return model, torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm():
    return LSTMHead(), torch.randn(8, 10, 4), torch.randint(0, 3, (8,))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def transformer():
    return Encoder(), torch.randn(8, 6, 16), torch.randint(0, 3, (8,))


def wide():
    """A weight large enough for BLAS's dot (probes.grads.BLAS_MIN_NUMEL) beside small ones."""
    model = nn.Sequential(
        nn.Linear(12, 256), nn.ReLU(), nn.Linear(256, 160), nn.Tanh(), nn.Linear(160, 3)
    )
    return model, torch.randn(64, 12), torch.randint(0, 3, (64,))


ARCHS = {"mlp": mlp, "cnn_bn": cnn_bn, "lstm": lstm, "transformer": transformer, "wide": wide}
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


def train(
    tmp_path, arch, make_opt, steps=4, accumulate=1, scaler=None, mode="full", **watch_kwargs
):
    torch.manual_seed(0)
    model, x, y = ARCHS[arch]()
    ref = Reference(model)
    opt = make_opt(model.parameters())
    with gradwatch.watch(
        model, opt, run=tmp_path / "run", mode=mode, scaler=scaler, **watch_kwargs
    ) as w:
        for _ in range(steps):
            opt.zero_grad()
            for micro in range(accumulate):
                half = slice(micro * len(x) // accumulate, (micro + 1) * len(x) // accumulate)
                loss = nn.functional.cross_entropy(model(x[half]), y[half]) / accumulate
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            ref.before_step(scale=scaler.get_scale() if scaler else 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            ref.after_step()
    ref.close()
    return gradwatch.open_run(w.run_dir), ref


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_metrics_match_plain_autograd(tmp_path, arch, optimizer):
    run, ref = train(tmp_path, arch, OPTIMIZERS[optimizer])
    assert len(run.steps) == 4
    assert compare(run, ref, METRICS, RTOL) == []
    assert (
        run.matrix("nonfinite")[~torch.isnan(torch.tensor(run.matrix("nonfinite"))).numpy()] == 0
    ).all()


@pytest.mark.parametrize("mode", ["default", "grads"])
@pytest.mark.parametrize("arch", ["wide", "lstm"])
def test_plain_steps_match_plain_autograd(tmp_path, arch, mode):
    """Steps 10-19 of the default schedule are plain: their gradient norms share one row."""
    run, ref = train(tmp_path, arch, OPTIMIZERS["adam"], steps=20, mode=mode)
    assert compare(run, ref, ["grad_norm"], RTOL) == []
    rows = {r["step"]: r["detail"] for r in run.step_table()}
    assert sum(1 for s in range(20) if not rows[s]) == (9 if mode == "default" else 20)


def test_frozen_parameters_the_optimizer_holds_are_skipped_on_plain_steps(tmp_path):
    """The row of norms holds the parameters with a gradient, each under its own key."""

    def wide_half_frozen():
        model, x, y = wide()
        model[2].weight.requires_grad_(False)  # the large one: its group loses a member
        model[0].bias.requires_grad_(False)
        return model, x, y

    ARCHS["wide_half_frozen"] = wide_half_frozen
    try:
        run, ref = train(tmp_path, "wide_half_frozen", OPTIMIZERS["adam"], steps=14, mode="grads")
    finally:
        del ARCHS["wide_half_frozen"]
    assert compare(run, ref, ["grad_norm"], RTOL) == []
    assert not math.isnan(run.matrix("grad_norm")[-1, run.layers.index("2")])  # its bias


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn"])
def test_gradient_accumulation_counts_one_step_per_optimizer_step(tmp_path, arch):
    run, ref = train(tmp_path, arch, OPTIMIZERS["adam"], steps=3, accumulate=2)
    assert run.steps.tolist() == [0, 1, 2]
    assert compare(run, ref, METRICS, RTOL) == []


def test_grad_scaler_norms_are_unscaled(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run, ref = train(tmp_path, "mlp", OPTIMIZERS["adam"], steps=3, scaler=scaler)
    assert compare(run, ref, METRICS, RTOL) == []
    # The scale itself is large: a scaled error norm would be off by 2**10.
    assert ref.rows[0][("0", "error_norm")] < 10


def test_grad_scaler_found_without_being_passed(tmp_path):
    """The GradScaler is found in the optimizer's state when it steps, and its scale removed."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(0)
    model, x, y = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model)
    with gradwatch.watch(model, opt, run=tmp_path / "run", mode="full") as w:
        w.add_scaler(scaler)
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        ref.before_step(scale=scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        ref.after_step()
    ref.close()
    assert compare(gradwatch.open_run(w.run_dir), ref, ["error_norm", "grad_norm"], RTOL) == []


def test_dead_units_over_a_flush_window(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].bias[:20] = -100.0  # 20 units can never fire
    ref = Reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=tmp_path / "run", mode="full", flush_every=100) as w:
        for step in range(5):
            loss = model(torch.randn(32, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            ref.before_step()
            opt.step()
            ref.after_step()
            if step == 0:  # the watcher flushes after the first step, closing a window
                ref.window_max.clear()
    ref.close()
    run = gradwatch.open_run(w.run_dir)
    dead = run.matrix("dead_frac")[:, run.layers.index("1")]
    assert math.isclose(dead[-1], ref.dead_fractions()["1"], rel_tol=RTOL)
    assert dead[-1] >= 20 / 64


def saturating():
    """Sigmoid and tanh layers with units saturated on both sides of their band."""
    model = nn.Sequential(
        nn.Linear(12, 300), nn.Sigmoid(), nn.Linear(300, 64), nn.Tanh(), nn.Linear(64, 3)
    )  # fmt: skip
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # pre-activations of about +-20: most past |x| > 6
        model[2].weight.mul_(40.0)
    return model, torch.randn(64, 12), torch.randint(0, 3, (64,))


def test_saturation_counts_both_tails_of_sigmoid_and_tanh(tmp_path):
    ARCHS["saturating"] = saturating
    try:
        run, ref = train(tmp_path, "saturating", OPTIMIZERS["sgd_momentum"])
    finally:
        del ARCHS["saturating"]
    others = [m for m in METRICS if m != "act_derivative"]
    assert compare(run, ref, others, RTOL) == []
    # The mean derivative, 4(sum y - sum y^2) / n for a sigmoid, cancels by the factor
    # mean(y) / mean(y - y^2), about 30 here: float32 sums' 1e-6 become some 3e-5.
    assert compare(run, ref, ["act_derivative"], 1e-4) == []
    for layer in ("1", "3"):
        frac = run.matrix("saturated_frac")[0, run.layers.index(layer)]
        assert 0.5 < frac < 1.0, (layer, frac)


def test_bf16_autocast_statistics_follow_the_low_precision_outputs(tmp_path):
    torch.manual_seed(0)
    model, x, y = mlp()
    ref = Reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, run=tmp_path / "run", mode="full") as w:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            ref.before_step()
            opt.step()
            ref.after_step()
    ref.close()
    assert compare(gradwatch.open_run(w.run_dir), ref, METRICS, RTOL) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonzero_count_agrees_with_torch_on_signed_zeros_nan_and_strides(dtype):
    from gradwatch.probes.grads import nonzero_count

    torch.manual_seed(0)
    x = torch.randn(512, 96).relu().to(dtype)  # large enough for the bit count
    x[::5] = -0.0  # -0.0 has a nonzero bit pattern, yet is zero
    x[1, 1], x[2, 2] = float("nan"), float("-inf")
    scratch: dict = {}  # reused across calls, by shapes smaller and larger than before
    for t in (x[:, ::4], x, x[:200], x[:300].t(), -x[:400], x[:, ::2], torch.cat([x, x])):
        assert int(nonzero_count(t)) == int(torch.count_nonzero(t))
        assert int(nonzero_count(t, scratch)) == int(torch.count_nonzero(t))
    assert list(scratch) == [(dtype, threading.get_ident())]
