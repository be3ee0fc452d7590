"""Self-attention over raw, unnormalised sensor features, trained under float16 autocast on the CPU.

Expected: non-finite values, first in the module `attn`. The features are in the hundreds,
so the query and key vectors are too, and `attn` computes q @ k^T without the 1/sqrt(d)
scaling and without LayerNorm. Under torch.autocast("cpu", dtype=torch.float16) the matmul
returns float16, whose largest finite value is 65504: many scores are ~1e5 and overflow to
inf, softmax of a row that holds +inf is NaN (inf - inf), and the NaN reaches the loss and,
through backward, every gradient. The same script in float32 has finite scores. The inputs of
`attn` (the outputs of `embed`, `attn.q`, `attn.k` and `attn.v`) are all finite.
"""

import torch
from torch import nn

torch.manual_seed(0)
B, T, F, D = 32, 16, 8, 64
x = 500.0 * torch.rand(1024, T, F)  # raw readings in [0, 500], never normalised
y = (x[:, :, 0].mean(1) > x[:, :, 1].mean(1)).long()


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        scores = self.q(h) @ self.k(h).transpose(1, 2)  # the trap: no / sqrt(d), fp16 output
        return torch.softmax(scores, dim=-1) @ self.v(h)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(F, D)
        self.attn = SelfAttention(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


model = Model()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(30):
    idx = torch.randint(0, len(x), (B,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item()}")
