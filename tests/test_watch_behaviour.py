"""What counts as a step and a layer: tied weights, frozen parts, eval passes, optimizers, hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import sgd_step
from reference import Reference, compare
from torch import nn

import gradwatch
from gradwatch.watch import Watcher


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def sgd_steps(model, opt, w=None, steps=3, x=None):
    x = torch.randn(16, 8) if x is None else x
    for _ in range(steps):
        sgd_step(model, opt, x, w)


class Tied(nn.Module):
    """The same Linear is called twice, and a second module shares its weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(self.a(x))))


def test_tied_and_reused_parameters_are_counted_once(tmp_path):
    model = Tied()
    ref = Reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=tmp_path, mode="full"):
        for _ in range(2):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            ref.before_step()
            opt.step()
            ref.after_step()
    ref.close()
    run = gradwatch.open_run(tmp_path)
    assert run.params == ["a.weight", "a.bias", "b.bias"]
    assert (
        compare(run, ref, ["grad_norm", "error_norm", "act_mean", "act_std", "update_ratio"]) == []
    )


def test_frozen_parameters_are_skipped_not_zero(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradwatch.watch(model, opt, run=tmp_path) as w:
        sgd_steps(model, opt, w)
    run = gradwatch.open_run(tmp_path)
    grad = run.matrix("grad_norm")
    assert np.isnan(grad[:, run.layers.index("0")]).all()
    assert (grad[:, run.layers.index("2")] > 0).all()
    assert np.isnan(run.matrix("error_norm")[:, run.layers.index("0")]).all()


def test_unused_parameters_have_no_gradient_entry(tmp_path):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 1)
            self.unused = nn.Linear(8, 1)

        def forward(self, x):
            return self.used(x)

    model = WithUnused()
    opt = torch.optim.Adam(model.parameters())
    with gradwatch.watch(model, opt, run=tmp_path, mode="full") as w:
        sgd_steps(model, opt, w)
    run = gradwatch.open_run(tmp_path)
    j = run.layers.index("unused")
    assert np.isnan(run.matrix("grad_norm")[:, j]).all()
    assert np.isnan(run.matrix("update_ratio")[:, j]).all()


def test_eval_and_no_grad_passes_are_not_steps(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 8)
    with gradwatch.watch(model, opt, run=tmp_path, mode="full"):
        for _ in range(3):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model(100 * torch.randn(16, 8))
            model.eval()
            model(100 * torch.randn(16, 8))
            model.train()
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    # The activations are those of the training input only (x, not the 100x eval inputs).
    with torch.no_grad():
        expected = float(model[0](x).mean())  # weights after the last step, not exact: loose check
    assert abs(run.matrix("act_mean")[-1, 0] - expected) < 0.5


def test_two_optimizers_make_one_step_per_round(tmp_path):
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    disc = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    with gradwatch.watch({"G": gen, "D": disc}, [opt_d, opt_g], run=tmp_path):
        for _ in range(4):
            real, z = torch.randn(16, 8), torch.randn(16, 4)
            fake = gen(z)
            d_loss = bce(disc(real), torch.ones(16, 1)) + bce(
                disc(fake.detach()), torch.zeros(16, 1)
            )
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g_loss = bce(disc(fake), torch.ones(16, 1))
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.layers[:3] == ["G.0", "G.1", "G.2"]
    grad = run.matrix("grad_norm")
    assert np.isfinite(grad[:, run.layers.index("G.0")]).all()
    assert np.isfinite(grad[:, run.layers.index("D.0")]).all()


