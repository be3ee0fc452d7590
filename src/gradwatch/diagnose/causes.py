"""Likely causes of a finding, each scored from measured evidence, and the remedies they call for."""

from __future__ import annotations

import math

import numpy as np

from ..remedies.catalogue import REMEDIES
from .depth import ORDERS
from .findings import Cause, Remedy, agree, layer_names
from .profile import RunView, nanmedian

SATURATING_KINDS = {"sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign"}
# Weight std x sqrt(fan_in) that keeps the signal's scale through each activation:
# He et al. 2015 for ReLU, the mean-field critical point sigma_w^2 = 1 for tanh at
# sigma_b = 0 (Poole et al. 2016), 1 for a linear map.
HEALTHY_INIT_GAIN = {"relu": math.sqrt(2.0), "relu6": math.sqrt(2.0), "tanh": 1.0, None: 1.0}
INIT_TOLERANCE = 2.0  # a factor of 2 either way compounds to 2^depth
HEALTHY_UPDATE_RATIO = 1e-3  # ||update|| / ||weight|| per step (CS231n)
HIGH_UPDATE_RATIO = 1e-2  # an order of magnitude above it

REMEDIES_FOR: dict[str, list[str]] = {
    "saturating_activation": ["relu", "gelu", "batchnorm", "residual"],
    "init_too_small": ["he_init", "xavier_init", "lsuv_init"],
    "init_too_large": ["he_init", "xavier_init", "clip_grad_norm"],
    "depth_without_normalization": ["residual", "batchnorm", "layernorm"],
    "recurrent_radius_above_1": ["clip_grad_norm", "orthogonal_init", "lstm_gru"],
    "recurrent_radius_below_1": ["lstm_gru", "orthogonal_init"],
    "learning_rate_too_high": ["lower_lr", "warmup", "clip_grad_norm"],
    "learning_rate_too_low": ["raise_lr", "he_init", "relu"],
    "log_of_zero": ["log_softmax"],
    "low_precision_overflow": ["loss_scaling", "clip_grad_norm"],
    "float32_overflow": ["stable_exp", "lower_lr", "clip_grad_norm"],
    "gradient_norm_overflow": ["clip_grad_norm", "lower_lr"],
    "dead_relu": ["lower_lr", "leaky_relu", "he_init"],
}


def remedies_for(causes: list[Cause]) -> list[Remedy]:
    """Remedies in the order of the causes they answer, each once."""
    seen: list[str] = []
    for cause in causes:
        for rid in REMEDIES_FOR.get(cause.id, []):
            if rid not in seen:
                seen.append(rid)
    return [REMEDIES[r] for r in seen]


def rank(causes: list[Cause | None]) -> list[Cause]:
    return sorted((c for c in causes if c is not None), key=lambda c: -c.score)


def _model_layers(view: RunView, model: str) -> list[int]:
    return [
        j
        for j, info in enumerate(view.info)
        if (info.model or "") == model and info.exec_order is not None
    ]


def saturating_activations(view: RunView, model: str) -> Cause | None:
    cols = [j for j in _model_layers(view, model) if view.info[j].kind in SATURATING_KINDS]
    if not cols:
        return None
    kinds = sorted({view.info[j].kind for j in cols})
    sat = view.m("saturated_frac")[view.finite_rows][:, cols]
    frac = float(nanmedian(sat)) if np.isfinite(sat).any() else 0.0
    n_sigmoid = sum(view.info[j].kind == "sigmoid" for j in cols)
    evidence = {
        "activation_layers": len(cols),
        "kinds": kinds,
        "median_saturated_frac": round(frac, 4),
    }
    saturated = (
        f"a median {frac:.0%} of their units saturated"
        if frac >= 0.01
        else "almost none of their units saturated"
    )
    text = f"{len(cols)} saturating activation layers ({', '.join(kinds)}); {saturated}"
    if n_sigmoid:
        bound = 0.25**n_sigmoid
        evidence["sigmoid_derivative_bound"] = bound
        text += (
            f"; {'yet ' if frac < 0.01 else ''}sigmoid' <= 0.25 even unsaturated, so {n_sigmoid} sigmoid "
            f"layers scale the error by at most 0.25^{n_sigmoid} = {bound:.1e}"
        )
    return Cause("saturating_activation", text, 2.0 + 3 * frac + 0.1 * n_sigmoid, evidence)


