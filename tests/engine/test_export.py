"""torch.export programs (.pt2) through the engine: quantize, prune, and crafted archives refused unloaded."""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from modelpress.archive import MAX_COMPRESSION_RATIO, ArchiveRejected, bounded_entries, check_torchscript_archive
from modelpress.formats import EXPORTED, TORCHSCRIPT, exported_program_problem, model_format
from modelpress.spec import parse_spec
from tests.exported_archives import (
    save_exported,
    with_graph_target,
    with_payload_in_sample_inputs,
    with_pickled_weight,
    with_shape_expression,
)
from tests.models import LinearTransformer, SmallConvNet, save_scripted, settle_batchnorm
from workers.engine.errors import InvalidModel, UnsupportedModel
from workers.engine.formats.exported import deflate_metadata, load_program
from workers.engine.run.pipeline import compress


def _spec(body: dict) -> dict:
    import json

    return parse_spec(json.dumps({"evaluation": {"runs": 2, "warmup": 1}, **body}), has_data=False, has_student=False)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = LinearTransformer(width=256, blocks=2).eval()
    path = save_exported(model, torch.randn(4, 16, 256), tmp_path_factory.mktemp("export") / "transformer.pt2")
    return model, path


def test_dynamic_int8_program_is_small_close_and_keeps_its_dynamic_batch(transformer, tmp_path: Path) -> None:
    model, path = transformer
    output = tmp_path / "out.pt2"
    report = compress(path, _spec({"method": "quantize", "input_shape": [4, 16, 256]}), output)

    assert model_format(path) == EXPORTED and model_format(output) == EXPORTED
    assert report["format"] == {"input": "pt2", "output": "pt2"}
    assert output.stat().st_size <= 0.30 * path.stat().st_size
    assert report["size"]["bytes_after"] == output.stat().st_size
    assert len(report["details"]["quantized"]) == 2 * 5 + 1
    program = torch.export.load(output)  # torch.export.load (torchao, imported here, registers the int8 ops)
    x = torch.randn(7, 16, 256)  # a batch size the example never had: the dynamic axis survived
    with torch.no_grad():
        got, expected = program.module()(x), model(x)
    assert got.shape == expected.shape == (7, 10)
    assert _cosine(got, expected) >= 0.999
    assert report["fidelity"]["cosine_similarity"] >= 0.999


def test_a_saved_program_s_graph_is_deflated_within_the_upload_bound_and_loads_the_same(
    transformer, tmp_path: Path
) -> None:
    """torch.export.save stores the graph's JSON uncompressed; a program the service saves has it deflated,
    and is still accepted as an upload (the zip-bomb bound) and computes what it did."""
    _, path = transformer
    stored = tmp_path / "stored.pt2"
    stored.write_bytes(path.read_bytes())
    graph_bytes = zipfile.ZipFile(stored).getinfo("transformer/models/model.json").file_size
    assert graph_bytes > 32 << 10  # the fault is there: a large graph stored as is

    saved = deflate_metadata(stored)

    entries = {info.filename: info for info in zipfile.ZipFile(stored).infolist()}
    graph = entries["transformer/models/model.json"]
    assert graph.compress_type == zipfile.ZIP_DEFLATED and saved > graph_bytes // 2
    assert graph.file_size / graph.compress_size <= MAX_COMPRESSION_RATIO  # a re-upload passes the bomb check
    bounded_entries(stored, 1 << 30, "stored")
    assert exported_program_problem(stored, list(entries)) is None
    x = torch.randn(3, 16, 256)
    with torch.no_grad():
        assert torch.equal(load_program(stored).module()(x), load_program(path).module()(x))
    # An entry that would deflate past the bound is left stored (and a small rewrite is not made at all).
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("a/models/model.json", b"[" + b"0," * (1 << 20) + b"0]")
    assert deflate_metadata(bomb) == 0
    assert zipfile.ZipFile(bomb).getinfo("a/models/model.json").compress_type == zipfile.ZIP_STORED


