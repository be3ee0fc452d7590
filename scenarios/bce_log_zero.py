"""A binary classifier trained with a hand-written cross-entropy on sigmoid probabilities.

Expected: non-finite values, first in the loss, not in any module. The loss is written as
-(y * log(p) + (1 - y) * log(1 - p)) with p = sigmoid(logit), outside the model, instead of
binary_cross_entropy_with_logits. The data are separable and Adam keeps growing the logits;
once a logit passes ~17, sigmoid rounds to exactly 1.0 in float32, log(1 - p) = log(0) = -inf,
and (1 - y) * log(1 - p) = 0 * -inf = NaN even for a correctly classified positive sample.
Every module output is finite when the loss first turns NaN; the backward pass then makes
every gradient NaN, so the model itself is the second thing to go. No `where` is given:
the origin is the loss expression in the script, which no module owns.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 16)
y = (x @ torch.randn(16) > 0).float()

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    p = torch.sigmoid(model(x[idx]).squeeze(1))
    loss = -(y[idx] * torch.log(p) + (1 - y[idx]) * torch.log(1 - p)).mean()  # log(0) once p == 1
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item()}")