def _activation_after(view: RunView, cols: list[int], j: int) -> str | None:
    """The activation family of the first activation layer after weighted layer j."""
    later = [c for c in cols if view.info[c].exec_order > view.info[j].exec_order]
    for c in sorted(later, key=lambda c: view.info[c].exec_order):
        if view.info[c].n_params and view.info[c].fan_in:
            return None
        if view.info[c].kind:
            return view.info[c].kind
    return None


def init_scale(view: RunView, model: str, too: str) -> Cause | None:
    """Weight std x sqrt(fan_in) at the first step against the He/critical value."""
    cols = _model_layers(view, model)
    weight = view.run.param_matrix("weight_norm") if "weight_norm" in view.run.metrics else None
    if weight is None:
        return None
    rows = np.flatnonzero(np.isfinite(weight).any(axis=1))
    if not rows.size:
        return None
    ratios, details = [], []
    layer_of = {p.id: p for p in view.run.param_info}
    col_of = {info.id: j for j, info in enumerate(view.info)}
    for k, p in enumerate(view.run.param_info):
        j = col_of.get(p.layer_id)
        if (
            j not in cols
            or not p.name.endswith("weight")
            or not view.info[j].fan_in
            or "Norm" in view.info[j].type
        ):
            continue
        kind = _activation_after(view, cols, j)
        if kind in SATURATING_KINDS - {"tanh"}:
            continue  # no scale makes sigmoid layers healthy; the activation is the cause
        norm = weight[rows[0], k]
        if not np.isfinite(norm):
            continue
        gain = norm / math.sqrt(layer_of[p.id].numel) * math.sqrt(view.info[j].fan_in)
        target = HEALTHY_INIT_GAIN.get(kind, 1.0)
        ratios.append(gain / target)
        details.append((view.info[j].name, round(gain, 3), round(target, 3)))
    if not ratios:
        return None
    ratio = float(np.median(ratios))
    off = ratio < 1 / INIT_TOLERANCE if too == "small" else ratio > INIT_TOLERANCE
    if not off:
        return None
    depth = len(ratios)
    text = (
        f"init scale: weight std x sqrt(fan_in) is {ratio:.2f}x the He/critical value in the median layer "
        f"(e.g. {details[0][0]}: {details[0][1]} vs {details[0][2]}); over {depth} layers that compounds "
        f"to {ratio**depth:.1e}"
    )
    evidence = {"median_ratio_to_healthy": round(ratio, 4), "layers": details[:8]}
    return Cause(f"init_too_{too}", text, 1.5 + abs(math.log2(ratio)), evidence)


def depth_without_normalization(view: RunView, model: str, depth: int) -> Cause | None:
    types = {view.info[j].type for j in _model_layers(view, model)}
    if depth < 8 or any("Norm" in t for t in types):
        return None
    text = (
        f"{depth} parametrised layers in series with no normalization layers: without residual paths "
        "the error passes through every layer's Jacobian"
    )
    return Cause("depth_without_normalization", text, 1.0, {"depth": depth})


# A learning rate whose ordinary steps rewrite the whole weight (a median update/weight ratio
# of 1, update_ratio.BLOWUP) blows a network up by itself; its cause scores 1 + log10(1 / 1e-3).
RECURRENT_IN_FAILING_LAYER = 1.0 + math.log10(1.0 / HEALTHY_UPDATE_RATIO)


