"""Small real models for the tests, scripted and saved as TorchScript."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn


class FeedForwardBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class LinearTransformer(nn.Module):
    """A Linear-heavy transformer written with nn.Linear: attention projections plus a feed-forward block."""

    def __init__(self, width: int = 512, blocks: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.query = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.key = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.value = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])
        self.ffn = nn.ModuleList([FeedForwardBlock(width, 4 * width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)
        self.scale = width ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for query, key, value, ffn in zip(self.query, self.key, self.value, self.ffn):
            attention = torch.softmax(query(x) @ key(x).transpose(1, 2) * self.scale, dim=-1)
            x = ffn(x + attention @ value(x))
        return self.head(x.mean(dim=1))


def transformer_encoder(width: int = 512, layers: int = 6, seed: int = 0) -> nn.Module:
    """nn.TransformerEncoder with every layer initialised on its own (clones start out identical)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    for parameter in encoder.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
    return encoder


class Recurrent(nn.Module):
    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y[:, -1])


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


class SlowModel(nn.Module):
    """Spends about ``steps`` x 10 us per forward pass: a stand-in for a long-running job."""

    def __init__(self, steps: int = 20000) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64) * 0.05)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = torch.tanh(x @ self.weight)
        return x


def save_scripted(model: nn.Module, path: Path) -> Path:
    torch.jit.script(model.eval()).save(str(path))
    return path


def scripted_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()