def test_float16_weights_halve_the_program(transformer, tmp_path: Path) -> None:
    model, path = transformer
    output = tmp_path / "out.pt2"
    compress(path, _spec({"method": "quantize", "quantize": {"dtype": "float16"}, "input_shape": [4, 16, 256]}), output)
    assert output.stat().st_size <= 0.55 * path.stat().st_size
    x = torch.randn(4, 16, 256)
    with torch.no_grad():
        assert _cosine(torch.export.load(output).module()(x), model(x)) >= 0.9999


def test_unstructured_pruning_zeros_half_the_conv_and_linear_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()
    path = save_exported(model, torch.randn(2, 3, 32, 32), tmp_path / "conv.pt2")
    output = tmp_path / "pruned.pt2"
    report = compress(path, _spec({"method": "prune", "prune": {"amount": 0.5}, "input_shape": [2, 3, 32, 32]}), output)

    program = torch.export.load(output)
    weights = [program.state_dict[entry["weight"]] for entry in report["details"]["layers"]]
    # Every conv and linear layer but the final classifier, which stays whole by default (as for TorchScript).
    assert [entry["weight"] for entry in report["details"]["layers"]] == ["0.weight", "2.weight", "5.weight"]
    assert not bool((program.state_dict["7.weight"] == 0).any())
    assert "the final layer '7' is excluded by default" in " ".join(report["details"]["notes"])
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.49 <= zeros <= 0.51 and report["details"]["sparsity"] == pytest.approx(zeros, abs=1e-4)
    assert report["size"]["deflate_bytes_after"] < 0.75 * report["size"]["deflate_bytes_before"]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert program.module()(x).shape == model(x).shape == (5, 10)


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_structured_pruning_removes_channels_of_a_program(dynamic_batch: bool, tmp_path: Path) -> None:
    model = settle_batchnorm(_SharedReluBlockNet(), (8, 3, 16, 16), seed=0)
    batch = 2 if dynamic_batch else 4
    path = save_exported(model, torch.randn(batch, 3, 16, 16), tmp_path / "net.pt2", dynamic_batch=dynamic_batch)
    output = tmp_path / "pruned.pt2"
    report = compress(
        path,
        _spec({"method": "prune", "prune": {"amount": 0.5, "structured": True}, "input_shape": [batch, 3, 16, 16]}),
        output,
    )

    assert model_format(output) == EXPORTED and report["format"] == {"input": "pt2", "output": "pt2"}
    before, program = torch.export.load(path), torch.export.load(output)
    assert sum(t.numel() for t in program.state_dict.values()) <= 0.35 * sum(
        t.numel() for t in before.state_dict.values()
    )
    # Both groups (the residual width the stem, conv2 and the head share, and conv1's rows) are halved.
    assert program.state_dict["conv1.weight"].shape == (16, 16, 3, 3)
    assert program.state_dict["head.2.weight"].shape == (10, 16)
    assert report["details"]["macs"]["after"] < 0.4 * report["details"]["macs"]["before"]
    rows = 5 if dynamic_batch else batch  # a batch size the example never had, where the program allows it
    x = torch.randn(rows, 3, 16, 16)
    with torch.no_grad():
        assert program.module()(x).shape == model(x).shape == (rows, 10)
    if not dynamic_batch:
        with pytest.raises(Exception):  # noqa: B017  the fixed batch stayed fixed (torch's error type varies)
            program.module()(torch.randn(5, 3, 16, 16))


