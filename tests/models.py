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
        self.scale = width**-0.5

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


def settle_batchnorm(model: nn.Module, shape: tuple[int, ...], seed: int | None = None) -> nn.Module:
    """BatchNorm statistics from a few train-mode passes, so eval outputs are not degenerate; the model in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


def save_scripted(model: nn.Module, path: Path) -> Path:
    torch.jit.script(model.eval()).save(str(path))
    return path


def scripted_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


class ResidualNet(nn.Module):
    """A stem and one residual block: the block's output and its input must keep matching channels."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.fc(self.pool(torch.relu(x + y)).flatten(1))


class ConcatNet(nn.Module):
    """Two branches joined by torch.cat along channels, then a conv reading both."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 12, 3, padding=1)
        self.right = nn.Conv2d(3, 20, 3, padding=1)
        self.mix = nn.Conv2d(32, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.fc(self.pool(torch.relu(self.mix(joined))).flatten(1))


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class SeparableDigitsCNN(nn.Module):
    """A depthwise-separable CNN for the 8x8 digits (MobileNet's block): per-tensor int8 weights hurt it."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def separable(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, inputs, 3, padding=1, groups=inputs),
                nn.BatchNorm2d(inputs),
                nn.ReLU(),
                nn.Conv2d(inputs, outputs, 1),
                nn.BatchNorm2d(outputs),
                nn.ReLU(),
            )

        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(separable(width, 2 * width), separable(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def digits_splits(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's bundled digits as 1x8x8 images in [0, 1]: a stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return {
        "x_train": torch.from_numpy(x_train),
        "y_train": torch.from_numpy(y_train).long(),
        "x_test": torch.from_numpy(x_test),
        "y_test": torch.from_numpy(y_test).long(),
    }


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


test_accuracy.__test__ = False  # a helper, not a pytest test


class TokenLSTM(nn.Module):
    """A token model: int64 ids -> embedding -> LSTM -> next-token scores."""

    def __init__(self, vocab: int = 50, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(ids))
        return self.head(states[:, -1])


class ImageAndIds(nn.Module):
    """Two inputs: a float image and int64 ids (a caption), joined before the classifier."""

    def __init__(self, vocab: int = 100, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Embedding(vocab, 8)
        self.mix = nn.Linear(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        seen = self.pool(torch.relu(self.conv(image))).flatten(1)
        read = self.embed(ids).mean(1)
        return self.head(torch.relu(self.mix(torch.cat([seen, read], 1))))


class TupleHeads(nn.Module):
    """Two outputs as a tuple: features [batch, 2, 3] first (not class scores), then class scores."""

    def __init__(self, features: int = 12, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(features, 32)
        self.embedding = nn.Linear(32, 6)
        self.scores = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.body(x))
        return self.embedding(hidden).view(-1, 2, 3), self.scores(hidden)


class DictHeads(TupleHeads):
    """The same two outputs as a dict."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        hidden = torch.relu(self.body(x))
        return {"embedding": self.embedding(hidden), "scores": self.scores(hidden)}


class Eigen(nn.Module):
    """A model calling an operator the ONNX exporters have no counterpart for (``eigvalsh``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.linalg.eigvalsh(y.transpose(0, 1) @ y).unsqueeze(0).expand(x.shape[0], -1)


class LinearSpellings(nn.Module):
    """Linear layers written as products: ``x @ W + b`` ([in, out]), ``x @ W.t()`` ([out, in]), ``addmm``
    (``[in, out]``, as ``transformers``' ``Conv1D``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(32, 48) * 0.1)
        self.b = nn.Parameter(torch.randn(48) * 0.1)
        self.w_out_in = nn.Parameter(torch.randn(40, 48) * 0.1)
        self.addmm_w = nn.Parameter(torch.randn(40, 24) * 0.1)
        self.addmm_b = nn.Parameter(torch.randn(24) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x @ self.w_in_out + self.b)
        y = torch.relu(torch.matmul(y, self.w_out_in.t()))
        return torch.addmm(self.addmm_b, y, self.addmm_w)


class TextOutput(nn.Module):
    """A `transformers` text model called with its documented inputs, returning one output field (as
    people trace or export it: ``logits``, ``last_hidden_state``)."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.field)


class PixelLogits(nn.Module):
    """A `transformers` image classifier called with ``pixel_values``, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits
