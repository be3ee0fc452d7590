"""A 6-layer He-initialised ReLU MLP whose second and fourth Linear layers are frozen
(requires_grad=False: fixed random mixing layers); the optimizer gets only the other layers.

Expected: healthy. The frozen layers have no gradient at all (`.grad` stays None), which is by
design, not a vanishing gradient. Unlike a frozen backbone at the input, these sit in the
middle: the error still flows through them to the trainable first layer, and its size there
is comparable to the error at the head. The loss falls well below half its start.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 20)
y = ((x[:, :5] ** 2).sum(1, keepdim=True) - 5.0) / 3.0

model = nn.Sequential(
    nn.Linear(20, 64), nn.ReLU(),
    nn.Linear(64, 64), nn.ReLU(),  # frozen
    nn.Linear(64, 64), nn.ReLU(),
    nn.Linear(64, 64), nn.ReLU(),  # frozen
    nn.Linear(64, 64), nn.ReLU(),
    nn.Linear(64, 1),
)  # fmt: skip
for m in model:
    if isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He init keeps the scale per layer
        nn.init.zeros_(m.bias)
for frozen in (model[2], model[6]):
    frozen.requires_grad_(False)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