def test_structured_pruning_of_a_program_narrows_transformer_feed_forward_layers(transformer, tmp_path: Path) -> None:
    _, path = transformer
    output = tmp_path / "out.pt2"
    report = compress(
        path,
        _spec({"method": "prune", "prune": {"amount": 0.5, "structured": True}, "input_shape": [4, 16, 256]}),
        output,
    )
    # The MLP hidden width is pruned; the residual width is read by attention's matmuls and stays.
    assert {(g["group"], g["channels_after"]) for g in report["details"]["groups"]} == {
        ("ffn.0.fc1", 512),
        ("ffn.1.fc1", 512),
    }
    program = torch.export.load(output)
    assert program.state_dict["ffn.0.fc1.weight"].shape == (512, 256)
    with torch.no_grad():
        assert program.module()(torch.randn(3, 16, 256)).shape == (3, 10)


def test_torchscript_and_programs_are_told_apart_by_layout_not_name(transformer, tmp_path: Path) -> None:
    _, path = transformer
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(path.read_bytes())
    scripted = save_scripted(SmallConvNet().eval(), tmp_path / "model.pt2")
    assert model_format(renamed) == EXPORTED and model_format(scripted) == TORCHSCRIPT
    check_torchscript_archive(renamed, 1 << 30)
    check_torchscript_archive(scripted, 1 << 30)


@pytest.mark.parametrize("craft", ["sample_inputs", "pickled_weight"])
def test_a_pickle_payload_is_refused_and_never_runs(craft: str, transformer, tmp_path: Path) -> None:
    _, genuine = transformer
    build = {"sample_inputs": with_payload_in_sample_inputs, "pickled_weight": with_pickled_weight}[craft]
    # The attack is real: plain torch.export.load of the crafted file runs the payload.
    proof = tmp_path / "proof"
    proof_file = tmp_path / "proof.pt2"
    proof_file.write_bytes(build(genuine, proof))
    with contextlib.suppress(Exception):  # it fails after the payload ran
        torch.export.load(proof_file)
    assert proof.exists()

    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(build(genuine, marker))
    with pytest.raises(ArchiveRejected, match="pickle"):
        check_torchscript_archive(crafted, 1 << 30)
    with pytest.raises(InvalidModel, match="pickle"):
        load_program(crafted)
    with pytest.raises(InvalidModel):
        compress(crafted, _spec({"method": "quantize", "input_shape": [4, 16, 256]}), tmp_path / "out.pt2")
    assert not marker.exists()


@pytest.mark.parametrize(
    "target, reason",
    [
        ("torch.os.system", "not a torch operator"),
        ("torch.ops.aten.from_file.default", "aten::from_file: it reads a file"),
        ("torch.ops.mylib.run.default", "outside torch's own operator namespaces"),
    ],
)
def test_graphs_calling_outside_torch_operators_are_refused(
    target: str, reason: str, transformer, tmp_path: Path
) -> None:
    _, genuine = transformer
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(with_graph_target(genuine, target))
    with pytest.raises(ArchiveRejected, match=reason):
        check_torchscript_archive(crafted, 1 << 30)
    with pytest.raises(InvalidModel, match=reason):
        load_program(crafted)


@pytest.mark.parametrize("expression", ["__import__('os').system('touch {marker}')", "eval(\"open('{marker}', 'w')\")"])
def test_a_shape_expression_carrying_code_is_refused_and_never_runs(
    expression: str, transformer, tmp_path: Path
) -> None:
    _, genuine = transformer
    # The attack is real: torch.export.load hands shape expressions to sympy.sympify, which evaluates them.
    proof = tmp_path / "proof"
    proof_file = tmp_path / "proof.pt2"
    proof_file.write_bytes(with_shape_expression(genuine, expression.format(marker=proof)))
    with contextlib.suppress(Exception):
        torch.export.load(proof_file)
    assert proof.exists()

    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(with_shape_expression(genuine, expression.format(marker=marker)))
    with pytest.raises(ArchiveRejected, match="shape expression"):
        check_torchscript_archive(crafted, 1 << 30)
    with pytest.raises(InvalidModel, match="shape expression"):
        load_program(crafted)
    assert not marker.exists()


