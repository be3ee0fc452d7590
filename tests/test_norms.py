"""One tensor's L2 norm, whichever kernel takes it, against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch.probes.grads import BLAS_MIN_NUMEL, GradNormPlan, vector_norm


def _reference(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach().double()))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(128, 256),  # contiguous float32: BLAS's dot
        lambda: torch.randn(4, 3, 5, dtype=torch.float64),
        lambda: torch.randn(256, 128).t(),  # dense, not contiguous: dot, in place
        lambda: torch.randn(256, 128)[:, ::2],  # gapped: ATen's norm
        lambda: torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last),
        lambda: torch.randn(1000, dtype=torch.float16) * 300,  # reduced in float32
        lambda: torch.randn(1000, dtype=torch.bfloat16),
        lambda: torch.randn(7, requires_grad=True),  # never through dot's autograd
        lambda: torch.tensor(-2.5),
        lambda: torch.zeros(0),
    ],
    ids=[
        "f32",
        "f64",
        "transposed",
        "sliced",
        "channels_last",
        "f16",
        "bf16",
        "grad",
        "0-d",
        "empty",
    ],  # fmt: skip
)
def test_norm_matches_float64_reference(make):
    torch.manual_seed(0)
    tensor = make()
    norm = vector_norm(tensor)
    assert norm.dim() == 0
    assert norm.dtype == (torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    assert math.isclose(float(norm.detach()), _reference(tensor), rel_tol=1e-6, abs_tol=0.0)


def test_a_large_float32_tensor_keeps_its_digits():
    # ten million entries of mean 1.5: float32 sums drift here; 2e-5 is 1000 roundings
    torch.manual_seed(0)
    tensor = torch.rand(10_000_000) + 1.0
    assert math.isclose(float(vector_norm(tensor)), _reference(tensor), rel_tol=2e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20])
def test_non_finite_or_overflowing_entries_give_a_non_finite_norm(value):
    tensor = torch.ones(1000)
    tensor[500] = value
    assert not math.isfinite(float(vector_norm(tensor)))


def test_a_plan_mixing_kernels_keeps_each_norm_with_its_parameter():
    """Large CPU tensors go to BLAS's dot, the rest to _foreach_norm; indices stay paired."""
    torch.manual_seed(0)
    big = BLAS_MIN_NUMEL
    params = [
        torch.nn.Parameter(torch.randn(big)),
        torch.nn.Parameter(torch.randn(3)),
        torch.nn.Parameter(torch.randn(big + 5, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(64, big // 64 + 1)),  # its gradient is transposed
        torch.nn.Parameter(torch.randn(7, dtype=torch.float16)),
        torch.nn.Parameter(torch.randn(big)),  # no gradient this step
    ]
    for p in params[:5]:
        p.grad = torch.randn_like(p) * 3
    params[3].grad = torch.randn(params[3].shape[1], 64).t()
    plan = GradNormPlan(range(6), params)
    assert sorted(plan.indices) == list(range(6))
    for missing in (False, True):
        if missing:
            params[5].grad = None
        else:
            params[5].grad = torch.randn(big)
        idx, norms = plan.norms(params)
        assert sorted(idx) == [i for i in range(6) if params[i].grad is not None]
        assert (idx is plan.indices) is not missing
        for i, norm in zip(idx, norms, strict=True):
            assert math.isclose(float(norm), _reference(params[i].grad), rel_tol=1e-6)


def test_a_row_holds_the_plans_norms_in_order_or_is_refused():
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(BLAS_MIN_NUMEL)),
        torch.nn.Parameter(torch.randn(5)),
        torch.nn.Parameter(torch.randn(64, BLAS_MIN_NUMEL // 64 + 1)),
        torch.nn.Parameter(torch.randn(9, dtype=torch.float16)),  # reduced in float32
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    plan = GradNormPlan(range(4), params)
    idx, row = plan.norms_row(params)
    assert idx is plan.indices and row.dim() == 1 and row.dtype == torch.float32
    for i, norm in zip(idx, row.tolist(), strict=True):
        assert math.isclose(norm, _reference(params[i].grad), rel_tol=1e-6)
    params[0].grad = params[1].grad = None  # frozen, say: skipped, the rest kept in order
    idx, row = plan.norms_row(params)
    assert idx == [i for i in plan.indices if i in (2, 3)]
    for i, norm in zip(idx, row.tolist(), strict=True):
        assert math.isclose(norm, _reference(params[i].grad), rel_tol=1e-6)
    params[2].grad = params[3].grad = None
    assert plan.norms_row(params) is None  # nothing to hold
    params[3].grad = torch.randn(9, dtype=torch.float16).to_sparse()
    assert plan.norms_row(params) is None  # a sparse gradient: the list path takes it
    mixed = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4).double())]
    for p in mixed:
        p.grad = torch.ones_like(p)
    assert GradNormPlan([0, 1], mixed).norms_row(mixed) is None  # two dtypes, two rows


def test_the_row_of_complex_parameters_holds_their_real_norms():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    _, row = GradNormPlan([0, 1], params).norms_row(params)
    assert row.dtype == torch.float32
    for p, norm in zip(params, row.tolist(), strict=True):
        expected = float(torch.linalg.vector_norm(p.grad.to(torch.complex128)))
        assert math.isclose(norm, expected, rel_tol=1e-6)


def test_gradients_made_with_create_graph_are_normed_without_a_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 160), torch.nn.Tanh(), torch.nn.Linear(160, 2))
    params = list(model.parameters())
    loss = model(torch.randn(8, 256)).pow(2).sum()
    for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True), strict=True):
        p.grad = g  # as backward(create_graph=True) leaves them, without its warning
    assert all(p.grad.requires_grad for p in params)
    plan = GradNormPlan(range(len(params)), params)
    _, row = plan.norms_row(params)
    _, norms = plan.norms(params)
    assert not row.requires_grad
    for i, a, b in zip(plan.indices, row.tolist(), norms, strict=True):
        assert math.isclose(a, _reference(params[i].grad), rel_tol=1e-6)
        assert math.isclose(float(b.detach()), a, rel_tol=1e-6)


