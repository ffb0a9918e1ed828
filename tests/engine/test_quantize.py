"""The quantization engine on real TorchScript models, without the service."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.models import LinearTransformer, Recurrent, SmallConvNet, save_scripted, transformer_encoder
from workers.engine.formats.torchscript import load_model
from workers.engine.run.pipeline import compress


def _spec(shape: list[int], **quantize: object) -> dict:
    return {
        "method": "quantize",
        "input_shape": shape,
        "seed": 0,
        "evaluation": {"runs": 3, "warmup": 1},
        "quantize": {
            "mode": "dynamic",
            "dtype": "qint8",
            "modules": ["Linear", "LSTM", "GRU"],
            "exclude": [],
            "per_channel": True,
            **quantize,
        },
    }


@pytest.fixture(scope="module")
def small_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_scripted(LinearTransformer(width=128, blocks=2), tmp_path_factory.mktemp("m") / "lt.pt")


def test_linear_layers_get_int8_kernels_and_a_quarter_of_the_bytes(small_transformer: Path, tmp_path: Path) -> None:
    report = compress(small_transformer, _spec([2, 8, 128]), tmp_path / "out.pt")

    assert report["size"]["ratio"] < 0.30
    assert report["fidelity"]["cosine_similarity"] > 0.999
    assert report["fidelity"]["top1_agreement"] >= 0.75
    kernels = {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}
    assert kernels["head"] == "dynamic" and kernels["ffn.0.fc1"] == "dynamic"
    assert len(kernels) == 2 * 3 + 2 * 2 + 1
    graph = str(load_model(tmp_path / "out.pt").graph)
    assert graph.count("quantized::linear_dynamic") == len(kernels)
    assert "aten::linear" not in graph


def test_result_runs_on_other_batch_sizes_with_plain_jit_load(small_transformer: Path, tmp_path: Path) -> None:
    compress(small_transformer, _spec([2, 8, 128]), tmp_path / "out.pt")
    original, result = torch.jit.load(str(small_transformer)), torch.jit.load(str(tmp_path / "out.pt"))
    for batch in (1, 5):
        x = torch.randn(batch, 8, 128)
        with torch.no_grad():
            expected, actual = original(x), result(x)
        assert actual.shape == expected.shape == (batch, 10)
        assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.999


def test_excluded_modules_keep_their_float_weights(small_transformer: Path, tmp_path: Path) -> None:
    report = compress(small_transformer, _spec([2, 8, 128], exclude=["ffn.0.*", "head"]), tmp_path / "out.pt")

    quantized = {m["module"] for m in report["details"]["quantized_modules"]}
    kept = {m["module"]: m["reason"] for m in report["details"]["kept_float"]}
    assert "head" not in quantized and "ffn.0.fc1" not in quantized and "ffn.1.fc1" in quantized
    assert kept["head"] == "excluded by pattern 'head'"
    assert kept["ffn.0.fc2"] == "excluded by pattern 'ffn.0.*'"
    graph = str(load_model(tmp_path / "out.pt").graph)
    assert graph.count("aten::linear") == 3  # ffn.0.fc1, ffn.0.fc2 and head stay float


def test_float16_halves_the_weights_and_is_nearly_exact(small_transformer: Path, tmp_path: Path) -> None:
    report = compress(small_transformer, _spec([2, 8, 128], dtype="float16"), tmp_path / "out.pt")

    assert 0.45 < report["size"]["ratio"] < 0.56
    assert report["fidelity"]["cosine_similarity"] > 0.99999
    assert report["details"]["counts"]["weight_only"] == 11


def test_lstm_and_gru_run_the_quantized_recurrent_kernels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(Recurrent(features=32, hidden=128), tmp_path / "rnn.pt")
    report = compress(model, _spec([4, 12, 32]), tmp_path / "out.pt")

    kernels = {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}
    assert kernels == {"lstm": "dynamic", "gru": "dynamic", "head": "dynamic"}
    graph = str(torch.jit.load(str(tmp_path / "out.pt")).graph)  # the file a user downloads
    assert "aten::quantized_lstm" in graph and "aten::quantized_gru" in graph
    assert "aten::lstm(" not in graph and "aten::gru(" not in graph and "aten::dequantize" not in graph
    assert report["size"]["ratio"] < 0.35
    assert report["fidelity"]["cosine_similarity"] > 0.999


def test_bias_free_bidirectional_lstm_gets_the_quantized_kernel_too(tmp_path: Path) -> None:
    class BiLSTM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(16, 32, bidirectional=True, bias=False, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    torch.manual_seed(0)
    model = save_scripted(BiLSTM(), tmp_path / "bi.pt")
    report = compress(model, _spec([3, 7, 16]), tmp_path / "out.pt")

    assert "aten::quantized_lstm" in str(torch.jit.load(str(tmp_path / "out.pt")).graph)
    assert report["details"]["quantized_modules"][0]["kernel"] == "dynamic"
    assert report["fidelity"]["cosine_similarity"] > 0.999


def test_transformer_encoder_feed_forward_runs_int8_when_attention_is_not_selected(tmp_path: Path) -> None:
    model = save_scripted(transformer_encoder(width=128, layers=2), tmp_path / "enc.pt")
    report = compress(model, _spec([2, 10, 128]), tmp_path / "out.pt")

    assert report["size"]["ratio"] < 0.55
    assert report["fidelity"]["cosine_similarity"] > 0.99
    kept = {m["module"]: m for m in report["details"]["kept_float"]}
    assert kept["layers.0.self_attn"]["tensors"] == ["in_proj_weight", "in_proj_bias"]
    assert "not selected" in kept["layers.0.self_attn"]["reason"]
    kernels = {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}
    assert kernels["layers.1.linear1"] == kernels["layers.1.self_attn.out_proj"] == "dynamic"


class _OpCounter(TorchDispatchMode):
    """Counts the operators a forward pass really dispatches (TorchScript's calls included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_transformer_encoder_attention_projections_run_int8(tmp_path: Path) -> None:
    width, layers = 256, 2
    model = save_scripted(transformer_encoder(width=width, layers=layers), tmp_path / "enc.pt")
    report = compress(model, _spec([2, 10, width], modules=["Linear", "MultiheadAttention"]), tmp_path / "out.pt")

    assert report["size"]["ratio"] <= 0.30
    assert report["fidelity"]["cosine_similarity"] >= 0.999
    kernels = {m["module"]: m["kernel"] for m in report["details"]["quantized_modules"]}
    assert kernels["layers.0.self_attn"] == kernels["layers.1.self_attn.out_proj"] == "dynamic"
    result = torch.jit.load(str(tmp_path / "out.pt"))  # the file a user downloads, plain torch
    packed_shapes = sorted(
        {
            tuple(torch.ops.quantized.linear_unpack(node.inputsAt(1).toIValue())[0].shape)
            for node in result.graph.findAllNodes("quantized::linear_dynamic")
        }
    )
    assert packed_shapes == [(width, width), (width, 4 * width), (3 * width, width), (4 * width, width)]

    original = torch.jit.load(str(model))
    x = torch.randn(3, 7, width)
    for grad in (False, True):  # inference fast path (fused ops in the float model) and the module path
        with torch.set_grad_enabled(grad):
            expected = original(x)
            result(x)  # the first call optimises the graph
            with _OpCounter() as counter:
                actual = result(x)
        assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.999
        # in_proj, out_proj and the two feed-forward layers of each layer, nothing left in float
        assert counter.calls.get("quantized.linear_dynamic") == 4 * layers
        assert not {
            "aten.linear",
            "aten.addmm",
            "aten.mm",
            "aten._transformer_encoder_layer_fwd",
            "aten._native_multi_head_attention",
        } & set(counter.calls)


def test_model_without_selected_modules_comes_back_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    report = compress(model, _spec([2, 3, 16, 16]), tmp_path / "out.pt")

    assert report["details"]["quantized_modules"] == []
    assert "unchanged" in report["details"]["notes"][0]
    assert report["fidelity"]["max_abs_error"] == 0.0
    assert (
        report["parameters"]["before"]
        == report["parameters"]["after"]
        == sum(p.numel() for p in SmallConvNet().parameters())
    )


def test_report_measures_latency_and_parameters(small_transformer: Path, tmp_path: Path) -> None:
    report = compress(small_transformer, _spec([2, 8, 128]), tmp_path / "out.pt")

    latency = report["latency"]
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert latency["ratio"] == pytest.approx(latency["after_ms"] / latency["before_ms"], rel=1e-2)
    assert latency["batch_shape"] == [2, 8, 128] and latency["runs"] == 3
    # Quantization keeps every weight; freezing stores identical constants (fresh LayerNorms) once.
    assert 0.99 * report["parameters"]["before"] <= report["parameters"]["after"] <= report["parameters"]["before"]
    assert report["size"]["bytes_after"] == (tmp_path / "out.pt").stat().st_size


def test_progress_moves_forward_through_named_stages(small_transformer: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    compress(small_transformer, _spec([2, 8, 128]), tmp_path / "out.pt", progress=lambda s, f: seen.append((s, f)))

    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions)
    assert {"loading", "quantizing", "measuring latency"} <= {s for s, _ in seen}
    assert 0.0 <= fractions[0] and fractions[-1] <= 1.0
