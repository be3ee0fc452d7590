"""critical_init against the statistics of the weights it draws and the network it makes.

Tolerances: weight variances within 2% (262k draws, standard error 0.3%), bias variances
within 15% (2048 draws, standard error 3%), the backprop ratio of a width-400 net within 5%.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.theory import MeanField, critical_init, critical_sigma_w2, find_activation


def test_mlp_weights_and_biases_have_the_critical_variances():
    net = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 2048), nn.Tanh())
    done = critical_init(net, sigma_b2=0.05, generator=torch.Generator().manual_seed(0))
    assert done.activation == "tanh" and done.layers == ["0", "2"]
    assert done.sigma_w2 == pytest.approx(critical_sigma_w2("tanh", 0.05), rel=1e-12)
    for layer in (net[0], net[2]):
        assert float(layer.weight.detach().var()) * 512 == pytest.approx(done.sigma_w2, rel=0.02)
    assert float(net[2].bias.detach().var()) == pytest.approx(0.05, rel=0.15)


def test_conv_fan_in_counts_channels_per_group_and_kernel():
    net = nn.Sequential(nn.Conv2d(32, 256, 3, groups=2), nn.ReLU(), nn.Conv1d(4, 4, 5))
    done = critical_init(net, generator=torch.Generator().manual_seed(1))
    assert done.sigma_w2 == pytest.approx(2.0, abs=1e-9)  # relu: He et al. 2015
    fan_in = (32 // 2) * 3 * 3  # 36864 draws: standard error of the variance 0.7%
    assert float(net[0].weight.detach().var()) * fan_in == pytest.approx(2.0, rel=0.05)
    assert torch.count_nonzero(net[0].bias) == 0  # sigma_b2 = 0: zero biases


def test_leaky_relu_module_is_used_as_the_activation():
    net = nn.Sequential(nn.Linear(10, 10), nn.LeakyReLU(0.2))
    done = critical_init(net)
    assert done.sigma_w2 == pytest.approx(2 / (1 + 0.2**2), rel=1e-10)  # E[phi'^2] = (1+a^2)/2


def test_activation_detection_errors_say_what_to_do():
    with pytest.raises(ValueError, match="mixes activations .*relu, tanh.*activation="):
        critical_init(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="no activation module .*activation="):
        find_activation(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no nn.Linear"):
        critical_init(nn.Sequential(nn.Tanh()))
    done = critical_init(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Tanh()), activation="tanh")
    assert done.sigma_w2 == pytest.approx(1.0, abs=1e-6)


def test_generator_makes_draws_reproducible():
    nets = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2)]
    for net in nets:
        critical_init(net, sigma_b2=0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(nets[0][0].weight, nets[1][0].weight)


def _backprop_factor(net: nn.Sequential, width: int, q_in: float) -> float:
    """Geometric mean of ||dL/dh^l||^2 / ||dL/dh^(l+1)||^2 over the Linear outputs."""
    h = torch.randn(1, width, generator=torch.Generator().manual_seed(3)) * math.sqrt(q_in)
    outs = []
    for module in net:
        h = module(h)
        if isinstance(module, nn.Linear):
            h.retain_grad()
            outs.append(h)
    h.sum().backward()
    norms = torch.stack([(o.grad**2).sum() for o in outs])
    return math.exp(float(torch.log(norms[:-1] / norms[1:]).mean()))


def test_critical_init_stops_gradients_vanishing():
    width, depth = 400, 30
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    net = nn.Sequential(*layers)
    # PyTorch's default U(-1/sqrt(n), 1/sqrt(n)) is sigma_w2 = 1/3: deep ordered phase.
    default = _backprop_factor(net, width, q_in=0.05)
    assert default < 0.5
    done = critical_init(net, sigma_b2=0.05, generator=torch.Generator().manual_seed(0))
    q_star = MeanField("tanh", done.sigma_w2, 0.05).q_star
    assert _backprop_factor(net, width, q_in=q_star) == pytest.approx(1.0, rel=0.05)
