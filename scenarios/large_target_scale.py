"""Regression onto raw prices (around 1000 dollars, spread ~230) by an MLP whose output is in
thousands of dollars: the model multiplies the network's output by a fixed scale of 1000.

Expected: healthy, with very large gradients at the start. The network starts at the mean
price, but the spread of the prices (errors of ~230 dollars) comes back through the scale of
1000, so the first gradient norms are ~1e5 (on a standardised target they would be ~1). That
is the loss scale, not an explosion: it multiplies every layer's error alike (the error at the
first layer stays within a few times the error at the last), Adam's step size does not depend
on it, and the gradients fall ~50x as the loss falls. The loss ends ~800x below its start.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 8)
price = 1000.0 + 100.0 * (x[:, :3] @ torch.tensor([[1.0], [-2.0], [0.5]]))


class PriceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        self.register_buffer("scale", torch.tensor(1000.0))  # outputs are in thousands
        nn.init.ones_(self.net[4].bias)  # start at a typical price, 1000 dollars

    def forward(self, x):
        return self.scale * self.net(x)


model = PriceModel()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(300):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(model(x[idx]), price[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.1f}")
