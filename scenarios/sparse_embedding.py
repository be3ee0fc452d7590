"""A bag-of-words classifier over a 5000-token vocabulary, of which each batch touches only a
few hundred rows, trained with Adam.

Expected: healthy. Each batch of 64 documents x 20 tokens touches at most 1280 of the 5000
embedding rows (fewer: tokens repeat, following a Zipf-like law), so most rows get an exactly
zero gradient on any given step. That is the nature of embeddings, not a vanishing gradient
or dead units: the rows that are used get ordinary gradients and the loss falls well below
half its start.
"""

import torch
from torch import nn

torch.manual_seed(0)
V, L, N = 5000, 20, 4096
weights = 1.0 / torch.arange(1, V + 1).float()  # Zipf: a few tokens are common, most are rare
docs = torch.multinomial(weights, N * L, replacement=True).view(N, L)
label_of_token = torch.randint(0, 2, (V,))
y = (label_of_token[docs].float().mean(1) > 0.5).long()


class BagOfWords(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 32)
        self.fc = nn.Linear(32, 32)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, 2)

    def forward(self, docs):
        return self.head(self.act(self.fc(self.embed(docs).mean(1))))


model = BagOfWords()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300):
    idx = torch.randint(0, N, (64,))
    loss = nn.functional.cross_entropy(model(docs[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4f}")
