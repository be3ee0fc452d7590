"""Per-step buffers: a step's scalars are packed without losing a digit."""

from __future__ import annotations

import numpy as np
import torch

from gradwatch.record import StepBuffer, to_host


def test_cpu_scalars_of_mixed_dtypes_are_packed_exactly():
    buf = StepBuffer(0, detail=True)
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
