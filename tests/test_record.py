"""Per-step buffers: a step's scalars are packed without losing a digit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradwatch.record import StepBuffer, to_host


@pytest.mark.parametrize("detail", [True, False], ids=["stacked", "read_at_flush"])
def test_cpu_scalars_of_mixed_dtypes_are_packed_exactly(detail):
    buf = StepBuffer(0, detail=detail)
    values = [
        torch.tensor(0.1, dtype=torch.float32),
        torch.tensor(2**40 + 1),  # a count: stacked with float32 norms, it would round
        torch.tensor(float("nan")),
        torch.tensor(float("-inf")),
    ]
    for k, v in enumerate(values):
        buf.add(("l", k, "x"), v)
    buf.stepped = True
    packed = buf.pack()
    to_host([packed])  # fills packed.values
    expected = [float(np.float32(0.1)), 2**40 + 1, float("nan"), float("-inf")]
    np.testing.assert_array_equal(packed.values, np.array(expected, dtype=np.float64))


def test_scalars_off_the_cpu_are_stacked_on_their_device():
    buf = StepBuffer(0, detail=False)
    buf.add(("p", 0, "gnorm"), torch.tensor(1.0, device="meta"))
    buf.add(("p", 1, "gnorm"), torch.tensor(2.0, device="meta"))
    buf.stepped = True
    (stacked,) = buf.pack().scalars
    assert stacked.device.type == "meta" and stacked.shape == (2,)


def test_plain_cpu_steps_are_read_at_flush_in_order_with_the_rest():
    """A plain step keeps its tensors until the flush; every value lands in its own slot."""
    packed = []
    for step, detail in enumerate([False, True, False]):
        buf = StepBuffer(step, detail=detail)
        buf.add(("p", 0, "gnorm"), torch.tensor(10.0 * step + 1))
        buf.add(("p", 1, "gnorm"), torch.tensor(10.0 * step + 2, dtype=torch.float64))
        buf.stepped = True
        packed.append(buf.pack())
    assert [p.on_host for p in packed] == [True, False, True]
    assert len(packed[0].scalars) == 2 and len(packed[1].scalars) == 1
    packed[2].scalars.append(torch.tensor([7.5]))  # a loss logged after the step closed
    peak = torch.tensor([0.0, 3.0, 4.0])
    (peak_read,) = to_host(packed, [peak])
    np.testing.assert_array_equal(packed[0].values, [1.0, 2.0])
    np.testing.assert_array_equal(packed[1].values, [11.0, 12.0])
    np.testing.assert_array_equal(packed[2].values, [21.0, 22.0, 7.5])
    np.testing.assert_array_equal(peak_read, [0.0, 3.0, 4.0])


@pytest.mark.parametrize("detail", [True, False], ids=["stacked", "read_at_flush"])
def test_a_row_of_norms_fills_one_slot_per_key_beside_scalars(detail):
    """GradNormPlan.norms_row gives a plain CPU step one tensor for all its gradient norms."""
    buf = StepBuffer(0, detail=detail)
    buf.add(("s", 0, "loss"), torch.tensor(0.5))
    buf.add_row([("p", i, "gnorm") for i in range(3)], torch.tensor([1.0, 2.0, 3.0]))
    buf.add(("l", 0, "fsum"), torch.tensor(-4.0, dtype=torch.float64))
    buf.stepped = True
    later = StepBuffer(1, detail=False)
    later.add_row([("p", i, "gnorm") for i in range(2)], torch.tensor([7.0, 8.0]))
    later.stepped = True
    packed = [buf.pack(), later.pack()]
    to_host(packed)
    assert len(packed[0].keys) == len(packed[0].values) == 5
    np.testing.assert_array_equal(packed[0].values, [0.5, 1.0, 2.0, 3.0, -4.0])
    np.testing.assert_array_equal(packed[1].values, [7.0, 8.0])


def test_a_row_among_scalars_off_the_cpu_is_gathered_in_order():
    buf = StepBuffer(0, detail=False)
    buf.add(("s", 0, "loss"), torch.tensor(1.0, device="meta"))
    buf.add_row([("p", 0, "gnorm"), ("p", 1, "gnorm")], torch.zeros(2, device="meta"))
    buf.stepped = True
    (gathered,) = buf.pack().scalars
    assert gathered.device.type == "meta" and gathered.shape == (3,)
