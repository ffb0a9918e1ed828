"""Dynamic int8 on the models people bring: `transformers` GPT-2 / BERT (traced as its docs show),
linear layers in other spellings, embeddings, and the advice for models it barely reaches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # the test extra installs it: a missing one fails, never skips
from torch import nn

from modelpress.spec import parse_spec
from tests.models import LinearSpellings, TextOutput, TokenLSTM, save_scripted
from workers.engine.run.pipeline import compress

transformers.logging.set_verbosity_error()


def _traced(model: nn.Module, field: str, vocab: int, path: Path) -> Path:
    ids = torch.randint(0, vocab, (2, 16))
    traced = torch.jit.trace(TextOutput(model.eval(), field).eval(), (ids, torch.ones_like(ids)), strict=False)
    traced.save(str(path))
    return path


def _spec(vocab: int, **quantize: object) -> object:
    """Default dynamic int8 on (input_ids, attention_mask) batches of 2 x 16."""
    return parse_spec(
        {
            "method": "quantize",
            "seed": 0,
            "evaluation": {"runs": 2, "warmup": 1},
            "inputs": [
                {"shape": [2, 16], "dtype": "int64", "low": 0, "high": vocab},
                {"shape": [2, 16], "dtype": "int64", "low": 1, "high": 2},
            ],
            **({"quantize": quantize} if quantize else {}),
        }
    )


def _kernels(report: dict) -> dict[str, str]:
    return {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    return _traced(transformers.GPT2LMHeadModel(config), "logits", 1000, tmp_path_factory.mktemp("gpt2") / "gpt2.pt")


def test_gpt2_conv1d_layers_run_int8_and_the_tied_embedding_is_one_int8_table(gpt2: Path, tmp_path: Path) -> None:
    report = compress(gpt2, _spec(1000), tmp_path / "out.pt")

    kernels = _kernels(report)
    conv1d = [m for m in report["details"]["quantized_modules"] if m.get("class") == "Conv1D"]
    assert len(conv1d) == 2 * 4 and all(m["type"] == "Linear" and m["kernel"] == "dynamic" for m in conv1d)
    assert kernels["model.transformer.wte"] == kernels["model.transformer.wpe"] == "embedding"
    assert report["size"]["ratio"] <= 0.30
    assert report["fidelity"]["cosine_similarity"] >= 0.998
    result = torch.jit.load(str(tmp_path / "out.pt"))  # plain torch, as a user loads it
    graph = str(result.graph)
    assert graph.count("quantized::linear_dynamic") == 2 * 4 and "aten::addmm" not in graph
    # The tied lm_head reads the same int8 table as the input embedding: one copy, no float one.
    tables = [
        node.output().toIValue()
        for node in result.graph.findAllNodes("prim::Constant")
        if isinstance(node.output().toIValue(), torch.Tensor)
    ]
    assert [tuple(t.shape) for t in tables if t.shape[:1] == (1000,)] == [(1000, 64 + 8)]
    assert not any(t.is_floating_point() and t.numel() >= 1000 * 64 for t in tables)


def test_excluded_embedding_stays_float(gpt2: Path, tmp_path: Path) -> None:
    report = compress(gpt2, _spec(1000, exclude=["model.transformer.wte"]), tmp_path / "out.pt")

    kept = {m["module"]: m for m in report["details"]["kept_float"]}
    assert kept["model.transformer.wte"]["reason"] == "excluded by pattern 'model.transformer.wte'"
    assert kept["model.transformer.wte"]["type"] == "Embedding"
    assert _kernels(report)["model.transformer.wpe"] == "embedding"
    result = torch.jit.load(str(tmp_path / "out.pt"))
    floats = [
        node.output().toIValue()
        for node in result.graph.findAllNodes("prim::Constant")
        if isinstance(node.output().toIValue(), torch.Tensor) and node.output().toIValue().is_floating_point()
    ]
    assert any(tuple(t.shape) == (1000, 64) for t in floats)


def test_bert_encoder_linears_and_its_three_embeddings_are_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    model = _traced(
        transformers.BertModel(config, add_pooling_layer=False), "last_hidden_state", 1000, tmp_path / "bert.pt"
    )
    report = compress(model, _spec(1000), tmp_path / "out.pt")

    kernels = _kernels(report)
    assert list(kernels.values()).count("dynamic") == 2 * 6
    assert {name.rpartition(".")[2] for name, k in kernels.items() if k == "embedding"} == {
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    }
    assert report["size"]["ratio"] <= 0.30
    assert report["fidelity"]["cosine_similarity"] >= 0.998


def test_token_lstm_language_model_reaches_under_a_third_of_the_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(TokenLSTM(vocab=4000, width=64, hidden=128), tmp_path / "lm.pt")
    spec = parse_spec(
        {
            "method": "quantize",
            "seed": 0,
            "evaluation": {"runs": 2, "warmup": 1},
            "inputs": [{"shape": [4, 12], "dtype": "int64", "low": 0, "high": 4000}],
        }
    )
    report = compress(model, spec, tmp_path / "out.pt")

    assert _kernels(report) == {"embed": "embedding", "lstm": "dynamic", "head": "dynamic"}
    assert report["size"]["ratio"] <= 0.30
    assert report["fidelity"]["cosine_similarity"] >= 0.998


class _Spellings(LinearSpellings):
    """The same kind of layer written four ways, the weights stored either way round, on 3-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.functional = nn.Parameter(torch.randn(16, 24) * 0.1)  # F.linear(x, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x @ self.w_in_out + self.b)
        y = torch.relu(torch.matmul(y, self.w_out_in.t()))
        y = torch.relu(torch.addmm(self.addmm_b, y.reshape(-1, 40), self.addmm_w)).reshape(x.shape[0], x.shape[1], 24)
        return nn.functional.linear(y, self.functional)


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_every_spelling_of_a_linear_layer_runs_int8(compile_with: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _Spellings().eval()
    x = torch.randn(2, 5, 32)
    compiled = torch.jit.script(module) if compile_with == "script" else torch.jit.trace(module, x)
    compiled.save(str(tmp_path / "m.pt"))
    report = compress(
        tmp_path / "m.pt",
        parse_spec(
            {"method": "quantize", "input_shape": [2, 5, 32], "seed": 0, "evaluation": {"runs": 2, "warmup": 1}}
        ),
        tmp_path / "out.pt",
    )

    quantized = report["details"]["quantized_modules"]
    assert [(m["type"], m["kernel"], sorted(m["tensors"])) for m in quantized] == [
        ("Linear", "dynamic", ["addmm_w", "functional", "w_in_out", "w_out_in"])
    ]
    graph = str(torch.jit.load(str(tmp_path / "out.pt")).graph)
    assert graph.count("quantized::linear_dynamic") == 4
    assert not {"aten::matmul", "aten::addmm", "aten::linear", "aten::mm"} & {k for k in graph.split() if "aten::" in k}
    assert report["fidelity"]["cosine_similarity"] >= 0.999


def test_embedding_bag_modes_and_padding_stay_exact_up_to_int8(tmp_path: Path) -> None:
    class Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.EmbeddingBag(500, 32, mode="mean", padding_idx=0)
            self.sum = nn.EmbeddingBag(500, 32, mode="sum")

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.mean(ids) + self.sum(ids, per_sample_weights=torch.ones_like(ids, dtype=torch.float))

    torch.manual_seed(0)
    model = save_scripted(Bags(), tmp_path / "bags.pt")
    spec = parse_spec(
        {
            "method": "quantize",
            "seed": 0,
            "evaluation": {"runs": 2, "warmup": 1},
            "inputs": [{"shape": [4, 6], "dtype": "int64", "low": 0, "high": 500}],
        }
    )
    report = compress(model, spec, tmp_path / "out.pt")

    assert _kernels(report) == {"mean": "embedding", "sum": "embedding"}
    assert report["fidelity"]["cosine_similarity"] >= 0.999
    ids = torch.tensor([[0, 0, 3, 4], [0, 0, 0, 0]])  # padding excluded from the mean; an all-padding bag is zero
    expected, actual = torch.jit.load(str(model))(ids), torch.jit.load(str(tmp_path / "out.pt"))(ids)
    assert torch.allclose(actual, expected, atol=0.05)


def test_a_convolutional_net_gets_advice_before_a_wasted_run(tmp_path: Path) -> None:
    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    torch.manual_seed(0)
    model = save_scripted(ConvNet(), tmp_path / "cnn.pt")
    report = compress(
        model,
        parse_spec(
            {"method": "quantize", "input_shape": [2, 3, 16, 16], "seed": 0, "evaluation": {"runs": 2, "warmup": 1}}
        ),
        tmp_path / "out.pt",
    )

    assert _kernels(report) == {"head": "dynamic"}
    assert report["details"]["coverage"]["fraction"] < 0.10
    (advice,) = [w for w in report["warnings"] if "covered only" in w]
    assert "Conv2d layers hold" in advice and "quantize.mode 'static'" in advice


def _static_spec(vocab: int) -> object:
    return parse_spec(
        {
            "method": "quantize",
            "quantize": {"mode": "static", "calibration_batches": 2},
            "seed": 0,
            "evaluation": {"runs": 2, "warmup": 1},
            "inputs": [
                {"shape": [2, 16], "dtype": "int64", "low": 0, "high": vocab},
                {"shape": [2, 16], "dtype": "int64", "low": 1, "high": 2},
            ],
        }
    )


def test_static_int8_reaches_gpt2_conv1d_layers(gpt2: Path, tmp_path: Path) -> None:
    """GPT-2's Conv1D is addmm with a [in, out] weight, which graph-mode static quantization does not
    match: each is made aten::linear (weight stored [out, in]) first, then runs as quantized::linear."""
    report = compress(gpt2, _static_spec(1000), tmp_path / "out.pt")

    conv1d = [m for m in report["details"]["quantized_modules"] if m.get("class") == "Conv1D"]
    assert len(conv1d) == 2 * 4 and all(m["type"] == "Linear" and m["kernel"] == "static" for m in conv1d)
    assert not [w for w in report["warnings"] if "Conv1D" in w]
    assert any("made aten::linear" in note for note in report["details"]["notes"])
    graph = str(torch.jit.load(str(tmp_path / "out.pt")).graph)
    assert graph.count("quantized::linear") >= 2 * 4 and "aten::addmm" not in graph
    assert report["fidelity"]["cosine_similarity"] >= 0.98


class _OwnProduct(nn.Module):
    """A linear layer as transformers' Conv1D writes it: addmm with a [in, out] weight."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) * 0.2)
        self.bias = nn.Parameter(torch.randn(outputs) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _ProductReadTwice(_OwnProduct):
    """The same layer whose weight is read again (a norm of it): storing it transposed would change that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight) * self.weight.sum(0).sigmoid()