def test_a_program_with_a_second_copy_of_an_entry_is_refused(transformer, tmp_path: Path) -> None:
    import zipfile

    _, genuine = transformer
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(genuine.read_bytes())
    with zipfile.ZipFile(crafted, "a") as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr(f"{root}/data/sample_inputs/model.pt", b"not checked by whoever reads the first copy")
    with pytest.raises(ArchiveRejected, match="same name"):
        check_torchscript_archive(crafted, 1 << 30)


def test_a_program_graph_nested_too_deep_to_parse_is_refused_with_a_reason(transformer, tmp_path: Path) -> None:
    from tests.exported_archives import replace_entries

    _, genuine = transformer
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(replace_entries(genuine.read_bytes(), {"models/model.json": b"[" * 100_000 + b"]" * 100_000}))
    with pytest.raises(ArchiveRejected, match="not valid JSON"):
        check_torchscript_archive(crafted, 1 << 30)


class _SharedReluBlockNet(torch.nn.Module):
    """resnet's BasicBlock pattern: one ReLU module called twice, an in-place residual add."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width), torch.nn.ReLU()
        )
        self.conv1, self.bn1 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.conv2, self.bn2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.stem(x)
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.head(self.relu(out))


def test_static_int8_program_quantizes_convs_with_a_shared_relu_and_keeps_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = settle_batchnorm(_SharedReluBlockNet(), (8, 3, 16, 16))
    path = save_exported(model, torch.randn(2, 3, 16, 16), tmp_path / "net.pt2")
    output = tmp_path / "int8.pt2"
    report = compress(
        path, _spec({"method": "quantize", "quantize": {"mode": "static"}, "input_shape": [8, 3, 16, 16]}), output
    )

    details = report["details"]
    assert details["mode"] == "static" and {entry["type"] for entry in details["quantized"]} == {"Conv2d", "Linear"}
    assert len(details["quantized"]) == 4  # three convs and the classifier
    program = torch.export.load(output)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in targets  # activations are int8 too
    stored = [*program.state_dict.values(), *program.constants.values()]
    conv_weights = [t for t in stored if isinstance(t, torch.Tensor) and t.dim() == 4]
    assert len(conv_weights) == 3 and all(t.dtype == torch.int8 for t in conv_weights)
    x = torch.randn(5, 3, 16, 16)  # dynamic batch kept
    with torch.no_grad():
        got, expected = program.module()(x), model(x)
    assert got.shape == expected.shape == (5, 10)
    assert _cosine(got, expected) >= 0.98
    assert report["fidelity"]["cosine_similarity"] >= 0.98


class _ImageAndIds(torch.nn.Module):
    """Two inputs, exported the common way: without dynamic_shapes, so the batch is fixed at 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image).mean((2, 3)), self.embed(ids).mean(1)], 1))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_program_with_a_fixed_batch_is_quantized_in_batches_it_accepts(mode: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ImageAndIds().eval()
    example = (torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 5)))
    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(model, example), path)
    spec = _spec(
        {
            "method": "quantize",
            "quantize": {"mode": mode},
            "inputs": [{"shape": [2, 3, 16, 16]}, {"shape": [2, 5], "dtype": "int64", "low": 0, "high": 50}],
        }
    )

    report = compress(path, spec, tmp_path / "out.pt2")

    assert report["latency"]["batch_shape"] == [2, 3, 16, 16]
    if mode == "static":
        assert report["details"]["calibration"]["rows"] % 2 == 0 and report["details"]["calibration"]["batches"] >= 1
    program = torch.export.load(tmp_path / "out.pt2")
    with torch.no_grad():
        assert _cosine(program.module()(*example), model(*example)) > 0.99


