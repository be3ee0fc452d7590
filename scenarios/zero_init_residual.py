"""A residual MLP (8 blocks, x + W2 relu(W1 norm(x))) whose last layer in every branch starts at
exactly zero, as in Fixup or torchvision's zero_init_residual, trained with Adam.

Expected: healthy. At step 0 each block is the identity and the error reaching a branch's
first layer is exactly zero (it passes through W2 = 0), so those layers' weight gradients
are exactly 0 on the first step. That is the intended start, not a vanishing gradient: one
update makes W2 nonzero, and from then on every layer gets an error of about the same size
through the shortcut. The loss falls well below half its start.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 32)
y = torch.tanh(x[:, :8] @ torch.randn(8, 4))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d, d)
        nn.init.zeros_(self.fc2.weight)  # the branch starts as 0: the block is the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


model = nn.Sequential(nn.Linear(32, 64), *[Block(64) for _ in range(8)], nn.Linear(64, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