class _TwoProducts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _OwnProduct(32, 64), _ProductReadTwice(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


@pytest.mark.parametrize("compile_with", ["trace", "script"])
def test_a_product_whose_weight_is_read_elsewhere_stays_float_and_says_why(compile_with: str, tmp_path: Path) -> None:
    """Scripted, each ``self.weight`` is its own read: the second one must be seen too (transposing the
    weight under it changed the outputs, or failed the job on a non-square layer)."""
    torch.manual_seed(0)
    model = _TwoProducts().eval()
    compiled = torch.jit.trace(model, torch.randn(8, 32)) if compile_with == "trace" else torch.jit.script(model)
    compiled.save(str(tmp_path / "m.pt"))
    spec = parse_spec({"method": "quantize", "quantize": {"mode": "static"}, "input_shape": [8, 32], "seed": 0})

    report = compress(tmp_path / "m.pt", spec, tmp_path / "out.pt")

    assert [(m["module"], m["kernel"]) for m in report["details"]["quantized_modules"]] == [("first", "static")]
    (why,) = [w for w in report["warnings"] if "written as addmm/matmul" in w]
    assert why.startswith("1 linear layer(s)") and "second" in why and "mode dynamic quantizes them" in why
    result = torch.jit.load(str(tmp_path / "out.pt"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(result(x).flatten(), model(x).flatten(), dim=0) >= 0.99
