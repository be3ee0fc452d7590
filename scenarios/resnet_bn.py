"""A small ResNet (a stem and three BasicBlocks: conv-BN-ReLU-conv-BN plus a shortcut) trained with
SGD + momentum to classify which quadrant of a noisy 8x8 image holds a faint blob.

Expected: healthy. BatchNorm keeps every layer's pre-activations at unit scale and the
shortcuts give the error a direct path back to the stem, so the error reaching the stem is
within a small factor of the error at the head, the ReLUs are about half active, and the loss
falls far below ln(4) = 1.39.
"""

import torch
from torch import nn

torch.manual_seed(0)
N, S = 1024, 8
y = torch.randint(0, 4, (N,))
x = torch.randn(N, 1, S, S)
for i, q in enumerate(y.tolist()):
    r, c = 4 * (q // 2) + 1, 4 * (q % 2) + 1
    x[i, 0, r : r + 2, c : c + 2] += 1.0


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1, bias=False),
    nn.BatchNorm2d(16),
    nn.ReLU(),
    BasicBlock(16, 16),
    BasicBlock(16, 32, stride=2),
    BasicBlock(32, 32),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(32, 4),
)
opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
for _ in range(100):
    idx = torch.randint(0, N, (32,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
