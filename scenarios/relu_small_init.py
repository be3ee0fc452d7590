"""An 8-layer ReLU MLP (width 128, no hidden biases) whose weights start at N(0, 0.01^2),
trained with SGD + momentum on a smooth regression target.

Expected: vanishing gradients. He init would use std sqrt(2 / 128) = 0.125; with 0.01 each
Linear + ReLU multiplies the signal by about 0.01 * sqrt(128 / 2) = 0.08. Both the forward
activations and the backpropagated error therefore shrink ~12x per layer: the error that
reaches the first layer is ~1e-9 of the error at the output. The weight-gradient norms, however,
are about the same (~1e-9) in every hidden layer, because each is the product of the layer's
input (shrinking with depth) and its error (shrinking toward the input): comparing the first
layer's weight gradient with the others' shows nothing. The output is almost only the last
bias, so the loss stays near the target's variance. The units are tiny, not dead: under 15%
of them are zero for a whole batch.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 32)
y = torch.sin(x[:, :4].sum(1, keepdim=True))

layers = []
for i in range(8):
    layers += [nn.Linear(32 if i == 0 else 128, 128, bias=False), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(128, 1))
for m in model.modules():
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.01)  # the mistake: a fixed small std, not sqrt(2 / fan_in)

opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