def test_manual_updates_without_an_optimizer(tmp_path):
    """Classic scripts: model.zero_grad(), backward, p.data.add_(p.grad, alpha=-lr)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    ref = Reference(model)
    x = torch.randn(32, 8)
    with gradwatch.watch(model, run=tmp_path, mode="full"):
        for _ in range(4):
            model.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            ref.before_step()
            with torch.no_grad():
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-0.1)
            ref.after_step()
    ref.close()
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert compare(run, ref, ["grad_norm", "error_norm", "act_std", "update_ratio"]) == []


def test_lbfgs_closure_is_one_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=5)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gradwatch.watch(model, opt, run=tmp_path):
        for _ in range(3):
            opt.step(closure)
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    assert np.isfinite(run.matrix("grad_norm")[:, 0]).all()


def test_rnn_outputs_are_tuples(tmp_path):
    for cls in (nn.RNN, nn.GRU, nn.LSTM):
        model = cls(3, 5, batch_first=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(model, opt, run=tmp_path / cls.__name__, mode="full"):
            for _ in range(2):
                out, _ = model(torch.randn(2, 7, 3))
                opt.zero_grad()
                out.pow(2).mean().backward()
                opt.step()
        run = gradwatch.open_run(tmp_path / cls.__name__)
        assert run.layers == ["(root)"]
        assert np.isfinite(run.matrix("error_norm")).all()
        assert "recurrent_radius" in run.metrics


def test_the_recurrent_radius_is_measured_only_at_flushes_after_a_detailed_step(tmp_path):
    torch.manual_seed(0)
    for mode, detail, expected in (("default", lambda step: step == 0, [0]), ("grads", None, [])):
        model = nn.LSTM(3, 5, batch_first=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run_dir = tmp_path / mode
        with gradwatch.watch(model, opt, run=run_dir, mode=mode, detail=detail, flush_every=2):
            for _ in range(6):
                out, _ = model(torch.randn(2, 7, 3))
                opt.zero_grad()
                out.pow(2).mean().backward()
                opt.step()
        run = gradwatch.open_run(run_dir)
        assert len(run.steps) == 6
        if not expected:
            assert "recurrent_radius" not in run.metrics
            continue
        radius = run.matrix("recurrent_radius")[:, 0]
        assert run.steps[np.isfinite(radius)].tolist() == expected and radius[0] > 0


def test_hooks_are_removed_even_when_the_body_raises(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"), gradwatch.watch(model, opt, run=tmp_path):
        sgd_steps(model, opt)
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    assert run.meta["status"] == "error: RuntimeError"


def test_stop_on_nonfinite_names_the_module(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.log(x - 10.0)

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Bad(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, opt, run=tmp_path, stop_on_nonfinite=True)
    with pytest.raises(gradwatch.NonFiniteError, match="'2'") as info, watcher:
        model(torch.randn(4, 4))
    assert info.value.module == "2" and info.value.step == 0
    assert hook_count(model) == 0


def test_first_nonfinite_module_is_localized(tmp_path):
    class LogOf(nn.Module):
        def forward(self, x):
            return torch.log(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), LogOf(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=tmp_path) as w:
        for step in range(5):
            x = torch.randn(8, 4)
            if step == 3:
                with torch.no_grad():
                    model[0].bias.fill_(-1e4)  # sigmoid underflows to 0, log(0) = -inf
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    rows = gradwatch.open_run(tmp_path).step_table()
    assert [r["nonfinite"] for r in rows[:4]] == [0, 0, 0, 1]
    assert rows[3]["nonfinite_module"] == "2"
    assert "0.weight" in rows[3]["nonfinite_params"] or "3.weight" in rows[3]["nonfinite_params"]


def test_loss_logged_before_or_after_the_step(tmp_path):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 3)
    losses = []
    with gradwatch.watch(model, opt, run=tmp_path) as w:
        for step in range(4):
            loss = model(x).pow(2).mean()
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            if step % 2:
                w.log(loss=loss)
                opt.step()
            else:
                opt.step()
                w.log(loss=float(loss))
    run = gradwatch.open_run(tmp_path)
    assert np.allclose(run.loss, losses, rtol=1e-6)


def test_every_stores_a_row_every_n_steps(tmp_path):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=tmp_path, every=3) as w:
        sgd_steps(model, opt, w, steps=7, x=torch.randn(4, 3))
    assert gradwatch.open_run(tmp_path).steps.tolist() == [0, 3, 6]


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gradwatch.watch(["not a model"], run=tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        gradwatch.watch(nn.Linear(2, 2), mode="everything", run=tmp_path)
    with pytest.raises(TypeError, match="Optimizer"):
        gradwatch.watch(nn.Linear(2, 2), ["sgd"], run=tmp_path)
    with pytest.raises(gradwatch.RunStoreError, match="no gradwatch run store"):
        gradwatch.open_run(tmp_path / "missing")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(gradwatch.RunStoreError):
        gradwatch.open_run(tmp_path / "junk.sqlite")


def test_the_store_is_plain_sqlite(tmp_path):
    import sqlite3

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=tmp_path) as w:
        sgd_steps(model, opt, w, x=torch.randn(4, 3))
    db = sqlite3.connect(tmp_path / "run.sqlite")
    assert db.execute("SELECT COUNT(*) FROM steps").fetchone() == (3,)
    names = [r[0] for r in db.execute("SELECT name FROM layers ORDER BY exec_order")]
    assert names == ["0", "1", "2"]
    value = db.execute(
        "SELECT value FROM layer_metrics WHERE metric='grad_norm' AND step=2 AND layer_id=0"
    ).fetchone()[0]
    assert math.isfinite(value) and value > 0


class Block(nn.Module):
    """Returns its last child's output tensor itself, as a TransformerEncoderLayer does."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=inplace)  # in place, it returns its input, changed
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.act(self.lin(x)))


