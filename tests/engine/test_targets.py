"""Export targets on their real runtimes: a small CNN (TorchScript and .pt2) to ONNX, OpenVINO IR and
ExecuTorch, float and static int8, each run on its own runtime and compared with torch; dynamic
int8 of a Linear model on ONNX; the torch-free runner; a model ONNX cannot express; missing runtimes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelpress import targets as shared
from modelpress.formats import EXPORTED, TORCHSCRIPT
from tests.models import settle_batchnorm
from workers.engine.errors import CompressionError, TargetFailed
from workers.engine.targets import executorch as executorch_target
from workers.engine.targets.common import Artifact, TargetRequest
from workers.engine.targets.onnx import operator_types
from workers.engine.targets.openvino import ir_operations
from workers.engine.targets.registry import TARGETS, export_target, missing_runtime, target_module

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 3, 16, 16)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class SmallMLP(nn.Module):
    """Transformer-ish: Linear layers over a sequence, a residual and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.norm, self.head = (
            nn.Linear(32, 128),
            nn.Linear(128, 32),
            nn.LayerNorm(32),
            nn.Linear(32, 8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.down(torch.relu(self.up(x)))).mean(dim=1))


class TwoInputsTwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.a(x) + self.b(y))
        return self.head(hidden), hidden.mean(dim=1)


class Eigenvalues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


@pytest.fixture(scope="module")
def cnn() -> dict:
    torch.manual_seed(0)
    model = settle_batchnorm(SmallCNN(), (8, *SHAPE[1:]), seed=0)
    example = (torch.randn(SHAPE),)
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    test = torch.randn(SHAPE)
    return {
        "models": {TORCHSCRIPT: torch.jit.script(model), EXPORTED: program},
        "example": example,
        # batches of 8 rows for a model timed on 4: ExecuTorch's fixed-batch program regroups them
        "calibration": [(torch.randn(8, *SHAPE[1:]),) for _ in range(4)],
        "test": test,
        "expected": model(test).detach().numpy(),
    }


@pytest.fixture(scope="module")
def artifacts(cnn: dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, str | None], Artifact]:
    """Each (target, format, quantize) exported once for the module."""
    made: dict[tuple, Artifact] = {}
    root = tmp_path_factory.mktemp("targets")

    def get(target: str, format_name: str, quantize: str | None) -> Artifact:
        key = (target, format_name, quantize)
        if key not in made:
            request = TargetRequest(
                cnn["models"][format_name],
                format_name,
                cnn["example"],
                cnn["calibration"],
                quantize=quantize,
                per_channel=True,
            )
            made[key] = export_target(target, request, root / "-".join(map(str, key)))
        return made[key]

    return get


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _weight_bytes(artifact: Artifact) -> int:
    with zipfile.ZipFile(artifact.path) as archive:
        return archive.getinfo("model.bin").file_size


