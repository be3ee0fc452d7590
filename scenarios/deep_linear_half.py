"""A deep linear network: 30 bias-free 64x64 Linear layers, each initialised to W = 0.5 I,
trained with SGD to fit a linear map.

Expected: vanishing gradients, with flat weight-gradient norms. The backpropagated error
halves at every layer, so the first layer's error is 0.5^29 = 2e-9 of the last one's. The
forward signal also halves at every layer, and layer l's weight gradient is the outer product
of its input (0.5^(l-1) |x|) and its error (0.5^(30-l) |e|), so every layer's gradient norm is
the same, ~1e-9 of a healthy one: comparing the first layer's gradient norm with the last's
shows nothing wrong. The output is ~1e-9 x, and the loss stays where it starts.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 64)
y = x @ torch.randn(64, 64) / 8

model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(30)])
with torch.no_grad():
    for layer in model:
        layer.weight.copy_(0.5 * torch.eye(64))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(150):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
