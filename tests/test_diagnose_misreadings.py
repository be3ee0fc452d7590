"""Misreadings: a true measurement given the wrong cause, or a harmless state read as harm.

Each model is built so that the truth is known by construction (a layer that no error
reaches, weights rewritten many times over in the first steps, an error that underflows
float32, a confident output, a mislabelled sample), checked with plain torch where it
matters, and the diagnosis has to name that truth and not the tempting neighbour.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from harness import train_and_diagnose
from torch import nn

import gradwatch


def kinds(report):
    return {f.kind: f for f in report.findings}


def loud(report):
    return [(f.kind, f.layers[:4], f.summary) for f in report.findings if f.severity != "info"]


def cause_ids(report):
    return {c.id for f in report.findings for c in f.causes}


def regression(n_in):
    teacher = nn.Linear(n_in, 1)

    def batch(step):
        x = torch.randn(64, n_in)
        with torch.no_grad():
            return x, torch.tanh(teacher(x))

    return batch


def test_layers_that_no_error_reaches_are_not_blamed_on_the_learning_rate(tmp_path):
    """Units after layer 2 are dead (bias -50): layers 0 and 2 get exactly zero gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    nn.init.constant_(model[2].bias, -50.0)
    batch = regression(8)
    x, y = batch(0)  # plain autograd: exactly zero, not small
    nn.functional.mse_loss(model(x), y).backward()
    assert model[0].weight.grad.abs().max() == 0 and model[2].weight.grad.abs().max() == 0
    assert model[4].bias.grad.abs().max() > 0
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 40)
    assert "learning_rate_too_low" not in cause_ids(report), loud(report)
    no_grad = [f for f in report.of_kind("update_ratio") if f.causes[0].id == "no_gradient"]
    assert len(no_grad) == 1 and no_grad[0].layers == ["0", "2"], loud(report)
    assert "exactly zero" in no_grad[0].summary
    assert not [r for r in no_grad[0].remedies if r.id in ("lower_lr", "he_init")]
    # A cliff at one layer, not a gain that compounds: no vanishing finding.
    assert "vanishing_gradient" not in kinds(report), loud(report)


def test_weights_rewritten_in_the_first_steps_are_too_fast_even_once_the_layers_died(tmp_path):
    """lr 100 for five steps: each update is many times the weights, and the ReLUs die."""
    torch.manual_seed(0)
    teacher = torch.randn(8, 4)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )

    def batch(step):
        x = torch.randn(64, 8)
        return x, (x @ teacher).argmax(1)

    with torch.random.fork_rng():  # plain autograd: one step at lr 100 moves more than the weight
        probe = copy.deepcopy(model)
        x, y = batch(0)
        nn.functional.cross_entropy(probe(x), y).backward()
        for layer in (probe[0], probe[2]):
            assert 100 * layer.weight.grad.norm() > layer.weight.norm()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 2000.0 if s < 5 else 1.0)
    report = train_and_diagnose(
        tmp_path, model, opt, batch, nn.functional.cross_entropy, 80, schedule
    )
    with torch.no_grad():  # plain torch: the hidden units are (nearly all) dead afterwards
        assert (model[:4](torch.randn(1000, 8)) > 0).any(0).float().mean() < 0.2
    fast = [f for f in report.of_kind("update_ratio") if f.causes[0].id == "learning_rate_too_high"]
    assert fast and {"0", "2"} <= set(fast[0].layers), loud(report)
    assert fast[0].causes[0].evidence["median_update_ratio"] > 1
    assert "learning_rate_too_low" not in cause_ids(report), loud(report)


