"""Jacobian spectra against published values and brute-force references.

References are independent of the code under test: dense Jacobians come straight from
``torch.func.jacrev`` and ``torch.linalg.svdvals`` here, and the mean-field constants from
numpy's Gauss-Hermite rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.theory.jacobian import (
    layer_gains,
    singular_values,
    spectral_density,
    spectrum_stats,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are small: one thread is as fast, and immune to the 10-100x
    slowdowns of a 2-thread pool on a CI runner shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """The reference: the flattened Jacobian by plain jacrev."""
    g = lambda v: f(v.reshape(x.shape).clone()).reshape(-1)  # noqa: E731  (clone: in-place ReLU)
    with torch.no_grad():
        return torch.func.jacrev(g)(x.reshape(-1))


def deep_net(
    width: int, depth: int, act: nn.Module, sigma_w2: float, orthogonal: bool
) -> nn.Sequential:
    """h^l = W^l x^(l-1), x^l = phi(h^l): depth layers, each ending in its activation."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False)
        if orthogonal:
            nn.init.orthogonal_(lin.weight, gain=math.sqrt(sigma_w2))
        else:
            nn.init.normal_(lin.weight, std=math.sqrt(sigma_w2 / width))
        layers += [lin, act]
    return nn.Sequential(*layers)


# --- published values -------------------------------------------------------------------

SPECTRUM_CASES = {
    # name: (activation, sigma_w2, orthogonal, depth)
    "relu_gaussian_L4": (nn.ReLU(), 2.0, False, 4),
    "relu_gaussian_L16": (nn.ReLU(), 2.0, False, 16),
    "relu_orthogonal_L4": (nn.ReLU(), 2.0, True, 4),
    "relu_orthogonal_L16": (nn.ReLU(), 2.0, True, 16),
    "linear_gaussian_L16": (nn.Identity(), 1.0, False, 16),
    "linear_orthogonal_L16": (nn.Identity(), 1.0, True, 16),
}


@pytest.mark.parametrize("name", sorted(SPECTRUM_CASES))
def test_normalized_variance_matches_free_probability(name, validation_cases):
    """var/mean^2 of the eigenvalues of J J^T = L (mu2/mu1^2 - 1 - s1) (Pennington et al.).

    ReLU: mu1 = mu2 = 1/2, so mu2/mu1^2 = 2; linear: 1. s1 = -1 for Gaussian and 0 for
    orthogonal weights. sigma_b2 = 0 makes every input variance a fixed point q*, so an
    N(0, 1) input sits at q*. The matrix is the input-output Jacobian dx^L/dx^0 of the
    whole net (every layer ends in its activation), averaged over the seeds.
    """
    case = validation_cases["jacobian_spectrum_normalized_variance"]
    width, seeds = case["setup"]["width"], case["setup"]["seeds"]
    act, sigma_w2, orthogonal, depth = SPECTRUM_CASES[name]
    values = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = deep_net(width, depth, act, sigma_w2, orthogonal)
        x = torch.randn(1, width)
        stats = spectrum_stats(net, x)
        assert stats.path == "exact"
        values.append(stats.normalized_variance)
    got, expected = float(np.mean(values)), case["expected"][name]
    if expected == 0:
        assert abs(got) <= case["abs_tol_for_zero"], (name, got)
    else:
        assert got == pytest.approx(expected, rel=case["rel_tol"]), (name, got, values)


def _q_star(phi, sigma_w2: float, sigma_b2: float) -> float:
    """Fixed point of the length map q -> sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2."""
    z, w = np.polynomial.hermite_e.hermegauss(100)
    w = w / w.sum()  # probabilists' rule: weights of the standard normal
    q = 1.0
    for _ in range(2000):
        q = sigma_w2 * float(w @ phi(math.sqrt(q) * z) ** 2) + sigma_b2
    return q


def _tanh_mu1(q: float) -> float:
    """E[tanh'(h)^2] for h ~ N(0, q) by Gauss-Hermite quadrature (tanh' is smooth)."""
    z, w = np.polynomial.hermite_e.hermegauss(100)
    return float((w / w.sum()) @ np.cosh(math.sqrt(q) * z) ** -4)


