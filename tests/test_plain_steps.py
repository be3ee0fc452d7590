"""What a plain (not detailed) step records, and that it still finds every non-finite value.

Plain steps are the cheap ones: gradient norms, the loss, and the non-finite checks.
On the CPU the layer checks wait for the model's output and run only when it is
not finite; on an accelerator every layer queues its own sum. Both must name the
same module at the same step. Step numbers here are chosen off the default
schedule (the first 10, every 10th to 99, every 100th after).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.schedule import Schedule
from gradwatch.watch import GradwatchWarning

BAD_STEP = 23  # a plain step


class LogOf(nn.Module):
    def forward(self, x):
        return torch.log(x)


def train_until_log_of_zero(run_dir, steps=26, defer=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), LogOf(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = gradwatch.watch(model, opt, run=run_dir)
    if not defer:  # behave as on an accelerator: every layer sums as it goes
        watcher._defers_checks = lambda root, args: False
    with watcher as w:
        for step in range(steps):
            if step == BAD_STEP:
                with torch.no_grad():
                    model[0].bias.fill_(-1e4)  # sigmoid underflows to 0; log(0) = -inf
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return gradwatch.open_run(run_dir)


@pytest.mark.parametrize("defer", [True, False], ids=["cpu-deferred", "per-layer"])
def test_a_plain_step_names_the_first_nonfinite_module(tmp_path, defer):
    assert not Schedule()(BAD_STEP)
    run = train_until_log_of_zero(tmp_path, defer=defer)
    rows = {r["step"]: r for r in run.step_table()}
    assert [s for s, r in rows.items() if r["nonfinite"]][0] == BAD_STEP
    assert rows[BAD_STEP]["nonfinite_module"] == "2"
    col = run.layers.index("2")
    assert run.matrix("act_mean")[list(run.steps).index(BAD_STEP), col] == -math.inf


def test_deferred_checks_cost_no_sums_on_finite_plain_steps(tmp_path):
    run = train_until_log_of_zero(tmp_path, steps=BAD_STEP)
    act_mean = run.matrix("act_mean")
    detail = np.array([r["detail"] for r in run.step_table()], dtype=bool)
    assert np.isfinite(act_mean[detail]).all()
    assert np.isnan(act_mean[~detail]).all()  # nothing measured, nothing stored


def test_nonfinite_is_zero_where_measured_and_nan_where_not(tmp_path):
    run = train_until_log_of_zero(tmp_path)
    nonfinite = run.matrix("nonfinite")
    row = list(run.steps).index
    linear, sigmoid, log = (run.layers.index(n) for n in ("0", "1", "2"))
    assert nonfinite[row(BAD_STEP), log] == 1
    plain = row(21)
    assert nonfinite[plain, linear] == 0  # its gradient norm was measured, and finite
    assert math.isnan(nonfinite[plain, sigmoid])  # not measured on a plain step
    assert nonfinite[row(20), sigmoid] == 0  # a detailed step measures it


def forward_hooks_per_step(model, layer, run_dir, steps=30):
    """How many forward hooks model[layer] has when model[2] runs, on each step of a watched run."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    probe = model[2].register_forward_pre_hook(
        lambda m, a: seen.append(len(model[layer]._forward_hooks))
    )
    with gradwatch.watch(model, opt, run=run_dir):
        for _ in range(steps):
            loss = model(torch.randn(32, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe.remove()
    return seen


def test_finite_preserving_layers_are_hooked_on_detailed_steps_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    seen = forward_hooks_per_step(model, 1, tmp_path)
    assert seen == [1 if Schedule()(step) else 0 for step in range(30)]
    assert len(model[1]._forward_hooks) == 0
    run = gradwatch.open_run(tmp_path)
    zero_frac = run.matrix("zero_frac")[:, run.layers.index("1")]
    detail = np.array([r["detail"] for r in run.step_table()], dtype=bool)
    assert np.isfinite(zero_frac[detail]).all() and np.isnan(zero_frac[~detail]).all()


def test_parameter_rows_come_on_detailed_and_nonfinite_steps(tmp_path):
    run = train_until_log_of_zero(tmp_path)
    stored = (
        np.isfinite(run.param_matrix("grad_norm")).any(axis=1)
        | np.isnan(run.param_matrix("grad_norm")).all(axis=1) & False
    )
    rows = run.step_table()
    expected = np.array([bool(r["detail"] or r["nonfinite"]) for r in rows])
    with_rows = {s for (s,) in run._db.execute("SELECT DISTINCT step FROM param_metrics")}
    assert [r["step"] in with_rows for r in rows] == expected.tolist()
    assert stored[expected & ~np.array([bool(r["nonfinite"]) for r in rows])].all()


def test_gradients_are_read_before_the_optimizer_step(tmp_path):
    class ClearingSGD(torch.optim.SGD):
        """Some optimizers free the gradients inside step()."""

        def step(self, closure=None):
            loss = super().step(closure)
            self.zero_grad(set_to_none=True)
            return loss

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = ClearingSGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with gradwatch.watch(model, opt, run=tmp_path):
        loss = model(x).pow(2).mean()
        loss.backward()
        expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
        opt.step()
    got = gradwatch.open_run(tmp_path).matrix("grad_norm")[0, 0]
    assert math.isclose(got, expected, rel_tol=1e-6)


def test_a_model_of_complex_parameters_records_real_gradient_norms(tmp_path):
    """Plain steps hold their norms in one row; a complex weight's norm is real."""

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))

        def forward(self, x):
            return (x.to(torch.complex64) @ self.w).abs().sum(1)

    torch.manual_seed(0)
    model = Complex()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with gradwatch.watch(model, opt, run=tmp_path) as w:
        for _ in range(14):  # steps 10-13 are plain
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            expected.append(float(torch.linalg.vector_norm(model.w.grad.to(torch.complex128))))
            opt.step()
            w.log(loss=loss)
    got = gradwatch.open_run(tmp_path).matrix("grad_norm")[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_act_std_keeps_its_precision_when_the_mean_dwarfs_it(tmp_path):
    # float32 sigmoid outputs near 1 with a spread of ~2e-6: a float32 sum of squares
    # minus the squared mean would lose every digit of the variance (float32 resolves
    # 1e-7 of the mean square; the variance is 4e-12 of it). Sums kept in float64
    # leave an error near 1e-16 / 4e-12, so 1e-3 is a tolerance with room.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.mul_(1e-2)
        model[0].bias.fill_(8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(256, 4)
    with gradwatch.watch(model, opt, run=tmp_path):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        expected = float(torch.sigmoid(model[0](x)).double().std(correction=0))
    got = gradwatch.open_run(tmp_path).matrix("act_std")[0, 1]
    assert expected < 1e-5 and math.isclose(got, expected, rel_tol=1e-3)


def test_act_std_regains_its_precision_a_flush_after_a_layer_collapses(tmp_path):
    # Outputs that spread widely are summed plainly in float32, which a collapse to a
    # spread of 2e-6 about 1 would ruin; the first flush that sees it restores the shift.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(256, 4)
    expected = []
    with gradwatch.watch(model, opt, run=tmp_path, mode="full", flush_every=5):
        for step in range(20):
            if step == 10:
                with torch.no_grad():
                    model[0].weight.mul_(1e-2)
                    model[0].bias.fill_(8.0)
            with torch.no_grad():
                expected.append(float(torch.sigmoid(model[0](x)).double().std(correction=0)))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    got = gradwatch.open_run(tmp_path).matrix("act_std")[:, 1]
    assert expected[5] > 0.1 and math.isclose(got[5], expected[5], rel_tol=1e-4)
    assert expected[19] < 1e-5 and math.isclose(got[19], expected[19], rel_tol=1e-3)


def test_a_step_that_raised_does_not_stop_the_recording(tmp_path):
    class FlakySGD(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            FlakySGD.calls += 1
            if FlakySGD.calls == 2:
                raise RuntimeError("transient")
            return super().step(closure)

    model = nn.Linear(4, 1)
    opt = FlakySGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=tmp_path):
        for _ in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            with contextlib.suppress(RuntimeError):
                opt.step()
    assert len(gradwatch.open_run(tmp_path).steps) == 3


class NonFiniteWhenArmed(nn.Module):
    """-inf (log of zero) while armed, the identity otherwise."""

    armed = False

    def forward(self, x):
        return torch.log(x * 0) if self.armed else x


def train_arming_at_bad_step(model, opt, bad, steps=BAD_STEP + 1, batch=lambda: torch.randn(8, 4)):
    for step in range(steps):
        bad.armed = step == BAD_STEP
        loss = model(batch()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


class HalfOfThousands(nn.Module):
    def forward(self, x):
        return (x * 0 + 1000).half()  # finite, but 64 of them sum past float16's 65504


def test_a_half_precision_output_with_a_large_sum_passes_the_check(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), HalfOfThousands())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=tmp_path):
        for _ in range(15):
            loss = model(torch.randn(8, 4)).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = gradwatch.open_run(tmp_path)
    assert not any(r["nonfinite"] for r in run.step_table())
    detail = np.array([r["detail"] for r in run.step_table()], dtype=bool)
    assert np.isnan(run.matrix("act_mean")[~detail]).all()  # no replay on plain steps


def test_layers_are_not_hooked_on_plain_cpu_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    seen = forward_hooks_per_step(model, 0, tmp_path)
    assert seen == [1 if Schedule()(step) else 0 for step in range(30)]
    assert len(model[0]._forward_hooks) == 0


def test_the_replay_draws_the_same_dropout_masks(tmp_path):
    # The layer after dropout turns non-finite; the replay must measure the very
    # values the training forward computed, dropout mask and all.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 64), NonFiniteWhenArmed()
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sums = []  # layer 2's output, seen by a pre-hook of layer 3: the replay runs pre-hooks
    model[3].register_forward_pre_hook(
        lambda m, args: sums.append(float(args[0].detach().double().sum()))
    )
    with gradwatch.watch(model, opt, run=tmp_path):
        train_arming_at_bad_step(model, opt, model[3])
    assert len(sums) == BAD_STEP + 2  # every step, and the one replay
    run = gradwatch.open_run(tmp_path)
    rows = {r["step"]: r for r in run.step_table()}
    assert rows[BAD_STEP]["nonfinite_module"] == "3"
    got = run.matrix("act_mean")[list(run.steps).index(BAD_STEP), run.layers.index("2")] * 8 * 64
    assert math.isclose(got, sums[BAD_STEP], rel_tol=1e-6)
    assert sums[BAD_STEP + 1] == sums[BAD_STEP]


def test_the_replay_leaves_batchnorm_statistics_as_training_left_them(tmp_path):
    def train(watched: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), NonFiniteWhenArmed())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        context = gradwatch.watch(model, opt, run=tmp_path / str(watched)) if watched else None
        with context or contextlib.nullcontext():
            train_arming_at_bad_step(model, opt, model[2])
        return model[1]

    plain, watched = train(False), train(True)
    torch.testing.assert_close(watched.running_mean, plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(watched.running_var, plain.running_var, rtol=0, atol=0)
    assert int(watched.num_batches_tracked) == BAD_STEP + 1
    rows = gradwatch.open_run(tmp_path / "True").step_table()
    assert rows[BAD_STEP]["nonfinite_module"] == "2"


def test_a_forward_that_cannot_run_twice_warns_and_keeps_training(tmp_path):
    class Once(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bad = nn.Linear(4, 1), NonFiniteWhenArmed()

        def forward(self, batches):
            return self.bad(self.linear(next(batches)))  # consumes its input

    torch.manual_seed(0)
    model = Once()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    replay_fails = pytest.warns(GradwatchWarning, match="could not replay")
    with replay_fails, gradwatch.watch(model, opt, run=tmp_path):
        batch = lambda: iter([torch.randn(8, 4)])  # noqa: E731
        train_arming_at_bad_step(model, opt, model.bad, BAD_STEP + 3, batch)
    rows = gradwatch.open_run(tmp_path).step_table()
    assert len(rows) == BAD_STEP + 3 and rows[BAD_STEP]["nonfinite"] == 1


def test_stop_on_nonfinite_names_the_module_on_a_plain_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), NonFiniteWhenArmed(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stops = pytest.raises(gradwatch.NonFiniteError, match="'1'")
    with stops as caught, gradwatch.watch(model, opt, run=tmp_path, stop_on_nonfinite=True):
        train_arming_at_bad_step(model, opt, model[1])
    assert caught.value.step == BAD_STEP
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