def test_a_loss_that_blows_up_in_the_first_steps_and_ends_where_it_began_has_not_come_down(
    tmp_path,
):
    """Random labels: nothing beats chance (ln 4). lr x20 for four steps blows the loss up,
    weight decay brings it back to chance; the median of the first five losses is the blow-up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 20.0 if s < 4 else 1.0)
    losses = []

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        losses.append(loss.item())
        return loss

    def batch(step):
        return torch.randn(64, 8), torch.randint(0, 4, (64,))

    report = train_and_diagnose(tmp_path, model, opt, batch, loss_fn, 60, schedule)
    assert sorted(losses[:5])[2] > 10 * losses[0]  # the median of the first five: blown up
    assert abs(losses[0] - math.log(4)) < 0.2 and abs(losses[-1] - math.log(4)) < 0.2
    assert "loss_plateau" in kinds(report), loud(report)
    assert kinds(report)["loss_plateau"].evidence["loss_start"] == losses[0]


def test_layers_whose_error_underflowed_to_zero_are_named_in_a_vanishing_finding(tmp_path):
    """30 tanh layers at 0.1/sqrt(fan_in): the error shrinks ~10x per layer until float32 gives 0."""
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, 0.0, 0.1 / 4)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 2))
    teacher = torch.randn(16)

    def batch(step):
        x = torch.randn(64, 16)
        return x, (x @ teacher > 0).long()

    def error_rms(dtype):  # plain autograd: the error at each Linear's output
        net = copy.deepcopy(model).to(dtype)
        x, y = batch(0)
        outs, h = [], x.to(dtype)
        for m in net:
            h = m(h)
            if isinstance(m, nn.Linear):
                h.retain_grad()
                outs.append(h)
        nn.functional.cross_entropy(h, y).backward()
        return [o.grad.pow(2).mean().sqrt().item() for o in outs]

    float64, float32 = error_rms(torch.float64), error_rms(torch.float32)
    assert min(float64) > 0 and float32[0] == 0 and float32[-1] > 0  # underflow, not a true zero
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 30)
    finding = kinds(report).get("vanishing_gradient")
    assert finding is not None, loud(report)
    ev = finding.evidence
    assert ev["layers_in_profile"] == 31
    assert ev["layers_error_underflowed"][0] == "0"
    assert finding.layers[: len(ev["layers_error_underflowed"])] == ev["layers_error_underflowed"]
    assert "31 layers" in finding.summary and "underflowed to exactly zero" in finding.summary


def test_a_confident_sigmoid_output_under_bce_is_not_saturation(tmp_path):
    """Separable data with a margin of 2: the output sigmoid saturates because the model is right."""
    torch.manual_seed(1)
    w = nn.functional.normalize(torch.randn(6), dim=0)

    def batch(step):
        x = torch.randn(64, 6)
        m = x @ w
        return x + 2.0 * torch.sign(m)[:, None] * w, (m > 0).float()[:, None]

    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    report = train_and_diagnose(
        tmp_path, model, opt, batch, nn.functional.binary_cross_entropy, 500
    )
    x, y = batch(0)  # plain autograd: BCE's gradient at the logit is p - y, nothing lost
    logit = model[:3](x).detach().requires_grad_()
    p = torch.sigmoid(logit)
    nn.functional.binary_cross_entropy(p, y, reduction="sum").backward()
    assert torch.allclose(logit.grad, p.detach() - y, atol=1e-5)
    assert ((p * (1 - p)) < 0.01 * 0.25).float().mean() > 0.9  # nearly every output saturated
    assert report.healthy, loud(report)


def test_a_saturated_sigmoid_output_that_stalls_the_loss_is_still_saturation(tmp_path):
    """Output bias 30: sigmoid is exactly 1 in float32, its derivative 0, and MSE cannot move it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    nn.init.constant_(model[2].bias, 30.0)

    def batch(step):
        x = torch.randn(64, 6)
        return x, (x[:, :1] > 0).float()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 40)
    found = kinds(report)
    assert "loss_plateau" in found and "saturation" in found, loud(report)
    assert found["saturation"].layers == ["3"]


def test_gradient_spikes_from_mislabelled_samples_are_not_exploding_gradients(tmp_path):
    """A clear margin, and one flipped label every 40 steps: each spike is that batch's loss."""
    torch.manual_seed(2)
    w = nn.functional.normalize(torch.randn(6), dim=0)
    flips = set(range(150, 400, 40))

    def batch(step):
        x = torch.randn(32, 6)
        m = x @ w
        y = (m > 0).long()
        if step in flips:
            y[0] = 1 - y[0]
        return x + torch.sign(m)[:, None] * w, y

    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 400)
    from gradwatch.diagnose import exploding
    from gradwatch.diagnose.profile import RunView
    from gradwatch.store import open_run

    with open_run(tmp_path / "run") as stored:  # the spikes are there, each at a flipped label
        view = RunView(stored)
        found = exploding.spikes(view)
        at = {int(view.steps[r]) for hits in found.values() for r, _ in hits}
        assert max(len(h) for h in found.values()) >= 3 and at <= flips, at
    assert "exploding_gradient" not in kinds(report), loud(report)


