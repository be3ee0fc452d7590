"""A 10-layer sigmoid MLP on scikit-learn-free synthetic data: a textbook vanishing gradient.

Run it under gradwatch:  gradwatch run examples/deep_sigmoid.py --steps 200
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x[:, :5].sum(1) > 0).long()

layers = []
for i in range(10):
    layers += [nn.Linear(20 if i == 0 else 64, 64), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(64, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)

for _step in range(args.steps):
    idx = torch.randint(0, len(x), (64,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