def recurrent_radius(
    view: RunView,
    model: str,
    above: bool,
    layers: list[str] | tuple[str, ...] = (),
    kinds: tuple[str, ...] = ("RNN", "LSTM", "GRU"),
) -> Cause | None:
    """The spectral radius of a recurrent layer at its first measurement, against 1.

    Backpropagation through time multiplies the error by the recurrent Jacobian once per
    time step, so a radius above 1 lets it grow with the sequence length and one below 1
    lets it shrink (Pascanu et al. 2013). The sequence length is not recorded, so the cause
    gives the number of steps over which radius^k reaches 100 or 1/100 (``ORDERS``, the span
    the depth rules judge). That is the rate of the linearised recurrence (Gelfand's
    formula), an estimate rather than a bound: the activation's derivative (at most 1 for
    tanh and ReLU) changes each step's Jacobian.

    The first measurement (at the first flush after a detailed step) reads the matrix the
    run started from, unless the first updates already moved it; a radius that training
    pushed above 1 later is the updates' doing, which the learning rate cause speaks for.

    A vanilla RNN that is itself among ``layers`` (the layers whose gradient explodes) and
    starts above 1 amplifies its error through time from the first step, whatever the
    learning rate: it scores as a learning rate whose ordinary steps rewrite the whole
    weight would (``RECURRENT_IN_FAILING_LAYER``), so only a learning rate at least that
    high ranks above it. Elsewhere a vanilla RNN scores 2.5; gated cells (LSTM, GRU) carry
    the error in their cell state past the recurrent matrix, so its radius says less: 1.
    """
    cols = [j for j in _model_layers(view, model) if view.info[j].type in kinds]
    radius = view.m("recurrent_radius")
    found = []
    for j in cols:
        values = radius[:, j][np.isfinite(radius[:, j])]
        if values.size:
            found.append((view.info[j].name, view.info[j].type, float(values[0])))
    hits = [f for f in found if (f[2] > 1.0 if above else f[2] < 0.9)]
    if not hits:
        return None
    name, kind, r = max(hits, key=lambda f: abs(math.log10(max(f[2], 1e-300))))
    direction, change = ("above", "grows") if above else ("below", "shrinks")
    steps = math.ceil(ORDERS / abs(math.log10(r))) if r > 0 else 1
    text = (
        f"the recurrent matrix of {name} ({kind}) has spectral radius {r:.3g} from the start, {direction} 1: "
        f"backpropagation through time multiplies the error by it once per time step, which {change} it "
        f"{10**ORDERS:.0f}-fold within {steps} steps ({r:.3g}^{steps} = {r**steps:.1e})"
    )
    if kind != "RNN":
        score = 1.0
    elif above and name in layers:
        score = RECURRENT_IN_FAILING_LAYER
    else:
        score = 2.5
    evidence = {"layer": name, "spectral_radius": r, f"steps_to_{change[:-1]}_100x": steps}
    return Cause(f"recurrent_radius_{direction}_1", text, score, evidence)


def learning_rate(view: RunView, rows: np.ndarray, high: bool) -> Cause | None:
    """Updates too large for the weights: a layer whose median update/weight ratio over ``rows`` is high.

    The ratio is the learning rate times the gradient over the weight, so a step whose
    gradient spiked has a large ratio at any learning rate. The median of each layer over
    the steps given reads the learning rate; the largest single ratio would read the spike.
    Callers pass the steps up to the harm. The cause holds when the layer that moves most
    moves more than ``HIGH_UPDATE_RATIO`` of its norm in its median step.
    """
    ratio = view.m("update_ratio")[rows]
    if not high or not np.isfinite(ratio).any():
        return None
    per_layer = nanmedian(ratio, axis=0)
    col = int(np.nanargmax(per_layer))
    med, top = float(per_layer[col]), float(np.nanmax(ratio))
    if med <= HIGH_UPDATE_RATIO:
        return None
    name = view.names[col]
    text = (
        f"learning rate too high for the weights' scale: the median step moves {layer_names([name])} by "
        f"{med:.1e} of its weight norm (up to {top:.1e}; about 1e-3 is healthy)"
    )
    evidence = {"layer": name, "median_update_ratio": med, "max_update_ratio": top}
    return Cause(
        "learning_rate_too_high", text, 1.0 + math.log10(med / HEALTHY_UPDATE_RATIO), evidence
    )


