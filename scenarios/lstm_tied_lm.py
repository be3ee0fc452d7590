"""A 2-layer LSTM language model whose output layer shares its weight with the input embedding
(decoder.weight = encoder.weight), trained with Adam on a synthetic token stream.

Expected: healthy. The stream follows a fixed rule, next = (3 * current + 1) mod 32, 80% of
the time (else a random token), so the loss can fall from ln(32) = 3.5 towards ~1.1. Two
traps: the tied matrix gets gradient from both ends (as encoder and as decoder), which is
one parameter with one gradient, not two layers out of scale; and the first LSTM layer gets
smaller gradients than the second, which is normal for stacked LSTMs and not vanishing.
"""

import torch
from torch import nn

torch.manual_seed(0)
V, D, T = 32, 48, 24
stream = [0]
for _ in range(20_000):
    nxt = (3 * stream[-1] + 1) % V if torch.rand(()) < 0.8 else int(torch.randint(0, V, ()))
    stream.append(nxt)
stream = torch.tensor(stream)


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(V, D)
        self.lstm = nn.LSTM(D, D, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(D, V)
        self.decoder.weight = self.encoder.weight  # tied: one Parameter, used twice

    def forward(self, tokens):
        out, _ = self.lstm(self.encoder(tokens))
        return self.decoder(out)


model = LanguageModel()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
for _ in range(120):
    start = torch.randint(0, len(stream) - T - 1, (32, 1))
    window = stream[start + torch.arange(T + 1)]
    logits = model(window[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), window[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