MSV_CASES = {
    # name: (torch activation, numpy phi, mu1 = E[phi'(h)^2] as a function of q*, sigma_w2,
    # sigma_b2, depth). ReLU's mu1 is 1/2 at every q: half of a centred Gaussian is positive.
    "tanh_ordered_L8": (nn.Tanh(), np.tanh, _tanh_mu1, 1.0, 0.05, 8),
    "tanh_chaotic_L8": (nn.Tanh(), np.tanh, _tanh_mu1, 2.0, 0.05, 8),
    "relu_L12": (nn.ReLU(), lambda h: np.maximum(h, 0), lambda q: 0.5, 1.8, 0.1, 12),
}


@pytest.mark.parametrize("name", sorted(MSV_CASES))
def test_mean_squared_singular_value_is_chi_to_the_depth(name, validation_cases):
    """tr(J J^T)/N = chi^L with chi = sigma_w2 E[phi'(h)^2], h ~ N(0, q*) (Pennington et al.)."""
    case = validation_cases["jacobian_mean_squared_singular_value"]
    act, phi, mu1, sigma_w2, sigma_b2, depth = MSV_CASES[name]
    q_star = _q_star(phi, sigma_w2, sigma_b2)
    chi = sigma_w2 * mu1(q_star)
    width, values = 500, []
    for seed in range(4):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            lin = nn.Linear(width, width)
            nn.init.normal_(lin.weight, std=math.sqrt(sigma_w2 / width))
            nn.init.normal_(lin.bias, std=math.sqrt(sigma_b2))
            layers += [lin, act]
        net = nn.Sequential(*layers)
        # x^0 = phi(h^0) with h^0 ~ N(0, q*): then h^1 has variance q* (the fixed point).
        x = act(math.sqrt(q_star) * torch.randn(1, width))
        values.append(spectrum_stats(net, x).m1)
    assert float(np.mean(values)) == pytest.approx(chi**depth, rel=case["rel_tol"]), (
        name,
        chi,
        values,
    )


# --- iterative top-k against a full SVD ---------------------------------------------------


def tanh_mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, std=math.sqrt(1.5 / a))
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 4, 3, padding=1),
    )


NETS = {
    "square_mlp": (lambda: tanh_mlp([96] * 7), (1, 96)),
    "wide_output": (lambda: tanh_mlp([40, 200, 150]), (1, 40)),
    "narrow_output": (lambda: tanh_mlp([150, 200, 30]), (1, 150)),
    "cnn": (small_cnn, (1, 3, 10, 10)),
}


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_iterative_top_k_matches_full_svd(net_name):
    build, shape = NETS[net_name]
    net, x = build(), torch.randn(shape)
    reference = torch.linalg.svdvals(dense_jacobian(net, x))
    got = singular_values(net, x, k=6, method="iterative", tol=1e-6)
    assert got.path == "iterative" and got.smallest is None and got.converged
    torch.testing.assert_close(got.values, reference[:6], rtol=1e-4, atol=1e-7)
    assert got.shape == (net(x).numel(), x.numel())


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_exact_path_returns_all_values_and_both_ends(net_name):
    build, shape = NETS[net_name]
    net, x = build(), torch.randn(shape)
    reference = torch.linalg.svdvals(dense_jacobian(net, x))
    every = singular_values(net, x)
    assert every.path == "exact" and every.smallest is None
    torch.testing.assert_close(every.values, reference, rtol=1e-5, atol=1e-7)
    ends = singular_values(net, x, k=3)
    torch.testing.assert_close(ends.values, reference[:3])
    torch.testing.assert_close(ends.smallest, reference.flip(0)[:3])


def test_iterative_top_k_matches_scipy_svds_on_the_same_products():
    """A second reference that never forms J: ARPACK on a LinearOperator (scipy optional)."""
    sla = pytest.importorskip("scipy.sparse.linalg")
    from gradwatch.theory._linops import JacobianOperator

    net, x = tanh_mlp([300, 300, 300, 300]), torch.randn(1, 300)
    op = JacobianOperator(net, x)
    lin = sla.LinearOperator(
        (op.m, op.n),
        matvec=lambda v: op.jvp(torch.as_tensor(v.reshape(1, -1))).double().numpy().ravel(),
        rmatvec=lambda u: op.vjp(torch.as_tensor(u.reshape(1, -1))).double().numpy().ravel(),
        dtype=np.float64,
    )
    reference = np.sort(sla.svds(lin, k=5, return_singular_vectors=False, tol=1e-8))[::-1]
    got = singular_values(net, x, k=5, method="iterative", tol=1e-6)
    np.testing.assert_allclose(got.values.double().numpy(), reference, rtol=1e-4)