def train_blocks(model, run_dir, ref=None, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=run_dir, mode="full"):
        for _ in range(steps):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if ref is not None:
                ref.before_step()
            opt.step()
            if ref is not None:
                ref.after_step()
    return gradwatch.open_run(run_dir)


def test_a_block_returning_its_childs_output_is_measured_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Tanh(), Block(), nn.Linear(8, 1))
    measured = []
    record = Watcher._record_output
    monkeypatch.setattr(
        Watcher, "_record_output", lambda w, i, *a, **k: measured.append(i) or record(w, i, *a, **k)
    )
    ref = Reference(model)
    run = train_blocks(model, tmp_path, ref, steps=3)
    ref.close()
    assert compare(run, ref, ["error_norm", "act_mean", "act_std"]) == []
    mean, error = run.matrix("act_mean"), run.matrix("error_norm")
    col = run.layers.index
    for block in ("0", "2"):
        for metric in (mean, error):
            np.testing.assert_array_equal(metric[:, col(block)], metric[:, col(f"{block}.out")])
    blocks = {layer.id for layer in run.layer_info if layer.name in ("0", "2")}
    assert len(run.layer_info) == 10 and len(blocks) == 2
    assert not blocks & set(measured) and len(measured) == 3 * 8  # per step, 8 outputs of 10


def test_an_output_changed_in_place_is_measured_anew(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Block(inplace=True), nn.Linear(8, 1))
    seen = {"0.lin": [], "0.act": []}
    for name in seen:  # registered first, so they run before gradwatch's hooks
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen[name].append(out.detach().double().mean().item())
        )
    ref = Reference(model)  # copies each output in its hook, before the ReLU changes it
    run = train_blocks(model, tmp_path, ref)
    ref.close()
    # The error of 0.lin is the gradient of its own output, before the ReLU zeroed part of it.
    assert compare(run, ref, ["error_norm", "act_mean", "act_std"]) == []
    mean, error = run.matrix("act_mean"), run.matrix("error_norm")
    for name, expected in seen.items():
        np.testing.assert_allclose(mean[:, run.layers.index(name)], expected, rtol=1e-5)
    assert seen["0.lin"] != seen["0.act"]
    assert not np.allclose(error[:, run.layers.index("0.lin")], error[:, run.layers.index("0.act")])
