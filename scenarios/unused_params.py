"""A classifier with an auxiliary head that forward() never calls (left over from an
experiment) and a projection that only evaluation uses; the optimizer gets all parameters.

Expected: healthy. The unused modules' parameters never receive a gradient (`.grad` stays
None) and Adam skips them. That is not a vanishing gradient and not a dead layer: no error
ever reaches them because they are not in the graph. The modules that are used train
normally and the loss falls well below half its start.
"""

import torch
from torch import nn

torch.manual_seed(0)
x = torch.randn(2048, 24)
y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, 3)
        self.aux_head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 3))  # unused
        self.embed_proj = nn.Linear(128, 16)  # only for embeddings at evaluation time

    def forward(self, x):
        return self.head(self.body(x))


model = Classifier()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
for _ in range(200):
    idx = torch.randint(0, len(x), (128,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