def test_exploding_over_depth_reports_its_orders_of_magnitude_as_the_summary_does(tmp_path):
    """W = 2 I over 12 layers: the error doubles per layer towards the input, 2^11 in all."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(12)])
    for layer in model:
        nn.init.eye_(layer.weight)
        layer.weight.data.mul_(2.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)  # the weights stay where they are

    def batch(step):
        return torch.randn(32, 16), torch.randn(32, 16)

    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 20)
    finding = kinds(report)["exploding_gradient"]
    orders = finding.evidence["orders_of_magnitude_across_depth"]
    assert abs(orders - 11 * math.log10(2)) < 0.1, orders
    assert f"{orders:.1f} orders of magnitude" in finding.summary


class Masked(nn.Module):
    """A classifier whose last logit is masked with -inf (an invalid action): softmax gives it 0."""

    def __init__(self, body: nn.Module, width: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        valid = torch.tensor([True, True, True, False])
        return self.head(self.body(x)).masked_fill(~valid, float("-inf"))


def test_logits_masked_with_minus_inf_are_a_note_not_a_failure(tmp_path):
    torch.manual_seed(0)
    model = Masked(nn.Sequential(nn.Linear(8, 32), nn.ReLU()), 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def batch(step):
        x = torch.randn(32, 8)
        return x, x[:, :3].argmax(1)  # learnable: the largest of the first three features

    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 80)
    # The independent check: the masked logit's probability is exactly 0 and the loss is finite.
    x, y = batch(0)
    probs = model(x).softmax(1)
    assert (probs[:, 3] == 0).all() and torch.isfinite(nn.functional.cross_entropy(model(x), y))
    assert report.healthy, loud(report)
    note = kinds(report)["nonfinite"]
    assert note.severity == "info" and note.layers == ["(root)"]


def test_a_mask_does_not_hide_a_vanishing_gradient(tmp_path):
    """Steps with a mask stay judged: the window used to end at the first -inf."""
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = Masked(nn.Sequential(*layers), 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batch(step):
        x = torch.randn(64, 32)
        return x, x[:, :3].argmax(1)

    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 40)
    assert "vanishing_gradient" in kinds(report), loud(report)


def test_a_compiled_model_is_said_to_be_unmeasured_not_healthy(tmp_path):
    """torch.compile runs the hooks inside its graph: only gradients are recorded, and the report says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(
        tmp_path, compiled, opt, lambda step: regression(16)(step), nn.functional.mse_loss, 12
    )
    note = kinds(report)["unmeasured"]
    assert note.severity == "info" and report.healthy
    plain = train_and_diagnose(
        tmp_path / "plain", model, opt, regression(16), nn.functional.mse_loss, 12
    )
    assert "unmeasured" not in kinds(plain)


def test_layers_a_vanishing_error_starves_are_not_blamed_on_the_learning_rate(tmp_path):
    """Their updates are tiny because their error is: the vanishing finding says so."""
    torch.manual_seed(0)
    layers = []
    for _ in range(24):
        linear = nn.Linear(32, 32)
        nn.init.normal_(linear.weight, std=0.5 / math.sqrt(32))
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(tmp_path, model, opt, regression(32), nn.functional.mse_loss, 60)
    found = kinds(report)
    assert "vanishing_gradient" in found, loud(report)
    starved = set(found["vanishing_gradient"].layers)
    assert "0" in starved
    for finding in report.of_kind("update_ratio"):
        assert not starved & set(finding.layers), finding.summary
    assert "learning_rate_too_low" not in cause_ids(report)


class Value(nn.Linear):
    """A value head that turns NaN when ``fire`` is set."""

    fire = False

    def forward(self, h):
        value = super().forward(h)
        return value * float("nan") if self.fire else value


class ActorCritic(nn.Module):
    """Masked policy logits (-inf, harmless) beside a value head, which runs after them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.policy = Masked(nn.Identity(), 32)
        self.value = Value(32, 1)

    def forward(self, x):
        h = self.body(x)
        return self.policy(h), self.value(h)


@pytest.mark.parametrize("fire", [5, 25])  # a detailed step, a plain one
def test_a_nan_after_a_mask_is_blamed_on_its_module_not_on_the_mask(tmp_path, fire):
    torch.manual_seed(0)
    model = ActorCritic()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, run=tmp_path / "run") as w:
        for step in range(30):
            model.value.fire = step == fire
            x = torch.randn(16, 8)
            logits, value = model(x)
            loss = nn.functional.cross_entropy(logits, x[:, :3].argmax(1)) + value.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
            w.log(loss=loss)
    found = gradwatch.diagnose(tmp_path / "run").of_kind("nonfinite")
    failure = [f for f in found if f.severity == "error"]
    assert len(failure) == 1 and failure[0].layers == ["value"] and failure[0].first_step == fire


def test_layers_whose_forward_went_unmeasured_are_named(tmp_path):
    """Reentrant checkpointing runs the block's real forward under no_grad: no probe sees it."""

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            x = x.requires_grad_()  # reentrant checkpointing needs an input that requires grad
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(tmp_path, model, opt, regression(16), nn.functional.mse_loss, 6)
    note = kinds(report)["unmeasured"]
    assert note.severity == "info" and note.layers == ["block.0", "block.2"]


def test_a_model_whose_every_layer_barely_moves_is_told_to_raise_the_learning_rate(tmp_path):
    """The remedies of "learning rate too low" were He init and ReLU, never the learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    report = train_and_diagnose(tmp_path, model, opt, regression(16), nn.functional.mse_loss, 40)
    slow = [f for f in report.findings if "learning_rate_too_low" in {c.id for c in f.causes}]
    assert slow, loud(report)
    assert slow[0].remedies[0].id == "raise_lr"