def _run(artifact: Artifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    module = target_module(artifact.target)
    return module.run(module.load(artifact.path), inputs)


@pytest.mark.parametrize("format_name", [TORCHSCRIPT, EXPORTED])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_float_artifact_runs_on_its_runtime_like_torch(target: str, format_name: str, cnn: dict, artifacts) -> None:
    artifact = artifacts(target, format_name, None)
    assert artifact.precision == "float32" and artifact.path.is_file()
    assert artifact.runtime.startswith(TARGETS[target].facts.runtime + " ")
    [output] = _run(artifact, [cnn["test"].numpy()])
    assert output.shape == cnn["expected"].shape
    assert np.abs(output - cnn["expected"]).max() <= 1e-4 * max(1.0, np.abs(cnn["expected"]).max())


@pytest.mark.parametrize("format_name", [TORCHSCRIPT, EXPORTED])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_static_int8_artifact_is_int8_and_close_to_torch(target: str, format_name: str, cnn: dict, artifacts) -> None:
    float_artifact, artifact = artifacts(target, format_name, None), artifacts(target, format_name, "static")
    assert artifact.precision == "int8"
    [output] = _run(artifact, [cnn["test"].numpy()])
    assert _cosine(output, cnn["expected"]) >= 0.99
    # int8 weights: a quarter of the float file's weight bytes (OpenVINO's: its .bin; the .xml is text)
    size = _weight_bytes if target == "openvino" else (lambda a: a.bytes)
    assert size(artifact) < 0.6 * size(float_artifact), (size(artifact), size(float_artifact))
    if target == "onnx":
        operators = operator_types(artifact.path)
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(operators), operators
    elif target == "openvino":
        operations = ir_operations(artifact.path)
        assert operations["FakeQuantize"] >= 4 and operations["Const:i8"] >= 4, operations
        assert "FakeQuantize" not in ir_operations(float_artifact.path)
    else:
        quantized = next(note for note in artifact.notes if note.startswith("PT2E"))
        assert int(quantized.split(": ")[1].split()[0]) >= 4, artifact.notes
        assert "XNNPACK delegate calls: " in " ".join(artifact.notes)
        assert not any("quantize" in note for note in float_artifact.notes if "portable" in note)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_dynamic_int8_quantizes_the_linear_layers(target: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = SmallMLP().eval()
    example = (torch.randn(2, 6, 32),)
    request = TargetRequest(torch.jit.script(model), TORCHSCRIPT, example, quantize="dynamic", per_channel=True)
    artifact = export_target(target, request, tmp_path)
    # ONNX: another batch size too (its batch axis is dynamic); ExecuTorch's program is fixed to the example's
    test = torch.randn(2 if target == "executorch" else 5, 6, 32)
    [output] = _run(artifact, [test.numpy()])
    assert _cosine(output, model(test).detach().numpy()) >= 0.99
    if target == "onnx":
        assert artifact.precision == "int8-dynamic" and artifact.batch is None
        operators = operator_types(artifact.path)
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= set(operators), operators
    elif target == "openvino":  # weight-only int8: OpenVINO has no dynamic activation quantization to export
        assert artifact.precision == "int8-weights"
        operations = ir_operations(artifact.path)
        assert operations["Const:i8"] == 3 and not operations["FakeQuantize"], operations
    else:
        assert artifact.precision == "int8-dynamic" and artifact.batch == 2
        assert any(
            note.startswith("PT2E with the XNNPACK quantizer (dynamic") and ": 3 quantize" in note
            for note in artifact.notes
        ), artifact.notes


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fixed_batch_program_with_two_inputs_and_outputs(target: str, tmp_path: Path) -> None:
    """A .pt2 exported for batches of 4, calibrated on batches of 6 (regrouped to 4 rows each)."""
    torch.manual_seed(0)
    model = TwoInputsTwoOutputs().eval()
    example = (torch.randn(4, 16), torch.randn(4, 8))
    calibration = [(torch.randn(6, 16), torch.randn(6, 8)) for _ in range(3)]
    request = TargetRequest(torch.export.export(model, example), EXPORTED, example, calibration, quantize="static")
    artifact = export_target(target, request, tmp_path)
    assert artifact.batch == 4 and artifact.input_names == ("input_0", "input_1")
    outputs = _run(artifact, [t.numpy() for t in example])
    expected = [t.detach().numpy() for t in model(*example)]
    assert [o.shape for o in outputs] == [(4, 4), (4,)]
    assert all(_cosine(o, e) >= 0.99 for o, e in zip(outputs, expected))


@pytest.mark.parametrize(
    "target,format_name", [("onnx", TORCHSCRIPT), ("openvino", TORCHSCRIPT), ("executorch", EXPORTED)]
)
def test_runner_runs_artifacts_without_importing_torch(
    target: str, format_name: str, cnn: dict, artifacts, tmp_path: Path
) -> None:
    if target == "executorch":
        assert executorch_target.native_runner() is not None, "pte_run is not built: run 'make pte-runner'"
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, input_0=cnn["test"].numpy())
    artifact = artifacts(target, format_name, "static")
    outputs = tmp_path / f"{target}.npz"
    script = (
        "import sys\n"
        "from workers.engine.targets.runner import main\n"
        f"code = main({[target, str(artifact.path), str(inputs), str(outputs), '--time', '3']!r})\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    assert timing["target"] == target and timing["median_ms"] > 0
    with np.load(outputs) as stored:
        assert stored.files == ["output_0"]
        np.testing.assert_allclose(stored["output_0"], _run(artifact, [cnn["test"].numpy()])[0], rtol=0, atol=1e-5)


def test_pte_run_is_executorch_without_torch(cnn: dict, artifacts, tmp_path: Path) -> None:
    """The C++ runner links no libtorch, runs the program like the Python bindings, and refuses bad input."""
    binary = executorch_target.native_runner()
    assert binary is not None, "pte_run is not built: run 'make pte-runner'"
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "libexecutorch.so" in linked and "libtorch" not in linked and "libc10" not in linked, linked
    artifact = artifacts("executorch", EXPORTED, "static")
    np.save(tmp_path / "x.npy", cnn["test"].numpy())
    done = subprocess.run(
        [str(binary), str(artifact.path), "--out", str(tmp_path), "--runs", "2", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    expected = _run(artifact, [cnn["test"].numpy()])[0]
    assert summary["outputs"] == [{"file": "output_0.npy", "dtype": "<f4", "shape": list(expected.shape)}]
    assert summary["runs"] == 2 and summary["latency_ms"] > 0
    np.testing.assert_allclose(np.load(tmp_path / "output_0.npy"), expected, rtol=0, atol=1e-5)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    refused = subprocess.run(
        [str(binary), str(artifact.path), "--out", str(tmp_path), str(tmp_path / "bad.npy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "is not a .npy file" in refused.stderr


def test_latency_is_the_median_of_timed_runs(cnn: dict, artifacts) -> None:
    module = target_module("onnx")
    loaded = module.load(artifacts("onnx", TORCHSCRIPT, None).path)
    latency = module.latency_ms(loaded, [cnn["test"].numpy()], runs=5, warmup=1, max_seconds=5.0)
    assert isinstance(latency, float) and latency > 0  # a measurement was made; its size is bench/'s business


def test_a_model_onnx_cannot_express_fails_with_the_exporters_reason(tmp_path: Path) -> None:
    request = TargetRequest(torch.jit.script(Eigenvalues()), TORCHSCRIPT, (torch.randn(2, 4, 4),))
    with pytest.raises(TargetFailed) as failed:
        export_target("onnx", request, tmp_path)
    message = str(failed.value)
    assert isinstance(failed.value, CompressionError) and failed.value.slug == "target-failed"
    assert message.startswith("onnx: torch's ONNX exporter could not export the model: ")
    assert "aten::linalg_eigh" in message and "\n" not in message


def test_missing_runtime_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TARGETS:
        assert missing_runtime(name) is None
    facts = shared.TARGETS["openvino"]
    monkeypatch.setitem(
        shared.TARGETS, "openvino", dataclasses.replace(facts, packages=("openvino", "no_such_runtime_pkg"))
    )
    reason = missing_runtime("openvino")
    assert reason is not None and "no_such_runtime_pkg" in reason and "openvino" in reason
    assert "unknown export target" in missing_runtime("tensorrt")


def test_request_refuses_static_int8_without_calibration(cnn: dict) -> None:
    with pytest.raises(ValueError, match="calibration"):
        TargetRequest(cnn["models"][TORCHSCRIPT], TORCHSCRIPT, cnn["example"], quantize="static")
    with pytest.raises(ValueError, match="quantize"):
        TargetRequest(cnn["models"][TORCHSCRIPT], TORCHSCRIPT, cnn["example"], quantize="int4")


class _NormalizedInput(nn.Module):
    """A BatchNorm with no conv before it, which prepare_pt2e's conv-BatchNorm fold leaves in place."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


@pytest.mark.parametrize("model", ["folded", "left"])
def test_the_xnnpack_quantizer_looks_for_conv_bn_patterns_only_where_a_batch_norm_is_left(
    model: str, cnn: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each conv-bn pattern search exports pattern graphs (seconds a job); after prepare_pt2e's fold a
    small CNN has no BatchNorm for them to match. Where one is left, they are still searched."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    searched = []
    for name in ("conv_bn", "conv_bn_relu", "conv_transpose_bn", "conv_transpose_bn_relu"):
        annotate = xnnpack_quantizer.OP_TO_ANNOTATOR[name]
        monkeypatch.setitem(
            xnnpack_quantizer.OP_TO_ANNOTATOR, name, lambda *a, _f=annotate, _n=name: searched.append(_n) or _f(*a)
        )
    if model == "folded":
        program = cnn["models"][EXPORTED]
    else:
        network = settle_batchnorm(_NormalizedInput(), (8, *SHAPE[1:]), seed=0)
        program = torch.export.export(network, cnn["example"])
    prepared = prepare_pt2e(
        program.module(), executorch_target.xnnpack_quantizer(get_symmetric_quantization_config(is_per_channel=True))
    )

    observers = [node for node in prepared.graph.nodes if "activation_post_process" in str(node.target)]
    assert len(observers) >= 3  # the convolutions are annotated either way
    if model == "folded":
        assert searched == []
        assert not any("batch_norm" in str(node.target) for node in prepared.graph.nodes)
    else:
        assert sorted(set(searched)) == ["conv_bn", "conv_bn_relu", "conv_transpose_bn", "conv_transpose_bn_relu"]


class _Upsampler(nn.Module):
    def __init__(self, bilinear: bool) -> None:
        super().__init__()
        self.bilinear, self.conv = bilinear, nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return nn.functional.interpolate(x, scale_factor=2, mode="bilinear") if self.bilinear else torch.relu(x)


@pytest.mark.parametrize("bilinear", [False, True])
def test_xnnpack_s_bilinear_pattern_search_runs_only_for_graphs_that_upsample(
    bilinear: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search builds pattern graphs (seconds, once a job); without upsampling it finds nothing and
    is skipped. A model that upsamples is still searched and runs on ExecuTorch as it does in torch."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d

    built = []
    patterns = bilinear_2d.get_graphs_dict
    monkeypatch.setattr(bilinear_2d, "get_graphs_dict", lambda: built.append(1) or patterns())
    torch.manual_seed(0)
    model, example = _Upsampler(bilinear).eval(), (torch.randn(2, 3, 8, 8),)
    request = TargetRequest(torch.export.export(model, example), EXPORTED, example, [])

    artifact = export_target("executorch", request, tmp_path / "pte")

    assert bool(built) == bilinear
    [output] = _run(artifact, [example[0].numpy()])
    assert output.shape == ((2, 4, 16, 16) if bilinear else (2, 4, 8, 8))
    assert _cosine(output, model(*example).detach().numpy()) >= 0.999
