"""Small hand-built modules with the patterns the passes must find, and near-misses they must leave alone."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedMLP(nn.Module):
    """SwiGLU (``act="silu"``) / GeGLU (``act="gelu"`` or ``"gelu_tanh"``), with or without biases."""

    def __init__(self, h=16, i=48, act="silu", bias=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(h, i, bias), nn.Linear(h, i, bias), nn.Linear(i, h, bias)
        self.act = act

    def forward(self, x):
        g = self.gate(x)
        g = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.act](g)
        return self.down(g * self.up(x))


class PlainMLP(nn.Module):
    def __init__(self, h=16, i=64, act="gelu", bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i, bias), nn.Linear(i, h, bias)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "gelu_tanh": nn.GELU("tanh")}[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AddmmMLP(nn.Module):
    """Projections written as ``torch.addmm`` on flattened tokens (GPT-2 ``Conv1D`` style)."""

    def __init__(self, h=16, i=64):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(h, i) * 0.1), nn.Parameter(torch.zeros(i))
        self.w2, self.b2 = nn.Parameter(torch.randn(i, h) * 0.1), nn.Parameter(torch.zeros(h))

    def forward(self, x):
        shape = x.shape
        t = torch.addmm(self.b1, x.reshape(-1, shape[-1]), self.w1)
        t = F.gelu(t, approximate="tanh")
        return torch.addmm(self.b2, t, self.w2).view(shape)


class FusedGateUp(nn.Module):
    """Phi-3 style: one ``gate_up_proj`` split by ``chunk`` along the features."""

    def __init__(self, h=16, i=40):
        super().__init__()
        self.gate_up, self.down = nn.Linear(h, 2 * i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.silu(gate))


class Block(nn.Module):
    """Residual stack of MLPs with a norm, so regions sit inside ordinary surrounding code."""

    def __init__(self, mlp: nn.Module, h=16, layers=2):
        super().__init__()
        self.mlps = nn.ModuleList([mlp if i == 0 else type(mlp)() for i in range(layers)])
        self.norm = nn.LayerNorm(h)

    def forward(self, x):
        for m in self.mlps:
            x = x + m(self.norm(x))
        return x


# ---- near-misses -------------------------------------------------------------------------------------------


class AttentionLike(nn.Module):
    """Projections that do not widen, plus a widening one reshaped into heads: not MLPs."""

    def __init__(self, h=16):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(h, h), nn.Linear(h, 4 * h), nn.Linear(h, h)

    def forward(self, x):
        b, s, h = x.shape
        q = self.q(x).view(b, s, 2, h // 2).transpose(1, 2)
        kv = self.kv(x).view(b, s, 2, 2 * h).transpose(1, 2)
        k, v = kv[..., : h // 2], kv[..., h // 2 : h]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, h))


class LeakyIntermediate(nn.Module):
    """The intermediate is also returned: chunking would have to materialize it anyway."""

    def __init__(self, h=16, i=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        t = F.gelu(self.fc1(x))
        return self.fc2(t), t


class TokenMixing(nn.Module):
    """A cumulative sum over tokens inside the MLP: not row-wise."""

    def __init__(self, h=16, i=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        return self.fc2(torch.cumsum(F.gelu(self.fc1(x)), dim=1))


class StochasticMLP(nn.Module):
    """Dropout with p > 0 in training: a recompute would draw a different mask."""

    def __init__(self, h=16, i=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h)

    def forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), p=0.1, training=True))


class LMHead(nn.Module):
    """Hidden states -> [upcast] [softcap] [scale] -> cross-entropy, with HF-like or shifted labels."""

    def __init__(self, h=16, v=200, upcast=True, softcap=None, scale=None, bias=False, shift=False,
                 reduction="mean", smoothing=0.0, return_logits=False):  # fmt: skip
        super().__init__()
        self.proj = nn.Linear(h, v, bias=bias)
        self.upcast, self.softcap, self.scale, self.shift = upcast, softcap, scale, shift
        self.reduction, self.smoothing, self.return_logits = reduction, smoothing, return_logits

    def forward(self, hs, labels):
        logits = self.proj(hs)
        z = logits.float() if self.upcast else logits
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.shift:
            z, labels = z[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
        loss = F.cross_entropy(z.view(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction=self.reduction, label_smoothing=self.smoothing)  # fmt: skip
        return (loss, logits) if self.return_logits else loss
