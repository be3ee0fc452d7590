"""A 12-layer tanh MLP whose weights start at N(0, 1), trained with SGD on a classification task.

Expected: saturation and exploding gradients. With std 1 on 64 inputs the per-layer weight
scale is sigma_w = std * sqrt(fan_in) = 8, far above the sigma_w = 1 edge of chaos for tanh
(Xavier/LeCun init would use std 1/sqrt(64) = 0.125). The pre-activations have a std of
several units, so most tanh outputs sit at +-1 where tanh' < 0.01, yet the few units in the
linear range are multiplied by 8x per layer on the way back: the backpropagated error grows by
about 2x per layer toward the input, ~1e3-1e4x over the whole depth. Training barely moves the
loss, because the network is a chaotic, almost random function of its input.
"""

import torch
from torch import nn

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
x = torch.randn(2048, 32)
with torch.no_grad():
    y = teacher(x).argmax(1)

layers = []
for i in range(12):
    layers += [nn.Linear(32 if i == 0 else 64, 64), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
for m in model.modules():
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=1.0)  # the mistake: std 1 regardless of fan_in
        nn.init.zeros_(m.bias)

opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
