"""Training patterns users bring that a watcher must not disturb: copies, checkpoints, parametrizations."""

from __future__ import annotations

import copy
import io
import threading
import warnings

import numpy as np
import pytest
import torch
from harness import sgd_step
from torch import nn

import gradwatch
from gradwatch.hooks import InertHook


def assert_trains_the_same_watched(train, run) -> None:
    """Bit for bit: ``train()`` and ``train(run)`` (watched into ``run``) end at the same weights."""
    plain, watched = train(), train(run)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_copies_of_a_watched_model_work_and_are_not_watched(tmp_path):
    """An EMA copy, a best-model snapshot and torch.save(model) inside the block used to raise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    with gradwatch.watch(model, opt, run=tmp_path / "run", detail=1) as w:
        sgd_step(model, opt, x, w)
        twin = copy.deepcopy(model)
        reference = copy.deepcopy(model)  # the model before step 1, left alone
        ema = torch.optim.swa_utils.AveragedModel(model)
        opt_copy = copy.deepcopy(opt)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (twin, loaded):
            hooks = [h for m in other.modules() for h in m._forward_hooks.values()]
            hooks += [h for m in other.modules() for h in m._forward_pre_hooks.values()]
            assert hooks and all(isinstance(h, InertHook) for h in hooks)
        # The copies train in train mode with autograd on, and leave the record alone.
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        for _ in range(2):
            sgd_step(twin, twin_opt, x)
            ema(x).sum().backward()
            opt_copy.step()
        sgd_step(model, opt, x, w)
    run = gradwatch.open_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1]
    reference(x).pow(2).mean().backward()
    expected = [
        torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item()
        for layer in (reference[0], reference[2])
    ]
    recorded = run.matrix("grad_norm")[1]
    np.testing.assert_allclose(recorded[[0, 2]], expected, rtol=1e-5)


def _train_spectral(run=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(8, 4) for _ in range(3)]
    if run is None:
        for x in xs:
            sgd_step(model, opt, x)
        return model
    with gradwatch.watch(model, opt, run=run, detail=1) as w:
        for x in xs:
            sgd_step(model, opt, x, w)
    return model


def test_spectral_norm_trains_the_same_watched(tmp_path):
    """Reading a parametrized weight runs spectral_norm's power iteration (in train mode)."""
    assert_trains_the_same_watched(_train_spectral, tmp_path / "run")


def test_parametrizations_are_part_of_their_layer(tmp_path):
    """weight_norm's modules compute the weight: not layers, and their originals are the layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6)
    reference = copy.deepcopy(model)
    with gradwatch.watch(model, opt, run=tmp_path / "run") as w:
        sgd_step(model, opt, x, w)
    run = gradwatch.open_run(tmp_path / "run")
    assert run.layers == ["0", "1", "2"]
    reference(x).pow(2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in reference[0].parameters()])  # g, v and the bias
    assert grads.numel() == 8 + 6 * 8 + 8
    np.testing.assert_allclose(run.matrix("grad_norm")[0, 0], grads.norm().item(), rtol=1e-5)
    assert {info.fan_in for info in run.layer_info if info.name == "0"} == {6}


class FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises when ``fail`` is set (an out-of-memory, say)."""

    fail = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailingBackward.fail:
            raise RuntimeError("out of memory (simulated)")
        return grad


def test_a_failed_backward_without_an_optimizer_does_not_stop_the_record(tmp_path):
    """Each backward pass is a step when updates are hand-written; one that raised used to end them."""
    torch.manual_seed(0)

    class Fails(nn.Module):  # inside the model: the pass fails after its output's hook ran
        def forward(self, x):
            return FailingBackward.apply(x)

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Fails(), nn.Linear(16, 2))
    skipped = 0
    with gradwatch.watch(model, run=tmp_path / "run"):
        for i in range(8):
            FailingBackward.fail = i == 3
            loss = model(torch.randn(16, 8)).pow(2).mean()
            model.zero_grad()
            try:
                loss.backward()
            except RuntimeError:
                skipped += 1
                continue
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    assert skipped == 1
    assert gradwatch.open_run(tmp_path / "run").steps.tolist() == list(range(7))


