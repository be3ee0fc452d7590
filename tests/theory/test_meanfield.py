"""Mean-field theory against published values, closed forms and brute-force references.

Tolerances: validation cases use the tolerance stated in cases.json; closed form vs
quadrature for smooth activations 1e-12 (both are exact to rounding there); quadrature
vs an independent fine trapezoidal rule 1e-9.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch.theory import MeanField, critical_sigma_w2, depth_scale, phase_diagram
from gradwatch.theory.activations import KNOWN_ACTIVATIONS, resolve_activation
from gradwatch.theory.gaussian import HermiteSeries, Quadrature
from gradwatch.theory.kernels import ErfKernel, ReluKernel


# ---------------------------------------------------------------- validation cases
def test_tanh_critical_line(validation_cases):
    case = validation_cases["meanfield_tanh_critical_line"]
    tol = case["abs_tol"]
    for key, expected in case["expected"].items():
        sigma_b2 = float(key)
        sigma_w2 = critical_sigma_w2(case["activation"], sigma_b2)
        q_star = MeanField(case["activation"], sigma_w2, sigma_b2).q_star
        assert sigma_w2 == pytest.approx(expected["sigma_w2"], abs=tol), key
        assert q_star == pytest.approx(expected["q_star"], abs=tol), key


def test_tanh_chi1_and_xi_c(validation_cases):
    case = validation_cases["meanfield_tanh_chi1_and_xi_c"]
    for key, expected in case["expected"].items():
        mf = MeanField(case["activation"], float(key), case["sigma_b2"])
        for name, value in expected.items():
            assert getattr(mf, name) == pytest.approx(value, rel=case["rel_tol"]), (key, name)
        assert mf.phase == ("chaotic" if "c_star" in expected else "ordered")


def test_erf_closed_form_case(validation_cases):
    case = validation_cases["meanfield_erf_closed_form"]
    tol = case["abs_tol"]
    for key, expected in case["expected"].items():
        sigma_b2 = float(key)
        for closed_form in (True, False):  # the closed form and plain quadrature both hold
            sigma_w2 = critical_sigma_w2("erf", sigma_b2, closed_form=closed_form)
            assert sigma_w2 == pytest.approx(expected["sigma_w2"], abs=tol), key
            if "q_star" in expected:
                mf = MeanField("erf", sigma_w2, sigma_b2, closed_form=closed_form)
                assert mf.q_star == pytest.approx(expected["q_star"], abs=tol), key


def test_erf_closed_form_formulas_match_quadrature():
    # The case's formulas, written out here, against quadrature of torch.erf (no kernel).
    for sigma_w2, sigma_b2 in [(1.0, 0.05), (1.3758, 0.05), (3.0, 0.5)]:
        mf = MeanField(torch.erf, sigma_w2, sigma_b2)
        q = mf.q_star
        q_next = sigma_w2 * (2 / math.pi) * math.asin(2 * q / (1 + 2 * q)) + sigma_b2
        assert q_next == pytest.approx(q, abs=1e-12)
        assert mf.chi1 == pytest.approx((4 * sigma_w2 / math.pi) / math.sqrt(1 + 4 * q), abs=1e-12)


def test_relu_cmap_case(validation_cases):
    case = validation_cases["meanfield_relu_cmap"]
    mf = MeanField("relu", 2.0, 0.0)
    assert mf.phase == "critical"
    layers = max(int(k) for k in case["expected"])
    iterates = mf.iterate_c_map(0.0, layers)
    for key, expected in case["expected"].items():
        assert iterates[int(key)] == pytest.approx(expected, abs=case["abs_tol"]), key


def test_relu_cmap_formula_written_out():
    # c' = (sqrt(1 - c^2) + (pi - arccos c) c) / pi, iterated by hand.
    mf = MeanField("relu", 2.0, 0.0)
    c = 0.0
    for layer in range(1, 21):
        c = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
        assert mf.iterate_c_map(0.0, layer)[-1] == pytest.approx(c, abs=1e-14)


# ---------------------------------------------------------------- closed forms vs quadrature
GRID_Q = np.array([0.01, 0.3, 1.0, 3.0])[:, None] * np.ones(6)
GRID_C = np.array([-0.9, 0.0, 0.3, 0.7, 0.95, 1.0])[None, :] * np.ones((4, 1))


def test_erf_kernel_matches_quadrature():
    quad = Quadrature(resolve_activation(torch.erf))
    for got, want in zip(
        quad.moments_1d(GRID_Q[:, 0]), ErfKernel().moments_1d(GRID_Q[:, 0]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    for got, want in zip(
        quad.moments_2d(GRID_Q, GRID_C), ErfKernel().moments_2d(GRID_Q, GRID_C), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_relu_kernel_matches_quadrature():
    # relu has a kink and relu' a jump, so Gauss-Hermite converges only algebraically:
    # the 1D moments are exact by symmetry (even node count), the 2D ones good to ~3e-4
    # (values / q) and ~1e-2 (derivative kernel of the step function) with 100 nodes.
    quad = Quadrature(resolve_activation(torch.relu))
    for got, want in zip(
        quad.moments_1d(GRID_Q[:, 0]), ReluKernel().moments_1d(GRID_Q[:, 0]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    cross, cross_d = quad.moments_2d(GRID_Q, GRID_C)
    want, want_d = ReluKernel().moments_2d(GRID_Q, GRID_C)
    np.testing.assert_allclose(cross / GRID_Q, want / GRID_Q, atol=5e-4)
    np.testing.assert_allclose(cross_d, want_d, atol=1e-2)


def test_relu_closed_form_and_quadrature_agree_on_mean_field():
    exact = MeanField("relu", 1.5, 0.1)
    numeric = MeanField("relu", 1.5, 0.1, closed_form=False)
    assert exact.q_star == pytest.approx(0.1 / (1 - 1.5 / 2), rel=1e-12)  # q* = sb / (1 - sw/2)
    assert numeric.q_star == pytest.approx(exact.q_star, rel=1e-10)
    assert numeric.chi1 == pytest.approx(0.75, rel=1e-12)


def test_quadrature_matches_fine_trapezoid_for_tanh():
    # An independent rule: the trapezoidal rule on a fine grid (geometric convergence).
    z = np.arange(-12.0, 12.0, 0.01)
    w = np.exp(-z * z / 2) * 0.01 / math.sqrt(2 * math.pi)
    quad = Quadrature(resolve_activation("tanh"))
    for q, c in [(0.5, 0.3), (3.0, 0.9), (12.5, 0.5)]:
        s = math.sqrt(1 - c * c)
        u1 = math.sqrt(q) * z
        u2 = math.sqrt(q) * (c * z[:, None] + s * z[None, :])
        ref = (np.tanh(u1) * (np.tanh(u2) @ w)) @ w
        ref_d = ((1 - np.tanh(u1) ** 2) * ((1 - np.tanh(u2) ** 2) @ w)) @ w
        cross, cross_d = quad.moments_2d(np.array(q), np.array(c))
        assert float(cross) == pytest.approx(ref, abs=1e-9), q
        assert float(cross_d) == pytest.approx(ref_d, abs=1e-7 if q > 10 else 1e-9), q


def test_hermite_series_matches_quadrature():
    act = resolve_activation("tanh")
    series, quad = HermiteSeries(act), Quadrature(act)
    q, c = np.array([0.2, 1.0, 2.0, 3.0]), np.array([0.1, 0.5, 0.8, 0.95])
    for got, want in zip(series.moments_2d(q, c), quad.moments_2d(q, c), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-8)


# ---------------------------------------------------------------- the maps themselves
def test_fixed_points_are_fixed_and_slopes_are_derivatives():
    mf = MeanField("tanh", 2.5, 0.05)  # chaotic
    assert mf.q_map(mf.q_star) == pytest.approx(mf.q_star, rel=1e-12)
    assert mf.c_map(mf.c_star) == pytest.approx(mf.c_star, abs=1e-12)
    assert mf.c_map(1.0) == pytest.approx(1.0, abs=1e-12)
    h = 1e-5  # central differences of the c-map against the derivative kernel
    for c in (0.2, mf.c_star, 0.9):
        numeric = (mf.c_map(c + h) - mf.c_map(c - h)) / (2 * h)
        assert mf.c_map_slope(c) == pytest.approx(numeric, rel=1e-7)
    assert mf.c_map_slope(1.0) == pytest.approx(mf.chi1, rel=1e-10)
    assert mf.c_map_slope(mf.c_star) == pytest.approx(mf.chi_c, rel=1e-10)


def test_xi_c_is_the_decay_length_of_the_c_map():
    # Iterate the map near c* and measure how fast it closes in: |c_l - c*| ~ e^(-l/xi_c).
    for sigma_w2 in (1.2, 3.0):  # ordered (towards 1) and chaotic (towards c* < 1)
        mf = MeanField("tanh", sigma_w2, 0.05)
        start = mf.c_star - 1e-4 if mf.phase == "ordered" else mf.c_star + 1e-4
        c = mf.iterate_c_map(start, 12)
        rate = math.log(abs(c[12] - mf.c_star) / abs(c[2] - mf.c_star)) / 10
        assert -1 / rate == pytest.approx(mf.xi_c, rel=2e-3), sigma_w2


def test_q_map_iteration_reaches_q_star():
    mf = MeanField("tanh", 3.0, 0.3)
    assert mf.iterate_q_map(5.0, 60)[-1] == pytest.approx(mf.q_star, rel=1e-10)
    assert mf.iterate_q_map(0.0, 60)[-1] == pytest.approx(mf.q_star, rel=1e-10)


def test_depth_scales_relations():
    ordered = MeanField("tanh", 1.2, 0.05)
    assert ordered.xi_c == pytest.approx(-1 / math.log(ordered.chi1))
    assert ordered.xi_grad == pytest.approx(ordered.xi_c)
    assert ordered.trainable_depth == pytest.approx(6 * ordered.xi_c)
    chaotic = MeanField("tanh", 3.0, 0.05)
    assert chaotic.xi_grad == pytest.approx(1 / math.log(chaotic.chi1))  # growth, |ln|
    assert chaotic.xi_c == pytest.approx(-1 / math.log(chaotic.chi_c))
    assert depth_scale(1.0) == math.inf
    assert depth_scale(np.array([0.5, 2.0])) == pytest.approx([1 / math.log(2)] * 2)


def test_criticality_gives_infinite_depth_without_crashing():
    for act, sw, sb in [("linear", 1.0, 0.0), ("relu", 2.0, 0.0), ("tanh", 1.0, 0.0)]:
        mf = MeanField(act, sw, sb)
        assert mf.phase == "critical", act
        assert math.isinf(mf.xi_c) and math.isinf(mf.xi_grad) and math.isinf(mf.trainable_depth)
        d = mf.to_dict()
        assert d["xi_c"] is None and d["trainable_depth"] is None
    near = MeanField("tanh", critical_sigma_w2("tanh", 0.05), 0.05)
    assert near.xi_c > 1e6 and near.c_star == pytest.approx(1.0, abs=1e-3)


def test_exploding_length_is_reported_not_crashed():
    mf = MeanField("relu", 2.5, 0.1)  # q-map q' = 1.25 q + 0.1 has no finite fixed point
    assert math.isinf(mf.q_star) and mf.chi1 == pytest.approx(1.25)
    assert math.isnan(mf.xi_c) and mf.to_dict()["xi_c"] is None
    assert mf.xi_grad == pytest.approx(1 / math.log(1.25))


def test_signal_dies_out_to_zero_length():
    mf = MeanField("tanh", 0.5, 0.0)
    assert mf.q_star == 0.0 and mf.chi1 == pytest.approx(0.5, rel=1e-9)
    assert mf.xi_c == pytest.approx(1 / math.log(2), rel=1e-9)


# ---------------------------------------------------------------- activations and errors
def test_every_registered_activation_runs_and_derivatives_match_autograd():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for name in KNOWN_ACTIVATIONS:
        act = resolve_activation(name)
        _, exact = act.value_and_derivative(x)
        _, auto = type(act)(act.fn).value_and_derivative(x)  # same phi, autograd phi'
        assert torch.allclose(exact, auto, atol=1e-12), name
        mf = MeanField(name, 1.5, 0.1)
        assert math.isfinite(mf.chi1), name


def test_callables_use_autograd_and_agree_with_the_registry():
    by_name = MeanField("gelu", 2.0, 0.1)
    by_module = MeanField(torch.nn.GELU(), 2.0, 0.1)
    by_lambda = MeanField(lambda x: x * 0.5 * (1 + torch.erf(x / math.sqrt(2))), 2.0, 0.1)
    for other in (by_module, by_lambda):
        for name in ("q_star", "chi1", "xi_q", "xi_c"):
            assert getattr(other, name) == pytest.approx(getattr(by_name, name), rel=1e-12)
    chaotic = MeanField("tanh", 3.0, 0.05), MeanField(torch.nn.Tanh(), 3.0, 0.05)
    assert chaotic[1].c_star == pytest.approx(chaotic[0].c_star, abs=1e-12)


def test_unknown_activation_lists_known_names():
    with pytest.raises(ValueError, match="known names: .*tanh"):
        MeanField("tanhh", 1.0, 0.0)
    with pytest.raises(TypeError):
        MeanField(3, 1.0, 0.0)


def test_negative_or_nonfinite_variances_are_rejected():
    with pytest.raises(ValueError, match="sigma_w2 .*>= 0"):
        MeanField("tanh", -1.0, 0.0)
    with pytest.raises(ValueError, match="sigma_b2"):
        MeanField("tanh", 1.0, float("nan"))
    with pytest.raises(ValueError, match="sigma_b2"):
        critical_sigma_w2("tanh", -0.1)


def test_no_transition_is_a_clear_error():
    with pytest.raises(ValueError, match="no order-to-chaos transition"):
        critical_sigma_w2(lambda x: 1e-3 * x, 1.0)  # chi1 = 1e-6 sigma_w2


def test_critical_line_for_several_bias_variances_and_relu():
    line = critical_sigma_w2("tanh", [0.0, 0.05])
    assert line == pytest.approx([1.0, 1.761], abs=2e-3)
    assert critical_sigma_w2("relu", 0.3) == pytest.approx(2.0, abs=1e-9)  # He et al. 2015


# ---------------------------------------------------------------- phase diagram
def test_phase_diagram_agrees_with_mean_field():
    sw, sb = np.linspace(0.8, 4.0, 9), np.linspace(0.0, 1.0, 5)
    diagram = phase_diagram("tanh", sw, sb)
    assert diagram.chi1.shape == diagram.xi_c.shape == (5, 9)
    for i, j in [(0, 0), (1, 3), (2, 6), (4, 8), (4, 2), (0, 5)]:
        mf = MeanField("tanh", sw[j], sb[i])
        assert diagram.chi1[i, j] == pytest.approx(mf.chi1, rel=1e-9)
        assert diagram.q_star[i, j] == pytest.approx(mf.q_star, rel=1e-9, abs=1e-12)
        assert diagram.xi_c[i, j] == pytest.approx(mf.xi_c, rel=1e-6)
        assert diagram.c_star[i, j] == pytest.approx(mf.c_star, abs=1e-7)


def test_phase_diagram_closed_forms():
    diagram = phase_diagram("relu", [1.0, 1.5], [0.0, 0.5])
    np.testing.assert_allclose(diagram.chi1, [[0.5, 0.75], [0.5, 0.75]], rtol=1e-12)


def test_phase_diagram_rejects_bad_grids():
    with pytest.raises(ValueError, match="sigma_b2 grid"):
        phase_diagram("tanh", [1.0], [-0.1])
    with pytest.raises(ValueError, match="sigma_w2 grid"):
        phase_diagram("tanh", [], [0.1])


# ---------------------------------------------------------------- a real finite network
def _backprop_ratios(sigma_w2, sigma_b2, q_star, width, depth, seed):
    """log(||delta^l||^2 / ||delta^(l+1)||^2) for every layer pair, with plain autograd."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(width, generator=gen, dtype=torch.float64) * math.sqrt(q_star)
    h.requires_grad_(True)
    hidden = []
    for _ in range(depth):
        w = torch.randn(width, width, generator=gen, dtype=torch.float64)
        b = torch.randn(width, generator=gen, dtype=torch.float64) * math.sqrt(sigma_b2)
        h = (w * math.sqrt(sigma_w2 / width)) @ torch.tanh(h) + b
        h.retain_grad()
        hidden.append(h)
    readout = torch.randn(width, generator=gen, dtype=torch.float64)
    (hidden[-1] @ readout).backward()
    norms = torch.stack([(layer.grad**2).sum() for layer in hidden])
    return torch.log(norms[:-1] / norms[1:])


@pytest.mark.slow  # 3 x 3 networks of width 1000 and depth 20: about 5 s (10 s on a busy box)
def test_finite_width_backprop_ratio(validation_cases):
    case = validation_cases["finite_width_backprop_ratio"]
    setup = case["setup"]
    for key, expected in case["expected"].items():
        sigma_w2 = float(key)
        mf = MeanField("tanh", sigma_w2, setup["sigma_b2"])
        logs = torch.cat(
            [
                _backprop_ratios(
                    sigma_w2, setup["sigma_b2"], mf.q_star, setup["width"], setup["depth"], seed
                )
                for seed in range(setup["seeds"])
            ]
        )
        measured = math.exp(float(logs.mean()))  # geometric mean over layers and seeds
        assert measured == pytest.approx(expected, rel=case["rel_tol"]), key
        assert measured == pytest.approx(mf.chi1, rel=case["rel_tol"]), key


# ---------------------------------------------------------------- optional scipy
def test_importing_theory_does_not_import_scipy():
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    code = "import sys, gradwatch.theory; assert 'scipy' not in sys.modules, 'scipy imported'"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(src), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_missing_scipy_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[theory\]'"):
        critical_sigma_w2("tanh", 0.05)