class _Tagged(torch.Tensor):
    """A tensor subclass that refuses BLAS's dot, as a sharded or quantized one might."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.dot:
            raise RuntimeError("dot is not implemented for _Tagged")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_keeps_to_foreach_norm():
    torch.manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(BLAS_MIN_NUMEL))
    tagged = torch.nn.Parameter(torch.randn(BLAS_MIN_NUMEL)).as_subclass(_Tagged)
    params = [plain, tagged]
    plain.grad = torch.randn(BLAS_MIN_NUMEL)
    tagged.grad = torch.randn(BLAS_MIN_NUMEL).as_subclass(_Tagged)  # a subclass's gradient
    plan = GradNormPlan([0, 1], params)
    assert plan.norms_row(params) is None
    idx, norms = plan.norms(params)
    for i, norm in zip(idx, norms, strict=True):
        assert math.isclose(float(norm), _reference(params[i].grad), rel_tol=1e-6)


def test_the_scratch_serves_plain_cpu_tensors_only():
    from gradwatch.probes.scratch import SCRATCH_MAX_NUMEL, reusable_like

    scratch: dict = {}
    first = reusable_like(scratch, torch.ones(3, 5))
    again = reusable_like(scratch, torch.ones(15, dtype=torch.float32))
    assert first.data_ptr() == again.data_ptr() and again.shape == (15,)
    assert reusable_like(scratch, torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert reusable_like(None, torch.ones(3)) is None
    assert reusable_like(scratch, torch.ones(3, device="meta")) is None
    assert reusable_like(scratch, torch.ones(3).as_subclass(_Tagged)) is None
    assert reusable_like(scratch, torch.empty(SCRATCH_MAX_NUMEL + 1)) is None


def test_dense_gradients_are_read_in_place_and_the_rest_still_normed():
    from gradwatch.probes.grads import dense_flat

    torch.manual_seed(0)
    channels_last = torch.randn(64, 64, 3, 3).to(memory_format=torch.channels_last)
    transposed = torch.randn(300, 200).t()
    expanded = torch.randn(1, 40000).expand(3, 40000)  # overlapping: no flat view
    sliced = torch.randn(400, 200)[:, ::2]  # gapped: no flat view
    for dense in (channels_last, transposed):
        flat = dense_flat(dense)
        assert flat.data_ptr() == dense.data_ptr() and flat.numel() == dense.numel()
    assert dense_flat(expanded) is None and dense_flat(sliced) is None
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in (channels_last, transposed)]
    params += [torch.nn.Parameter(torch.empty(3, 40000)), torch.nn.Parameter(torch.empty(400, 100))]
    for p, g in zip(params, (channels_last, transposed, expanded, sliced), strict=True):
        p.grad = g
    plan = GradNormPlan(range(4), params)
    assert all(blas for _, _, blas in plan.groups)
    _, row = plan.norms_row(params)
    _, norms = plan.norms(params)
    # ATen's float32 norm, which takes the two without a flat view, rounds 1e5 entries to
    # about 2e-6 (see test_a_large_float32_tensor_keeps_its_digits); dot stays within 1e-6.
    for i, a, b in zip(plan.indices, row.tolist(), norms, strict=True):
        assert math.isclose(a, _reference(params[i].grad), rel_tol=1e-5)
        assert math.isclose(float(b), a, rel_tol=1e-6)
