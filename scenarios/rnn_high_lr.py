"""A vanilla tanh RNN with PyTorch's default init, trained with plain SGD at a learning rate that
is too high for it (lr=0.6), to output a scaled running mean of a 40-step input sequence.

Expected: exploding gradients at the `rnn` module, then non-finite values. For about 40 steps
training is ordinary: the loss falls and the gradient norm of `rnn` stays below 1. Then an
oversized update pushes the recurrent weights out (the spectral radius of weight_hh_l0 goes from
0.6 to above 10 within a few steps); the gradient through time now compounds over the 40 steps,
the gradient norm of `rnn` jumps ~1e4-1e5x above its running median, and the loss diverges to
inf and then NaN. The same script with lr=0.1, or with the gradient norm clipped to 1, trains.
"""

import torch
from torch import nn

torch.manual_seed(0)
T, B, H = 40, 32, 32
x = torch.randn(1024, T, 4)
y = 3 * x[:, :, :1].mean(1)  # needs the whole sequence: the recurrence must carry memory


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, H, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


model = Model()
opt = torch.optim.SGD(model.parameters(), lr=0.6)
for _ in range(120):
    idx = torch.randint(0, len(x), (B,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item()}")
