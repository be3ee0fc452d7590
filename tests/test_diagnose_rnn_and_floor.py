"""Recurrent nets and flat losses: causes ranked by their evidence, and a loss with nothing left to learn.

Each run is a small training loop watched as a user would watch it. The truth is known by
construction (the recurrent matrix's spectral radius, targets that do not depend on the
inputs, inputs whose error cannot reach the weights through a shrinking recurrence) and
checked with plain torch where it matters.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import he_relu_mlp, train_and_diagnose
from torch import nn


def kinds(report):
    return {f.kind: f for f in report.findings}


def loud(report):
    return [
        (f.kind, f.severity, f.layers[:4], f.summary, [c.id for c in f.causes])
        for f in report.findings
        if f.severity != "info"
    ]


class LastStep(nn.Module):
    """A 1-layer tanh RNN read out at the last time step."""

    def __init__(self, n_in, hidden, radius=None):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, nonlinearity="tanh", batch_first=True)
        if radius is not None:
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=radius)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def spectral_radius(weight):
    return torch.linalg.eigvals(weight.detach()).abs().max().item()


def sequences(n, steps, n_in, target):
    x = torch.randn(n, steps, n_in)
    y = target(x)

    def batch(step):
        idx = torch.randint(0, n, (32,))
        return x[idx], y[idx]

    return batch


# ------------------------------------------------------------------ exploding: which cause first
def test_an_rnn_that_starts_above_radius_1_has_the_radius_ranked_before_the_learning_rate(tmp_path):
    """Orthogonal recurrent matrix x 1.2 over 60 steps: the gradients spike from step 17 on.

    The head's updates are large too (a median quarter of its norm per step before the
    spikes), but a learning rate ranks first only when its ordinary steps rewrite the
    whole weight."""
    torch.manual_seed(0)
    model = LastStep(8, 64, radius=1.2)
    assert spectral_radius(model.rnn.weight_hh_l0) == pytest.approx(1.2, rel=1e-4)  # plain torch
    batch = sequences(512, 60, 8, lambda x: x[:, :5, 0].sum(1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 60)
    finding = kinds(report).get("exploding_gradient")
    assert finding is not None and "rnn" in finding.layers, loud(report)
    ids = [c.id for c in finding.causes]
    assert ids[0] == "recurrent_radius_above_1", [c.text for c in finding.causes]
    assert finding.causes[0].evidence["spectral_radius"] == pytest.approx(1.2, abs=0.05)
    assert "1.2" in finding.causes[0].text
    # The learning rate stays a cause, second, with the median step that shows it.
    lr = finding.causes[ids.index("learning_rate_too_high")]
    assert 0.01 < lr.evidence["median_update_ratio"] < 1 and lr.evidence["layer"] == "head"
    remedies = [r.id for r in finding.remedies]
    assert remedies[:2] == ["clip_grad_norm", "orthogonal_init"], remedies
    assert remedies.index("orthogonal_init") < remedies.index("lower_lr")


def test_an_rnn_whose_radius_only_grew_past_1_under_a_high_learning_rate_blames_the_learning_rate(
    tmp_path,
):
    """PyTorch's default init (radius ~0.6) at lr 0.6: updates push the recurrent matrix out."""
    torch.manual_seed(0)
    model = LastStep(4, 32)
    assert spectral_radius(model.rnn.weight_hh_l0) < 0.9  # plain torch: it starts below 1
    batch = sequences(1024, 40, 4, lambda x: 3 * x[:, :, :1].mean(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.6)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 56)
    end = model.rnn.weight_hh_l0.detach()  # plain torch: the updates blew the matrix up
    assert not torch.isfinite(end).all() or spectral_radius(end) > 1  # (LAPACK needs finite input)
    finding = kinds(report).get("exploding_gradient")
    assert finding is not None, loud(report)
    assert finding.causes[0].id == "learning_rate_too_high", [c.text for c in finding.causes]
    assert "recurrent_radius_above_1" not in [c.id for c in finding.causes]
    assert finding.remedies[0].id == "lower_lr"


def test_a_feed_forward_net_exploding_from_a_high_learning_rate_blames_the_learning_rate(tmp_path):
    """He-initialised ReLU MLP at lr 0.12: the weights grow until the gradient spikes."""
    torch.manual_seed(0)
    model = he_relu_mlp(4)
    teacher = nn.Linear(16, 1)

    def batch(step):
        x = torch.randn(64, 16)
        with torch.no_grad():
            return x, torch.tanh(teacher(x))

    opt = torch.optim.SGD(model.parameters(), lr=0.12)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 20)
    finding = kinds(report).get("exploding_gradient")
    assert finding is not None, loud(report)
    assert finding.causes[0].id == "learning_rate_too_high", [c.text for c in finding.causes]
    assert finding.causes[0].evidence["median_update_ratio"] > 0.1
    assert finding.remedies[0].id == "lower_lr"


