"""A GELU MLP with LayerNorm, compiled with torch.compile (the default inductor backend) and
trained with AdamW on a smooth regression target.

Expected: healthy. The compiled module is a wrapper (`torch._dynamo.OptimizedModule`) around
`model`; the optimizer holds `model`'s parameters, and the gradients and updates are those of
the eager model. The loss falls far below its start. The first step compiles the forward and
backward graphs, which takes tens of seconds with a cold inductor cache on a small CPU.
No fallback: if compilation fails, the script fails.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 16)
y = torch.sin(x[:, :2].sum(1, keepdim=True)) + 0.5 * x[:, 2:3]

model = nn.Sequential(
    nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(),
    nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(),
    nn.Linear(64, 1),
)  # fmt: skip
compiled = torch.compile(model)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for _ in range(150):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(compiled(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
