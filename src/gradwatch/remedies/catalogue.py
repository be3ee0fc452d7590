"""The catalogue of remedies: what to change, in one sentence and a snippet of torch code."""

from __future__ import annotations

from ..diagnose.findings import Remedy


def _r(id: str, text: str, code: str) -> Remedy:
    return Remedy(id, text, code.strip())


REMEDIES: dict[str, Remedy] = {
    r.id: r
    for r in [
        _r(
            "relu",
            "Replace saturating sigmoid/tanh hidden activations with ReLU, whose derivative is 1 "
            "for every active unit instead of at most 0.25 (sigmoid) or 1 only at 0 (tanh).",
            "model = gradwatch.remedies.apply_remedies(model, ['relu'])  # or nn.ReLU() in place of nn.Sigmoid()",
        ),
        _r(
            "gelu",
            "Use GELU (or SiLU) hidden activations: smooth like tanh, but they do not saturate for "
            "positive inputs.",
            "nn.GELU()  # in place of nn.Tanh() / nn.Sigmoid()",
        ),
        _r(
            "leaky_relu",
            "Use LeakyReLU so that units pushed below zero still pass a small gradient and can recover.",
            "nn.LeakyReLU(0.01)  # in place of nn.ReLU()",
        ),
        _r(
            "he_init",
            "Initialise ReLU layers with He (Kaiming) init, std = sqrt(2 / fan_in), which keeps the "
            "signal's variance constant across depth.",
            "for m in model.modules():\n"
            "    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity='relu'); nn.init.zeros_(m.bias)",
        ),
        _r(
            "xavier_init",
            "Initialise tanh/sigmoid layers with Xavier (Glorot) init, which balances forward and "
            "backward variance for fan_in and fan_out.",
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain('tanh')); nn.init.zeros_(m.bias)",
        ),
        _r(
            "orthogonal_init",
            "Initialise weight matrices (recurrent ones above all) orthogonally, so every singular "
            "value is 1 and products over depth or time neither shrink nor grow.",
            "for name, p in model.named_parameters():\n"
            "    if 'weight_hh' in name or p.dim() == 2:\n"
            "        nn.init.orthogonal_(p)",
        ),
        _r(
            "lsuv_init",
            "Use layer-sequential unit-variance (LSUV) init: orthogonal init, then rescale each layer "
            "on a real batch until its output has unit variance (Mishkin & Matas 2016).",
            "with torch.no_grad():\n"
            "    for m in linear_layers_in_order:\n"
            "        nn.init.orthogonal_(m.weight)\n"
            "        m.weight /= capture_output(m, batch).std()  # repeat until std ~ 1",
        ),
        _r(
            "residual",
            "Add residual (skip) connections, x + f(x), so the gradient has an identity path "
            "around every block.",
            "class Block(nn.Module):\n    def forward(self, x):\n        return x + self.f(x)",
        ),
        _r(
            "batchnorm",
            "Insert BatchNorm after each linear/conv layer to keep activations at a trainable scale.",
            "nn.Sequential(nn.Linear(n, n), nn.BatchNorm1d(n), nn.ReLU())",
        ),
        _r(
            "layernorm",
            "Insert LayerNorm (pre-norm in transformers) to keep activations at a trainable scale, "
            "independent of batch size.",
            "nn.Sequential(nn.LayerNorm(n), nn.Linear(n, n), nn.GELU())",
        ),
        _r(
            "lstm_gru",
            "Replace the vanilla RNN with an LSTM or GRU, whose gated cell state carries gradients "
            "across many time steps.",
            "nn.LSTM(input_size, hidden_size, batch_first=True)  # in place of nn.RNN(...)",
        ),
        _r(
            "clip_grad_norm",
            "Clip the global gradient norm before each optimizer step so one bad batch cannot blow "
            "the weights up.",
            "loss.backward()\n"
            "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\n"
            "optimizer.step()",
        ),
        _r(
            "lower_lr",
            "Lower the learning rate; aim for update-to-weight ratios around 1e-3 per step.",
            "for group in optimizer.param_groups:\n    group['lr'] *= 0.1",
        ),
        _r(
            "raise_lr",
            "Raise the learning rate where updates are far below 1e-3 of the weights per step: for "
            "the whole optimizer when every layer is slow, else in a parameter group of the slow "
            "layers' own, so the others do not speed up with them.",
            "for group in optimizer.param_groups:\n    group['lr'] *= 10\n"
            "# only some layers slow: torch.optim.SGD([{'params': slow.parameters(), 'lr': 10 * lr},\n"
            "#                                        {'params': rest}], lr=lr)",
        ),
        _r(
            "warmup",
            "Warm the learning rate up over the first steps, so early large gradients meet small "
            "steps.",
            "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=500)",
        ),
        _r(
            "log_softmax",
            "Compute log-probabilities with log_softmax (or use cross_entropy on logits), never "
            "log(softmax(x)): softmax underflows to 0 and log(0) = -inf.",
            "logp = torch.log_softmax(logits, dim=-1)  # or F.cross_entropy(logits, target)",
        ),
        _r(
            "stable_exp",
            "Compute exponentials in a stable form: softmax, logsumexp and softplus subtract the "
            "maximum first, while exp(x) overflows float32 from x = 89.",
            "p = torch.softmax(x, dim=-1)  # not x.exp() / x.exp().sum(-1, keepdim=True)\n"
            "lse = torch.logsumexp(x, dim=-1)",
        ),
        _r(
            "loss_scaling",
            "Train in bf16 (float32's range), or scale the loss with a GradScaler so fp16 values "
            "neither overflow nor underflow.",
            "scaler = torch.amp.GradScaler()\n"
            "with torch.autocast(device_type, dtype=torch.bfloat16):\n"
            "    loss = model(x)\n"
            "scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()",
        ),
    ]
}


def remedy(id: str) -> Remedy:
    """Look a remedy up by id, with a clear error for unknown ids."""
    try:
        return REMEDIES[id]
    except KeyError:
        raise KeyError(f"unknown remedy {id!r}; known: {', '.join(REMEDIES)}") from None