# ------------------------------------------------------------------ a loss with nothing left to learn
def at_optimum(lr):
    """A linear model that starts as its teacher: the targets' noise is all that is left."""
    torch.manual_seed(0)
    teacher = nn.Linear(16, 1)
    model = nn.Linear(16, 1)
    model.load_state_dict(teacher.state_dict())

    def batch(step):
        x = torch.randn(64, 16)
        with torch.no_grad():
            return x, teacher(x) + 0.5 * torch.randn(64, 1)

    return model, torch.optim.SGD(model.parameters(), lr=lr), batch


def test_a_model_that_starts_at_its_optimum_is_healthy_and_its_flat_loss_a_note(tmp_path):
    model, opt, batch = at_optimum(lr=0.01)
    x, y = batch(0)  # plain autograd: the expected gradient is zero, only the noise's is left
    loss = nn.functional.mse_loss(model(x), y)
    assert loss.item() == pytest.approx(0.25, rel=0.5)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 100)
    assert report.healthy, loud(report)
    plateau = kinds(report)["loss_plateau"]
    assert plateau.severity == "info" and not plateau.causes
    assert "no gradient problem" in plateau.summary
    assert 1e-4 < plateau.evidence["typical_update_ratio"] < 0.1


def test_random_labels_leave_the_classifier_at_chance_without_a_warning(tmp_path):
    """Labels drawn independently of the inputs: cross-entropy stays at ln 4, gradients are healthy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(step):
        return torch.randn(64, 16), torch.randint(0, 4, (64,))

    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 100)
    assert report.healthy, loud(report)
    assert kinds(report)["loss_plateau"].evidence["loss_end"] == pytest.approx(math.log(4), abs=0.1)


def test_a_flat_loss_whose_weights_barely_move_stays_a_warning(tmp_path):
    """The same model at lr 1e-5: updates 1e-5 of the weights, too small to say the loss cannot move."""
    model, opt, batch = at_optimum(lr=1e-5)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 100)
    assert kinds(report)["loss_plateau"].severity == "warning", loud(report)
    assert not report.healthy


def test_a_deep_sigmoid_net_that_cannot_learn_keeps_its_plateau_as_harm(tmp_path):
    """12 sigmoid layers, two classes: the loss stays at ln 2 because the error vanishes."""
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batch(step):
        x = torch.randn(64, 32)
        return x, (x[:, 0] > 0).long()

    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.cross_entropy, 60)
    found = kinds(report)
    assert found["loss_plateau"].severity == "warning", loud(report)
    assert found["vanishing_gradient"].severity == "error", loud(report)


# ------------------------------------------------------------------ vanishing through time
def test_an_rnn_whose_error_shrinks_through_time_names_the_radius_as_the_plateaus_cause(tmp_path):
    """Radius 0.5 over 100 steps, loss on the last step, target made of the first five inputs.

    The error of the last step reaches those inputs scaled by about 0.5^95: nothing to learn
    from. Without the sequence length in the store, the cause gives the 100-fold horizon."""
    torch.manual_seed(0)
    model = LastStep(4, 32, radius=0.5)
    batch = sequences(512, 100, 4, lambda x: x[:, :5, 0].sum(1, keepdim=True))
    x, y = batch(0)  # plain autograd: how much of the last step's error reaches each input
    x = x.clone().requires_grad_()
    nn.functional.mse_loss(model(x), y).backward()
    per_step = x.grad.norm(dim=(0, 2))
    assert per_step[:5].max() < 1e-10 * per_step[-1]
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    report = train_and_diagnose(tmp_path, model, opt, batch, nn.functional.mse_loss, 100)
    plateau = kinds(report).get("loss_plateau")
    assert plateau is not None and plateau.severity == "warning", loud(report)
    cause = plateau.causes[0]
    assert cause.id == "recurrent_radius_below_1", [c.text for c in plateau.causes]
    assert cause.evidence["spectral_radius"] == pytest.approx(0.5, abs=0.02)
    assert cause.evidence["steps_to_shrink_100x"] == 7  # 0.5^7 = 0.008
    assert [r.id for r in plateau.remedies] == ["lstm_gru", "orthogonal_init"]
    assert not report.healthy