def test_iterative_path_needs_k_and_says_how_to_fix():
    net, x = tanh_mlp([20, 20]), torch.randn(1, 20)
    with pytest.raises(ValueError, match="pass k="):
        singular_values(net, x, method="iterative")
    with pytest.raises(ValueError, match="method must be"):
        singular_values(net, x, method="fast")


def test_batch_gives_block_diagonal_jacobian():
    """Two independent samples: the spectrum is the union of the per-sample spectra."""
    net, x = tanh_mlp([30, 30, 30]), torch.randn(2, 30)
    both = singular_values(net, x).values
    each = torch.cat([singular_values(net, x[i : i + 1]).values for i in range(2)])
    torch.testing.assert_close(both, each.sort(descending=True).values)


def test_shape_that_does_not_fit_names_shape_and_cause():
    net = nn.Sequential(nn.Linear(12, 5))
    with pytest.raises(ValueError, match=r"\(1, 11\).*Sequential.*mat1 and mat2"):
        singular_values(net, torch.randn(1, 11))
    with pytest.raises(ValueError, match=r"\(1, 11\)"):
        layer_gains(net, torch.randn(1, 11))


def test_function_without_forward_mode_rule_falls_back_to_double_vjp():
    """grid_sample has no forward-mode rule: J v then comes from the vjp of u -> J^T u."""
    grid = torch.rand(1, 6, 7, 2) * 2 - 1

    def f(v: torch.Tensor) -> torch.Tensor:
        image = v.reshape(1, 1, 4, 5)
        return torch.tanh(torch.nn.functional.grid_sample(image, grid, align_corners=False))

    x = torch.randn(20)
    with pytest.raises(NotImplementedError):
        torch.func.jvp(f, (x,), (x,))
    reference = torch.linalg.svdvals(dense_jacobian(f, x))
    got = singular_values(f, x, k=4, method="iterative", tol=1e-8)
    torch.testing.assert_close(got.values, reference[:4], rtol=1e-4, atol=1e-7)
    every = singular_values(f, x, method="exact")  # m = 42 > n = 20: built from jvps
    torch.testing.assert_close(every.values, reference, rtol=1e-4, atol=1e-6)


# --- Hutchinson against exact moments -----------------------------------------------------


@pytest.mark.parametrize("net_name", ["square_mlp", "wide_output", "cnn"])
def test_hutchinson_moments_within_their_standard_errors(net_name):
    build, shape = NETS[net_name]
    net, x = build(), torch.randn(shape)
    lam = torch.linalg.svdvals(dense_jacobian(net, x)).double() ** 2
    m1, m2 = float(lam.mean()), float((lam**2).mean())
    nv = m2 / m1**2 - 1
    est = spectrum_stats(net, x, probes=400, method="iterative", seed=1)
    assert est.path == "iterative" and est.condition_number is None
    # Four standard errors: a miss has probability about 6e-5 per quantity.
    assert abs(est.m1 - m1) <= 4 * est.m1_se
    assert abs(est.m2 - m2) <= 4 * est.m2_se
    assert abs(est.normalized_variance - nv) <= 4 * est.normalized_variance_se
    # The errors are informative, not merely large.
    assert est.m1_se < 0.1 * m1 and est.normalized_variance_se < 0.2 * max(nv, 1)
    assert est.sigma_max == pytest.approx(float(lam.max().sqrt()), rel=1e-3)


def test_exact_stats_match_svd():
    net, x = tanh_mlp([64, 64, 64, 64]), torch.randn(1, 64)
    s = torch.linalg.svdvals(dense_jacobian(net, x)).double()
    st = spectrum_stats(net, x)
    assert st.m1 == pytest.approx(float((s**2).mean()), rel=1e-5)
    assert st.sigma_max == pytest.approx(float(s[0]), rel=1e-5)
    assert st.condition_number == pytest.approx(float(s[0] / s[-1]), rel=1e-4)