class Checkpointed(nn.Module):
    def __init__(self, checkpoint: bool):
        super().__init__()
        self.checkpoint = checkpoint
        self.a, self.act, self.b, self.c = (
            nn.Linear(8, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.Linear(16, 2),
        )

    def block(self, x):
        return self.b(self.act(self.a(x)))

    def forward(self, x):
        if self.checkpoint:
            x = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.c(x)


def test_activation_checkpointing_records_what_a_plain_forward_does(tmp_path):
    """The recomputation inside backward is not a second call of each layer."""
    runs = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = Checkpointed(checkpoint)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(model, opt, run=tmp_path / str(checkpoint), detail=1) as w:
            for _ in range(3):
                sgd_step(model, opt, torch.randn(32, 8), w)
        runs[checkpoint] = gradwatch.open_run(tmp_path / str(checkpoint))
    assert runs[True].layers == runs[False].layers
    for metric in ("error_rms", "act_mean", "act_std", "saturated_frac", "grad_norm"):
        np.testing.assert_allclose(
            runs[True].matrix(metric), runs[False].matrix(metric), rtol=1e-6, err_msg=metric
        )


def test_a_loss_logged_after_a_mid_run_diagnosis_reaches_its_step(tmp_path):
    """diagnose() or flush() between opt.step() and log() used to write the step without its loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []  # the ReLU's outputs, by step: the reference for its dead units
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.detach().amax(0)))
    losses = []
    with gradwatch.watch(model, opt, run=tmp_path / "run", detail=1) as w:
        for step in range(6):
            loss = sgd_step(model, opt, torch.randn(4, 8))
            if step == 2:
                w.diagnose()
            if step == 4:
                w.flush()
            w.log(loss=loss)
            losses.append(loss.item())
    run = gradwatch.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.loss, losses, rtol=1e-6)
    # The steps held back for their loss keep their part of the dead-unit window: the
    # last window spans steps 1 to 5, not only those after the last flush.
    dead = run.matrix("dead_frac")[:, 1]
    window = torch.stack(seen[1:]).amax(0)
    assert dead[-1] == pytest.approx((window == 0).float().mean().item())
    assert dead[-1] < (seen[-1] == 0).float().mean().item()


class MaskedPolicy(nn.Module):
    """Logits of invalid actions set to -inf: a non-finite output the loss handles."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        valid = torch.tensor([True, True, True, False])
        return self.head(self.body(x)).masked_fill(~valid, float("-inf"))


def _train_masked(run=None):
    torch.manual_seed(0)
    model = MaskedPolicy()
    features = {}
    model.body.register_forward_hook(lambda m, args, out: features.__setitem__("h", out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, opt, run=run) if run is not None else None
    for _ in range(12):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(model(x), y) + 0.1 * features["h"].pow(2).mean()
        assert features["h"].requires_grad
        opt.zero_grad()
        loss.backward()
        opt.step()
    if watcher is not None:
        watcher.close()
    return model


def test_the_replay_of_a_non_finite_forward_leaves_the_users_forward_hooks_alone(tmp_path):
    """A feature kept by a forward hook for an auxiliary loss was replaced by the replay's copy."""
    assert_trains_the_same_watched(_train_masked, tmp_path / "run")


def test_iterations_a_grad_scaler_skips_are_not_steps(tmp_path):
    """fp16 AMP: a scaler skips the step while it calibrates; those overflows are not the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=4)
    kept_losses, skipped = [], 0
    with gradwatch.watch(model, opt, run=tmp_path / "run", scaler=scaler, detail=1) as w:
        for _ in range(20):
            x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            w.log(loss=loss)
            if scaler.get_scale() < before:  # the scaler backs off exactly when it skipped
                skipped += 1
            else:
                kept_losses.append(loss.item())
            copy.deepcopy(scaler)
    assert skipped >= 3
    assert w.scaler_skips == skipped
    assert "step" not in scaler.__dict__
    run = gradwatch.open_run(tmp_path / "run")
    assert len(run.steps) == 20 - skipped
    np.testing.assert_allclose(run.loss, kept_losses, rtol=1e-6)
    assert not any(row["nonfinite"] for row in run.step_table())
    assert run.meta["scaler_skips"] == str(skipped)
    assert gradwatch.diagnose(tmp_path / "run").healthy


def test_a_gradient_penalty_pass_is_not_part_of_the_error(tmp_path):
    """autograd.grad through a layer's output (WGAN-GP, R1) runs its tensor hooks too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    true_errors = []
    with gradwatch.watch(model, opt, run=tmp_path / "run", detail=1) as w:
        for _ in range(3):
            x = torch.randn(16, 8, requires_grad=True)
            out = model(x)
            (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            seen = []  # hooked after the penalty's pass: the loss's error alone
            out.register_hook(lambda g, seen=seen: seen.append(g.norm().item()))
            loss = out.mean() + 10 * (gx.norm(dim=1) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
            true_errors.append(seen[0])
    run = gradwatch.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.matrix("error_norm")[:, 2], true_errors, rtol=1e-5)


def test_errors_of_a_frozen_model_are_kept(tmp_path):
    """With no parameter to accumulate into (an adversarial input), every pass's error counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    true_errors = []
    with gradwatch.watch(model, opt, run=tmp_path / "run", detail=1):
        for _ in range(3):
            out = model(x)
            out.register_hook(lambda g: true_errors.append(g.norm().item()))
            opt.zero_grad()
            out.pow(2).sum().backward()
            opt.step()
    run = gradwatch.open_run(tmp_path / "run")
    np.testing.assert_allclose(run.matrix("error_norm")[:, 2], true_errors, rtol=1e-5)


def test_a_masked_output_is_replayed_once_then_checked_layer_by_layer(tmp_path):
    """An output with -inf fails the check every step; replaying every forward doubled its cost."""
    torch.manual_seed(0)
    model = MaskedPolicy()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))  # the replay runs it too
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run=tmp_path / "run") as w:
        for _ in range(30):
            loss = nn.functional.cross_entropy(
                model(torch.randn(16, 8)), torch.randint(0, 3, (16,))
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert len(calls) <= 31
    rows = gradwatch.open_run(tmp_path / "run").step_table()
    assert [r["nonfinite_module"] for r in rows] == ["(root)"] * 30


def _amp_iterations(model, opt, scaler, n, watchers=()):
    skipped = 0
    for _ in range(n):
        x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        for w in watchers:
            w.log(loss=loss)
        skipped += scaler.get_scale() < before
    return skipped


def test_two_watchers_of_one_scaler_both_see_its_skips(tmp_path):
    """A script's own watcher under `gradwatch run`: the second wrapper chained onto the first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=4)
    outer = gradwatch.watch(model, opt, run=tmp_path / "outer", scaler=scaler)
    with gradwatch.watch(model, opt, run=tmp_path / "inner", scaler=scaler) as inner:
        skipped = _amp_iterations(model, opt, scaler, 12, [outer, inner])
    assert skipped >= 2 and inner.scaler_skips == outer.scaler_skips == skipped
    assert "step" in scaler.__dict__  # the outer watcher still wraps it
    more = _amp_iterations(model, opt, scaler, 8, [outer])
    outer.close()
    assert outer.scaler_skips == skipped + more
    assert "step" not in scaler.__dict__


def test_skips_before_the_optimizer_is_known_are_not_steps(tmp_path):
    """`gradwatch run` adopts an optimizer at its first step; skipped iterations come before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    with gradwatch.watch(model, run=tmp_path / "run", scaler=scaler) as w:
        skipped = _amp_iterations(model, opt, scaler, 3, [w])
        w.add_optimizer(opt)
        skipped += _amp_iterations(model, opt, scaler, 9, [w])
    assert skipped >= 3 and w.scaler_skips == skipped
    run = gradwatch.open_run(tmp_path / "run")
    assert len(run.steps) == 12 - skipped
    assert not any(row["nonfinite"] for row in run.step_table())


def test_a_model_trained_in_another_thread_keeps_every_step_and_its_layers(tmp_path):
    """The store's connection belonged to the watching thread; the first flush from the
    training thread failed, losing step 0 and the layer table."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, opt, run=tmp_path, flush_every=2)

    def train():
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            watcher.log(loss=loss)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed flush warns
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
        watcher.close()
    run = gradwatch.open_run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2, 3, 4]
    assert run.layers == ["0", "1", "2"]


def test_a_storing_period_past_int64_is_refused_at_once(tmp_path):
    """every=2**63 overflowed at each flush, which warned and stored no step at all."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every must be between 1 and 2\\*\\*62"):
        gradwatch.watch(model, opt, run=tmp_path, every=2**63)
    assert not model._forward_hooks and not model._forward_pre_hooks
