"""Every label in scenarios/labels.json, checked by a measurement that does not use gradwatch.

Each scenario runs once in this process under ``independent_probe`` (torch's own global hooks).
A required kind must show its defining property at the stated threshold, a forbidden kind
must be absent by the same measurement, and a healthy script must train and stay in the
healthy band. A second test per script checks the specific claim its docstring makes (the
trap it sets). The thresholds below are the whole definition of each kind here.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
from pathlib import Path

import independent_probe as ip
import pytest
import torch

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
LABELS = json.loads((SCENARIOS / "labels.json").read_text())
SCRIPTS = sorted(name for name in LABELS if not name.startswith("_"))

VANISHING = 1e-2  # error norm at the first layer below 1% of the last layer's (median, 20 steps)
EXPLODING = 1e2  # ... or above 100x it
SPIKE = 100.0  # a gradient norm >= 100x the median of its previous 20 steps
SATURATED = 0.5  # > 50% of tanh/sigmoid outputs with derivative < 1% of its maximum
DEAD = 0.9  # >= 90% of a ReLU layer's units zero for the whole batch
HEALTHY_SPREAD = 100.0  # healthy: error norms within 100x across layers (median over steps)
HEALTHY_FRACTION = 0.5  # healthy: no layer with >= 50% dead or saturated units
LOSS_FALL = 0.7  # healthy: the last losses at most 70% of the first ones

KINDS = {
    "vanishing_gradient",
    "exploding_gradient",
    "nonfinite",
    "dead_units",
    "saturation",
    "update_ratio",
    "loss_plateau",
    "loss_divergence",
}


@functools.cache
def measured(name: str) -> ip.Probe:
    probe = ip.run(SCENARIOS / name)
    assert probe.error is None, f"{name} raised {probe.error!r}"
    return probe


@pytest.fixture(scope="module", autouse=True)
def _release_the_runs():
    """Drop every run's globals afterwards: a live compiled model leaves dead weak proxies
    that break later tests which walk gc.get_objects()."""
    yield
    measured.cache_clear()
    gc.collect()


# ---------------------------------------------------------------- what each kind means here
def _where_ratios(p: ip.Probe, where: list[str]) -> dict[str, float]:
    err = p.error_norm()
    return {w: ip.depth_ratio(p, first=w) for w in where if w in err}


def has_vanishing(p: ip.Probe, where: list[str]) -> None:
    ratio = ip.depth_ratio(p)
    assert ratio < VANISHING, f"first/last error ratio {ratio:.3g}"
    if where:
        at = _where_ratios(p, where)
        assert min(at.values()) < VANISHING, f"error ratios at {at}"


def has_exploding(p: ip.Probe, where: list[str]) -> None:
    names = where or list(p.error_norm())
    at = {w: r for w, r in _where_ratios(p, names).items() if math.isfinite(r)}
    spikes = {w: ip.grad_spike(p, w)[0] for w in names}
    assert max(at.values(), default=0) > EXPLODING or max(spikes.values()) >= SPIKE, (at, spikes)


def has_nonfinite(p: ip.Probe, where: list[str]) -> None:
    assert p.first_nonfinite is not None, "everything stayed finite"
    if where:
        assert p.first_nonfinite[0] == "forward", p.first_nonfinite
        step, module, _ = p.first_forward_nonfinite
        assert p.name(module) in where, f"first non-finite output: {p.name(module)} at {step}"


def has_saturation(p: ip.Probe, where: list[str]) -> None:
    sat = p.saturated()
    names = [w for w in where if w in sat] or list(sat)
    best = max((ip.median(sat[n]) for n in names), default=0.0)
    assert best > SATURATED, f"saturated fraction {best:.3f}"


def has_dead_units(p: ip.Probe, where: list[str]) -> None:
    dead = p.dead()
    names = [w for w in where if w in dead] or list(dead)
    best = max((ip.median(dead[n]) for n in names), default=0.0)
    assert best >= DEAD, f"dead fraction {best:.3f}"


MUST = {
    "vanishing_gradient": has_vanishing,
    "exploding_gradient": has_exploding,
    "nonfinite": has_nonfinite,
    "saturation": has_saturation,
    "dead_units": has_dead_units,
}


def no_vanishing(p: ip.Probe) -> None:
    ratio = ip.depth_ratio(p)
    assert ratio >= VANISHING, f"first/last error ratio {ratio:.3g}"


def no_exploding(p: ip.Probe) -> None:
    ratio = ip.depth_ratio(p)
    assert not ratio > EXPLODING, f"first/last error ratio {ratio:.3g}"
    spikes = {n: ip.grad_spike(p, n) for n in p.module_series("grad")}
    assert all(s < SPIKE for s, _ in spikes.values()), spikes


def no_nonfinite(p: ip.Probe) -> None:
    assert p.first_nonfinite is None, p.first_nonfinite


def no_dead_units(p: ip.Probe) -> None:
    fraction, layer = ip.worst(p.dead())
    assert fraction < HEALTHY_FRACTION, f"{layer}: {fraction:.3f} dead"


def no_saturation(p: ip.Probe) -> None:
    fraction, layer = ip.worst(p.saturated())
    assert fraction < HEALTHY_FRACTION, f"{layer}: {fraction:.3f} saturated"


def no_loss_divergence(p: ip.Probe) -> None:
    assert all(math.isfinite(v) for v in p.losses)
    assert ip.loss_drop(p) <= 1.0


MUST_NOT = {
    "vanishing_gradient": no_vanishing,
    "exploding_gradient": no_exploding,
    "nonfinite": no_nonfinite,
    "dead_units": no_dead_units,
    "saturation": no_saturation,
    "loss_divergence": no_loss_divergence,
}

# A GAN's two losses oscillate around an equilibrium; its progress is checked on the samples.
LOSS_IS_NO_MEASURE = {"gan_two_optimizers.py"}


def healthy_band(p: ip.Probe, name: str) -> None:
    no_nonfinite(p)
    if p.compiled_graphs and not p.error_norm():  # the probe does not look inside the graph
        spread = ip.depth_spread(p, "grad")
    else:
        spread = ip.depth_spread(p)
    assert spread < HEALTHY_SPREAD, f"norms spread {spread:.3g}x across layers"
    no_dead_units(p)
    no_saturation(p)
    if name not in LOSS_IS_NO_MEASURE:
        drop = ip.loss_drop(p)
        assert drop <= LOSS_FALL, f"loss only fell to {drop:.2f} of its start"


# ---------------------------------------------------------------- the tests
def test_labels_cover_every_script_with_known_kinds():
    assert len(SCRIPTS) >= 13
    assert set(SCRIPTS) == {p.name for p in SCENARIOS.glob("*.py")}
    for name in SCRIPTS:
        label = LABELS[name]
        assert set(label) <= {"healthy", "must", "may", "must_not", "where"}, name
        kinds = [*label.get("must", []), *label.get("may", []), *label.get("must_not", [])]
        assert set(kinds) <= KINDS, name
        assert len(kinds) == len(set(kinds)), f"{name}: a kind is listed twice"
        assert set(label.get("where", {})) <= set(label.get("must", [])), name
        assert label["healthy"] == (not label.get("must")), name
        # only what this test can measure may be required or forbidden
        assert set(label.get("must", [])) <= set(MUST), name
        assert set(label.get("must_not", [])) <= set(MUST_NOT), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_label_holds(name):
    label, p = LABELS[name], measured(name)
    assert p.opt_steps > 0 and p.models, "no optimizer step or no model found"
    modules = {p.name(m) for model in p.models for m in model.modules()}
    for kind, where in label.get("where", {}).items():
        assert set(where) <= modules, f"{kind}: unknown module names {set(where) - modules}"
    for kind in label.get("must", []):
        MUST[kind](p, label.get("where", {}).get(kind, []))
    for kind in label.get("must_not", []):
        MUST_NOT[kind](p)
    if label["healthy"]:
        healthy_band(p, name)


# ---------------------------------------------------------------- each docstring's own claim
def _layer_medians(p: ip.Probe, names) -> list[float]:
    grads = p.module_series("grad")
    return [ip.median(grads[n].values()) for n in names]


def relu_small_init(p):
    hidden = [str(i) for i in range(0, 16, 2)]
    g = _layer_medians(p, hidden)
    assert max(g) / min(g) < 10, f"hidden weight-gradient norms are not flat: {g}"
    assert ip.depth_ratio(p) < 1e-6


def deep_linear_half(p):
    g = _layer_medians(p, [str(i) for i in range(30)])
    assert max(g) / min(g) < 1.5, "weight-gradient norms should be flat across depth"
    assert 0.3 < ip.depth_ratio(p) / 0.5**29 < 3, "the error should halve per layer"


def tanh_large_init(p):
    assert all(ip.median(v) > SATURATED for v in p.saturated().values()), "every tanh saturated"
    err = p.error_norm()
    gains = [ip.depth_ratio(p, first=str(i)) ** (1 / ((24 - i) / 2)) for i in (0, 2, 4)]
    assert all(g > 1.3 for g in gains), f"error should grow per layer toward the input: {gains}"
    assert len(err) == 13


def rnn_high_lr(p):
    grads = p.module_series("grad")["rnn"]
    early = [v for s, v in grads.items() if s < 30]
    assert max(early) < 2 and all(math.isfinite(v) for v in p.losses[:30]), "an ordinary start"
    spike, at = ip.grad_spike(p, "rnn")
    assert spike >= 1e3 and at >= 30, (spike, at)
    assert not math.isfinite(p.losses[-1])


def fp16_attention_overflow(p):
    step, module, dtype = p.first_forward_nonfinite
    assert (step, p.name(module), dtype) == (0, "attn", torch.float16)
    g = p.globals  # a fresh model: finite in float32, non-finite under float16 autocast
    torch.manual_seed(0)
    model, batch = g["Model"](), g["x"][:32]
    with torch.no_grad():
        assert torch.isfinite(model(batch)).all()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(model(batch)).all()


def bce_log_zero(p):
    kind, step, module = p.first_nonfinite
    assert kind == "loss" and module is None and step > 5, p.first_nonfinite
    assert p.first_forward_nonfinite is None or p.first_forward_nonfinite[0] > step


def transformer_prenorm(p):
    assert all(layer.norm_first for layer in p.globals["model"].encoder.layers)


def gan_two_optimizers(p):
    assert len(p.optimizers) == 2 and len(p.models) == 2
    g = p.globals
    G, z = copy.deepcopy(g["G"]), torch.randn(1024, g["Z"])
    index = next(i for i, m in enumerate(p.models) if m is g["G"])
    target = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        final = (G(z).mean(0) - target).norm().item()
        for param, initial in zip(G.parameters(), p.initial_params[index], strict=True):
            param.copy_(initial)
        start = (G(z).mean(0) - target).norm().item()
    assert final < 0.3 * start, (start, final)


def lstm_tied_lm(p):
    model = p.globals["model"]
    assert model.decoder.weight is model.encoder.weight

    def layer_grad(k):  # the median over steps of one LSTM layer's weight-gradient norm
        ih, hh = (
            p.param_series(getattr(model.lstm, f"{w}_l{k}")) for w in ("weight_ih", "weight_hh")
        )
        return ip.median(math.hypot(ih[s], hh[s]) for s in ih)

    assert layer_grad(0) < layer_grad(1), "the first LSTM layer gets the smaller gradient"


def partly_frozen(p):
    model = p.globals["model"]
    assert all(q.grad is None for i in (2, 6) for q in model[i].parameters())
    err = p.error_norm()
    assert "0" in err and "2" in err, "the error must flow through the frozen layers"


def unused_params(p):
    model = p.globals["model"]
    for unused in (model.aux_head, model.embed_proj):
        assert all(q.grad is None for q in unused.parameters())
        assert not any(m in p.order for m in unused.modules())


def compiled_mlp(p):
    from torch._dynamo.eval_frame import OptimizedModule

    assert isinstance(p.globals["compiled"], OptimizedModule)
    assert p.compiled_graphs > 0, "dynamo compiled nothing"


def zero_init_residual(p):
    err = p.error_norm()
    fc1 = [n for n in err if n.endswith(".fc1")]
    assert len(fc1) == 8
    assert all(err[n][0] == 0.0 and err[n][1] > 0 for n in fc1)
    grads = p.module_series("grad")
    assert all(grads[n][0] == 0.0 and grads[n][1] > 0 for n in fc1)


def large_target_scale(p):
    g = p.module_series("grad")["net.4"]
    steps = sorted(g)
    assert g[0] > 1e4, "large first gradients"
    assert ip.median(g[s] for s in steps[-50:]) < g[0] / 10, "...that fall as the loss falls"
    assert ip.loss_drop(p) < 1e-2


def sparse_embedding(p):
    grad = p.globals["model"].embed.weight.grad
    untouched = (grad.abs().sum(1) == 0).float().mean().item()
    assert untouched > 0.8, f"only {untouched:.2f} of the rows got no gradient"


CLAIMS = {
    f.__name__ + ".py": f
    for f in (
        relu_small_init,
        deep_linear_half,
        tanh_large_init,
        rnn_high_lr,
        fp16_attention_overflow,
        bce_log_zero,
        transformer_prenorm,
        gan_two_optimizers,
        lstm_tied_lm,
        partly_frozen,
        unused_params,
        compiled_mlp,
        zero_init_residual,
        large_target_scale,
        sparse_embedding,
    )
}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_docstring_claim_holds(name):
    CLAIMS[name](measured(name))


def test_probe_removes_every_hook_even_when_the_script_fails(tmp_path):
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optimizer_mod

    script = tmp_path / "fails.py"
    script.write_text(
        "import torch\nm = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "m(torch.randn(4, 2)).sum().backward()\nopt.step()\nraise RuntimeError('boom')\n"
    )
    before = (
        len(module_mod._global_forward_hooks),
        len(optimizer_mod._global_optimizer_pre_hooks),
        len(optimizer_mod._global_optimizer_post_hooks),
        torch.Tensor.backward,
    )
    p = ip.run(script)
    assert isinstance(p.error, RuntimeError) and p.opt_steps == 1 and len(p.losses) == 1
    after = (
        len(module_mod._global_forward_hooks),
        len(optimizer_mod._global_optimizer_pre_hooks),
        len(optimizer_mod._global_optimizer_post_hooks),
        torch.Tensor.backward,
    )
    assert after == before