def test_a_search_toward_a_target_runs_on_a_program_and_returns_a_program(tmp_path: Path) -> None:
    import numpy as np

    model = settle_batchnorm(_SharedReluBlockNet(width=16), (8, 3, 16, 16), seed=0)
    path = save_exported(model, torch.randn(2, 3, 16, 16), tmp_path / "net.pt2")
    np.savez(
        tmp_path / "data.npz", inputs=torch.randn(60, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    )
    spec = parse_spec(
        {
            "method": "auto",
            "evaluation": {"runs": 1, "warmup": 0},
            "target": {"metric": "cosine", "max_drop": 0.2, "objective": "size"},
            "search": {"max_trials": 2},
        },
        has_data=True,
    )
    output = tmp_path / "out.pt2"

    report = compress(path, spec, output, data_path=tmp_path / "data.npz")

    trials = report["trials"]
    # The ladders a TorchScript model of these layers gets, cheapest first: dynamic int8 (the Linear head), static.
    assert [t["label"] for t in trials] == ["quantize dynamic", "quantize static"]
    assert all("error" not in t for t in trials), trials
    chosen = trials[report["chosen"] - 1]
    assert chosen["meets_target"] and chosen["bytes"] == output.stat().st_size
    assert model_format(output) == EXPORTED and report["format"] == {"input": "pt2", "output": "pt2"}
    with torch.no_grad():
        assert torch.export.load(output).module()(torch.randn(3, 3, 16, 16)).shape == (3, 10)


def test_a_fixed_batch_program_teaches_a_width_student_on_data_of_any_length(tmp_path: Path) -> None:
    import numpy as np

    model = settle_batchnorm(_SharedReluBlockNet(), (8, 3, 16, 16), seed=0)
    path = save_exported(model, torch.randn(4, 3, 16, 16), tmp_path / "teacher.pt2", dynamic_batch=False)
    np.savez(tmp_path / "data.npz", inputs=torch.randn(42, 3, 16, 16).numpy())  # 42 rows: not a multiple of 4
    spec = parse_spec(
        {
            "method": "distill",
            "evaluation": {"runs": 1, "warmup": 0},
            "distill": {
                "student": {"from": "width", "width": 0.5},
                "epochs": 2,
                "batch_size": 16,
                "val_fraction": 0.25,
            },
        },
        has_data=True,
    )
    output = tmp_path / "student.pt2"

    report = compress(path, spec, output, data_path=tmp_path / "data.npz")

    assert report["details"]["student"]["from"] == "width"
    assert {g["channels_after"] for g in report["details"]["student"]["groups"]} == {16}
    program = torch.export.load(output)
    assert program.state_dict["conv1.weight"].shape == (16, 16, 3, 3)
    assert report["fidelity"]["samples"] > 4  # measured on more rows than one batch of the program
    with torch.no_grad():
        assert program.module()(torch.randn(4, 3, 16, 16)).shape == (4, 10)


def test_fine_tuning_a_pruned_fixed_batch_program_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = save_exported(
        settle_batchnorm(_SharedReluBlockNet(), (8, 3, 16, 16), seed=0),
        torch.randn(4, 3, 16, 16),
        tmp_path / "net.pt2",
        dynamic_batch=False,
    )
    import numpy as np

    np.savez(tmp_path / "data.npz", inputs=torch.randn(32, 3, 16, 16).numpy(), labels=np.arange(32) % 10)
    spec = parse_spec(
        {
            "method": "prune",
            "evaluation": {"runs": 1, "warmup": 0},
            "prune": {"amount": 0.5, "structured": True, "finetune": {"epochs": 1}},
        },
        has_data=True,
    )
    with pytest.raises(UnsupportedModel, match="exactly 4 rows"):
        compress(path, spec, tmp_path / "out.pt2", data_path=tmp_path / "data.npz")


@pytest.fixture(scope="module")
def timed_under(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """A dynamic int8 job on a small MLP timed under a runtime, run once per runtime for the module: its
    report, how many int8 linear patterns inductor matched, and the folders ``tempfile.mkdtemp`` made
    meanwhile. An AOTInductor compile costs tens of CPU seconds, and the job makes two."""
    import tempfile

    from torch._dynamo.utils import counters

    jobs: dict[str, dict] = {}

    def get(runtime: str) -> dict:
        if runtime in jobs:
            return jobs[runtime]
        tmp_path = tmp_path_factory.mktemp(f"timed-{runtime}")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
        path = save_exported(model, torch.randn(4, 64), tmp_path / "mlp.pt2")
        made, mkdtemp = [], tempfile.mkdtemp
        counters.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
            spec = {"method": "quantize", "input_shape": [4, 64], "evaluation": {"runs": 2, "warmup": 1}}
            spec["evaluation"]["runtime"] = runtime
            report = compress(path, _spec(spec), tmp_path / "int8.pt2")
        matched = counters["inductor"]["qlinear_weight_prepack_matcher_count"]
        jobs[runtime] = {"report": report, "int8_linear_matches": matched, "folders": made}
        return jobs[runtime]

    return get


@pytest.mark.parametrize("runtime", ["aoti", "compile"])
def test_an_int8_program_is_timed_as_int8_kernels_under_inductor(runtime: str, timed_under) -> None:
    """Under compile/aoti the int8 program must reach oneDNN's int8 linear, not dequantized float ops;
    compiling with autograd on (no freezing) silently gave the float ops, 2.3x slower than float."""
    job = timed_under(runtime)
    assert job["report"]["latency"]["runtime"] == runtime and job["report"]["latency"]["after_ms"] > 0
    assert job["int8_linear_matches"] >= 2  # both Linear layers became int8 kernels
    assert job["report"]["fidelity"]["cosine_similarity"] >= 0.999


def test_package_aoti_returns_a_compiled_package_that_computes_what_the_program_does(tmp_path: Path) -> None:
    """An int8 program compiled by AOTInductor must compute what the program does: full-range int8
    activations saturate oneDNN's kernels on CPUs without VNNI (16% of the largest output here)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10)).eval()
    path = save_exported(model, torch.randn(8, 512), tmp_path / "mlp.pt2")
    spec = {"method": "quantize", "input_shape": [8, 512]}
    compress(path, _spec(spec), tmp_path / "program.pt2")
    output = tmp_path / "out.pt2"
    report = compress(path, _spec({**spec, "package": "aoti"}), output)

    assert report["format"] == {"input": "pt2", "output": "aoti"} and report["details"]["reduce_range"] is True
    assert (
        report["package"]["bytes"] == output.stat().st_size
        and report["package"]["max_relative_error_to_program"] < 1e-2
    )
    assert not report["warnings"]
    with pytest.raises(Exception):  # noqa: B017  whatever torch.export.load raises on a package
        torch.export.load(output)  # not a program any more: a package of compiled kernels
    compiled = torch._inductor.aoti_load_package(str(output))
    x = torch.randn(7, 512)  # the program's dynamic batch survived compilation
    with torch.no_grad():
        got, expected = compiled(x), torch.export.load(tmp_path / "program.pt2").module()(x)
    assert got.shape == expected.shape == (7, 10)
    assert float((got - expected).abs().max()) <= 1e-2 * float(expected.abs().max())


def test_timing_the_aoti_runtime_leaves_no_package_folder_behind(timed_under) -> None:
    """The package timed for evaluation.runtime aoti is compiled into an ``mp-aoti-*`` folder, which
    must be gone once it is loaded (one was left per timed model per job); the loaded package runs on:
    the latency run times it after its folder is gone."""
    job = timed_under("aoti")
    folders = [Path(name) for name in job["folders"] if Path(name).name.startswith("mp-aoti-")]
    assert len(folders) == 2  # the float program and its int8 result, each timed
    assert not [folder for folder in folders if folder.exists()]
    assert job["report"]["latency"]["before_ms"] > 0 and job["report"]["latency"]["after_ms"] > 0


class _DepthwiseNormBlock(torch.nn.Module):
    """ConvNeXt's pattern: a depthwise conv, a LayerNorm over channels-last activations, a residual."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = torch.nn.LayerNorm(width)
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        x = x + self.down(torch.nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.head(x.mean(dim=(2, 3)))


def test_structured_pruning_of_a_program_rewrites_conv_groups_and_layer_norm_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DepthwiseNormBlock().eval()
    path = save_exported(model, torch.randn(2, 3, 12, 12), tmp_path / "block.pt2")
    output = tmp_path / "pruned.pt2"
    report = compress(
        path,
        _spec({"method": "prune", "prune": {"amount": 0.5, "structured": True}, "input_shape": [2, 3, 12, 12]}),
        output,
    )

    program = torch.export.load(output)
    assert program.state_dict["depthwise.weight"].shape == (8, 1, 3, 3) and program.state_dict["norm.weight"].shape == (
        8,
    )
    convs = [
        n
        for n in program.graph.nodes
        if n.target == torch.ops.aten.conv2d.default and n.args[1].name.endswith("depthwise_weight")
    ]
    assert convs and convs[0].args[6] == 8  # groups followed the removed channels
    norms = [n for n in program.graph.nodes if n.target == torch.ops.aten.layer_norm.default]
    assert norms and list(norms[0].args[1]) == [8]
    assert any(g.get("layer_norms_renormalised") for g in report["details"]["groups"])
    with torch.no_grad():
        assert program.module()(torch.randn(5, 3, 12, 12)).shape == (5, 10)


def test_recurrent_layers_of_a_program_get_float16_weights_and_int8_says_it_leaves_them(tmp_path: Path) -> None:
    from tests.models import Recurrent

    torch.manual_seed(0)
    model = Recurrent().eval()
    path = save_exported(model, torch.randn(4, 12, 32), tmp_path / "rnn.pt2")
    half = compress(
        path,
        _spec({"method": "quantize", "quantize": {"dtype": "float16"}, "input_shape": [4, 12, 32]}),
        tmp_path / "fp16.pt2",
    )
    assert {entry["type"] for entry in half["details"]["quantized"]} == {"LSTM", "GRU"}  # the head is too small
    assert half["size"]["ratio"] <= 0.6 and half["fidelity"]["cosine_similarity"] >= 0.999
    with torch.no_grad():
        assert torch.export.load(tmp_path / "fp16.pt2").module()(torch.randn(3, 12, 32)).shape == (3, 5)

    int8 = compress(path, _spec({"method": "quantize", "input_shape": [4, 12, 32]}), tmp_path / "int8.pt2")
    assert {entry["type"] for entry in int8["details"]["left_float"]} == {"LSTM", "GRU"}
    assert any("recurrent layers (lstm, gru" in warning for warning in int8["warnings"])  # not a silent no-op


class _SizeReadingNet(torch.nn.Module):
    """Reads the batch size in forward (a flatten written with x.size(0)), as many hand-written models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.conv2(torch.relu(self.conv1(x))), 4)
        return self.fc(x.view(x.size(0), -1))


def test_structured_pruning_of_a_program_that_reads_its_batch_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _SizeReadingNet().eval()
    path = save_exported(model, torch.randn(2, 3, 8, 8), tmp_path / "net.pt2")
    report = compress(
        path,
        _spec({"method": "prune", "prune": {"amount": 0.5, "structured": True}, "input_shape": [2, 3, 8, 8]}),
        tmp_path / "out.pt2",
    )
    # The trace must follow the batch size, or every slicing fails its check at batches of 1 and 8.
    assert [(g["group"], g["channels_after"]) for g in report["details"]["groups"]] == [("conv1", 8), ("conv2", 4)]
    with torch.no_grad():
        assert torch.export.load(tmp_path / "out.pt2").module()(torch.randn(5, 3, 8, 8)).shape == (5, 10)
