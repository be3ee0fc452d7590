"""A small GAN on 2-D points: a generator G and a discriminator D, each with its own Adam optimizer,
updated alternately (D on real vs. detached fake points, then G through D).

Expected: healthy. The two losses do not fall together the way a single loss does: they
oscillate around their equilibrium (D's near 2 ln 2, G's near ln 2), so a loss trend
says little here. What shows that it trains is the generator's output: its samples move from
around the origin to the real data, a ring of radius 2 centred at (3, 3), and their mean
ends within a small fraction of the initial distance. Gradients stay finite and of ordinary size
in both networks, and G receives its error through D without loss.
"""

import math

import torch
from torch import nn

torch.manual_seed(0)
Z = 8


def real_batch(n):
    angle = 2 * math.pi * torch.rand(n)
    ring = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    return ring + torch.tensor([3.0, 3.0]) + 0.1 * torch.randn(n, 2)


G = nn.Sequential(
    nn.Linear(Z, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 2)
)
D = nn.Sequential(
    nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)
)
opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
opt_d = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
bce = nn.functional.binary_cross_entropy_with_logits

for _ in range(300):
    real, fake = real_batch(64), G(torch.randn(64, Z))
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    loss_d = bce(D(real), ones) + bce(D(fake.detach()), zeros)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()

    loss_g = bce(D(fake), ones)  # non-saturating generator loss
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()

with torch.no_grad():
    gap = (G(torch.randn(1024, Z)).mean(0) - torch.tensor([3.0, 3.0])).norm().item()
print(f"final losses D {loss_d.item():.4f} G {loss_g.item():.4f}, generated mean off by {gap:.3f}")