# --- stochastic Lanczos quadrature --------------------------------------------------------


def test_slq_with_full_steps_recovers_the_eigenvalues():
    """With steps >= dim every probe's Lanczos run ends with the exact eigenvalues."""
    net, x = tanh_mlp([24, 40, 30]), torch.randn(1, 24)
    lam = torch.linalg.svdvals(dense_jacobian(net, x)).double() ** 2
    sd = spectral_density(net, x, steps=40, probes=3)
    for p in range(3):
        seen = sd.nodes[p][sd.weights[p] > 1e-10]
        gap = (seen[:, None] - lam[None, :]).abs().min(1).values
        assert float(gap.max()) <= 1e-5 * float(lam.max())


def test_slq_moments_match_exact_moments():
    net, x = tanh_mlp([120] * 5), torch.randn(1, 120)
    lam = torch.linalg.svdvals(dense_jacobian(net, x)).double() ** 2
    sd = spectral_density(net, x, steps=20, probes=32, seed=3)
    for power in (1, 2, 3):
        per_probe = (sd.weights * sd.nodes**power).sum(1)  # v^T G^p v, one per probe
        se = float(per_probe.std() / math.sqrt(len(per_probe)))
        exact = float((lam**power).mean())
        assert abs(float(per_probe.mean()) - exact) <= 4 * se, power
    # The smoothed density is a probability density on its grid.
    mass = torch.trapezoid(sd.density, sd.grid)
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
    log = spectral_density(net, x, steps=20, probes=4, log_scale=True)
    assert log.log_scale and float(torch.trapezoid(log.density, log.grid)) == pytest.approx(
        1.0, abs=1e-3
    )


# --- layer gains --------------------------------------------------------------------------


def _layer_references(model: nn.Module, x: torch.Tensor) -> list[tuple[float, float]]:
    """Exact (spectral norm, ||J||_F / sqrt(n_in)) per leaf call, by jacrev per layer."""
    refs = []
    h = x
    for layer in model:
        jac = dense_jacobian(layer, h)
        refs.append(
            (float(torch.linalg.matrix_norm(jac, 2)), float(jac.norm() / math.sqrt(h.numel())))
        )
        with torch.no_grad():
            h = layer(h.clone())
    return refs


@pytest.mark.parametrize("net_name", ["square_mlp", "cnn"])
def test_power_iteration_layer_gains_match_exact(net_name):
    build, shape = NETS[net_name]
    net, x = build(), torch.randn(shape)
    refs = _layer_references(net, x)
    gains = layer_gains(net, x, method="iterative", probes=200)
    assert [g.name for g in gains] == [str(i) for i in range(len(net))]
    for g, (spec, frob) in zip(gains, refs, strict=True):
        assert g.path == "iterative" and g.converged
        assert g.spectral_norm == pytest.approx(spec, rel=1e-3), g
        assert abs(g.frobenius_rms - frob) <= max(4 * g.frobenius_rms_se, 1e-6), g
    exact = layer_gains(net, x)
    for g, (spec, frob) in zip(exact, refs, strict=True):
        assert g.path == "exact"
        assert g.spectral_norm == pytest.approx(spec, rel=1e-5)
        assert g.frobenius_rms == pytest.approx(frob, rel=1e-5)


def test_layer_gains_follow_execution_order_and_repeated_calls():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(8, 3)  # registered first, runs last
            self.body = nn.Linear(8, 8)
            self.act = nn.Tanh()

        def forward(self, x):
            for _ in range(2):
                x = self.act(self.body(x))
            return self.out(x)

    gains = layer_gains(Loop(), torch.randn(1, 8))
    assert [(g.name, g.call) for g in gains] == [
        ("body", 0),
        ("act", 0),
        ("body", 1),
        ("act", 1),
        ("out", 0),
    ]


def test_layer_gains_remove_hooks_even_when_the_model_raises():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            self.a(x)
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(ValueError, match="boom"):
        layer_gains(model, torch.randn(1, 4))
    assert not model.a._forward_pre_hooks and not model._forward_pre_hooks
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    layer_gains(net, torch.randn(1, 4))
    assert all(not m._forward_pre_hooks for m in net.modules())