def log_of_zero(view: RunView, row: int, col: int) -> Cause | None:
    mean = view.m("act_mean")[row, col]
    info = view.info[col]
    if mean == -np.inf and not info.n_params:
        text = (
            f"{info.name} ({info.type}) produced -inf, the signature of log(0): a softmax or sigmoid that "
            "underflowed to exactly 0 before a log"
        )
        return Cause("log_of_zero", text, 5.0, {"module": info.name, "output_mean": "-inf"})
    return None


def low_precision_overflow(view: RunView, row: int, col: int) -> Cause | None:
    """inf where the same layer's values were moderate before: an overflow of float16 or of an exp.

    The run records whether it computed in float16 (meta ``low_precision``). Without
    float16 (float32 or bfloat16, which share a range up to 3.4e38) the cause is an
    exp, a power or a division that took moderate values past that range in one step.
    Runs recorded before the flag existed get both explanations.
    """
    mean = view.m("act_mean")[row, col]
    if not np.isinf(mean) or row == 0:
        return None
    earlier = np.abs(np.concatenate([view.m(m)[:row, col] for m in ("act_mean", "act_std")]))
    earlier = earlier[np.isfinite(earlier)]
    if not earlier.size or earlier.max() >= 1e30:
        return None
    peak = float(earlier.max())
    name = view.info[col].name
    evidence = {"largest_earlier_value": peak}
    precision = view.run.meta.get("low_precision")
    if precision in ("0", "bfloat16"):
        dtype = "float32" if precision == "0" else "bfloat16 (float32's range)"
        text = (
            f"{name} overflowed to inf from values of scale {peak:.3g} in a run computed in {dtype}: "
            "an exp, a power or a division by a small value took moderate values past 3.4e38"
        )
        # Moderate values to inf in one step: no update of a few percent does that.
        return Cause("float32_overflow", text, 3.0, {**evidence, "precision": dtype})
    reason = (
        "the run computes in float16, whose largest value is 65504"
        if precision == "float16"
        else "a float16 overflow (its largest value is 65504), or an exp or division of moderate values"
    )
    text = f"{name} overflowed to inf from values of scale {peak:.3g}, far inside float32's range: {reason}"
    # Unknown precision: values near float16's ceiling point to it.
    score = 3.0 if precision == "float16" or 1e3 < peak < 1e5 else 1.0
    return Cause("low_precision_overflow", text, score, evidence)


# sqrt of float32's largest value: a norm past it squares past 3.4e38, to inf.
FLOAT32_NORM_LIMIT = 1.8e19


def gradient_norm_overflow(view: RunView, row: int, layers: list[str]) -> Cause | None:
    """A gradient norm of +inf, not NaN: an inf entry, or finite entries too large to square.

    Norms are summed squares in float32 (as ``clip_grad_norm_`` takes them), so a
    gradient whose entries are all finite reads inf once its norm passes about
    1.8e19. The norm at the step recorded before says whether it was climbing there.
    """
    cols = [view.names.index(name) for name in layers if name in view.names]
    norms = view.m("grad_norm")
    if not cols or not np.all(norms[row, cols] == np.inf):
        return None
    text = (
        f"the gradient {agree(layers, 'norm', 'norms')} of {layer_names(layers)} "
        f"{agree(layers, 'is', 'are')} inf, not NaN: an entry is inf (a division by zero, or a "
        f"product that exploded), or every entry is finite and the norm passed float32's "
        f"{FLOAT32_NORM_LIMIT:.1e}, past which its sum of squares overflows"
    )
    evidence: dict[str, object] = {"layers": layers}
    before = float(norms[row - 1, cols].max()) if row else math.nan
    if math.isfinite(before):
        step = int(view.steps[row - 1])
        text += f"; {agree(layers, 'it was', 'the largest was')} {before:.2g} at step {step}"
        evidence.update(step_before=step, grad_norm_before=before)
    return Cause("gradient_norm_overflow", text, 2.0, evidence)
