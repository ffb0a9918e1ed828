"""Several inputs of any dtype, outputs of any structure, and the warnings a result carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.options import job_options
from modelpress.spec import parse_spec
from tests.models import DictHeads, ImageAndIds, SmallConvNet, TokenLSTM, TupleHeads, save_scripted
from workers.engine.errors import InvalidInput
from workers.engine.inputs import load_dataset, random_inputs
from workers.engine.run.pipeline import compress

QUICK = {"evaluation": {"runs": 1, "warmup": 0}}


def _compress(model: Path, spec: dict, tmp_path: Path, data: Path | None = None) -> dict:
    return compress(
        model, parse_spec({**QUICK, **spec}, has_data=data is not None), tmp_path / "out.pt", data_path=data
    )


def test_random_inputs_follow_the_declared_dtypes_and_ranges() -> None:
    spec = parse_spec(
        {
            "method": "quantize",
            "inputs": [
                {"shape": [64, 30], "dtype": "int64", "low": 5, "high": 9},
                {"shape": [64, 2], "dtype": "int32"},
                {"shape": [64, 3], "dtype": "bool"},
                {"shape": [64, 4], "dtype": "bfloat16", "low": -2, "high": -1},
                {"shape": [64, 500]},
            ],
        }
    )
    ids, small, flags, uniform, normal = random_inputs(job_options(spec).inputs, seed=0)

    assert ids.dtype == torch.int64 and int(ids.min()) == 5 and int(ids.max()) == 8
    assert small.dtype == torch.int32 and 0 <= int(small.min()) and int(small.max()) < 100
    assert flags.dtype == torch.bool and 0 < int(flags.sum()) < flags.numel()
    assert uniform.dtype == torch.bfloat16 and float(uniform.min()) >= -2 and float(uniform.max()) <= -1
    assert normal.dtype == torch.float32 and abs(float(normal.std()) - 1) < 0.05


def test_numbered_inputs_keep_their_dtypes_and_must_not_have_gaps(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {
            "input_0": torch.zeros(6, 3, dtype=torch.bfloat16),
            "input_1": torch.arange(12).view(6, 2),
            "labels": torch.arange(6),
        },
        str(tmp_path / "d.safetensors"),
    )
    data = load_dataset(tmp_path / "d.safetensors")
    assert [t.dtype for t in data.inputs] == [torch.bfloat16, torch.int64] and len(data) == 6

    np.savez(tmp_path / "gap.npz", input_0=np.zeros((4, 3), np.float32), input_2=np.zeros((4, 3), np.float32))
    with pytest.raises(InvalidInput, match="without gaps: found input_0, input_2"):
        load_dataset(tmp_path / "gap.npz")
    np.savez(tmp_path / "rows.npz", input_0=np.zeros((4, 3), np.float32), input_1=np.zeros((5, 3), np.int64))
    with pytest.raises(InvalidInput, match=r"one row per sample: the data file has input_0 \[4, 3\], input_1 \[5, 3\]"):
        load_dataset(tmp_path / "rows.npz")


def test_random_token_ids_out_of_the_vocabulary_say_how_to_set_the_range(tmp_path: Path) -> None:
    model = save_scripted(TokenLSTM(vocab=50), tmp_path / "tokens.pt")
    with pytest.raises(InvalidInput, match=r"spec.inputs.0 is random in \[0, 100\): set low/high"):
        _compress(model, {"method": "quantize", "inputs": [{"shape": [2, 7], "dtype": "int64"}]}, tmp_path)


def test_too_few_declared_inputs_name_the_model_parameters(tmp_path: Path) -> None:
    model = save_scripted(ImageAndIds(), tmp_path / "two.pt")
    with pytest.raises(InvalidInput, match=r"forward takes 2 input\(s\) \(image, ids\) but the spec declares 1"):
        _compress(model, {"method": "quantize", "input_shape": [2, 3, 8, 8]}, tmp_path)


def test_data_file_that_contradicts_the_spec_fails_before_compressing(tmp_path: Path) -> None:
    model = save_scripted(ImageAndIds(), tmp_path / "two.pt")
    np.savez(tmp_path / "d.npz", input_0=np.zeros((4, 3, 8, 8), np.float32), input_1=np.zeros((4, 6), np.int32))
    spec = {"method": "quantize", "inputs": [{"shape": [1, 3, 8, 8]}, {"shape": [1, 6], "dtype": "int64"}]}
    with pytest.raises(
        InvalidInput, match=r"spec\.inputs\.1\.dtype: int64 declared, but the data file's 'input_1' holds int32"
    ):
        _compress(model, spec, tmp_path, data=tmp_path / "d.npz")


def test_tuple_outputs_are_compared_one_by_one_and_finetuning_uses_the_chosen_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_scripted(TupleHeads(), tmp_path / "tuple.pt")
    x = torch.randn(96, 12)
    labels = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # learnable from the inputs
    np.savez(tmp_path / "d.npz", inputs=x.numpy(), labels=labels.numpy())
    spec = {"method": "prune", "prune": {"amount": 0.3, "finetune": {"epochs": 15, "lr": 0.01, "batch_size": 16}}}

    with pytest.raises(InvalidInput, match=r"'labels' need class scores \[batch, classes\].*shape \[16, 2, 3\]"):
        _compress(model, spec, tmp_path, data=tmp_path / "d.npz")  # the first output is not class scores
    report = _compress(model, {**spec, "output": 1}, tmp_path, data=tmp_path / "d.npz")

    outputs = report["fidelity"]["outputs"]
    assert [(o["name"], o["shape"]) for o in outputs] == [("0", [32, 2, 3]), ("1", [32, 4])]
    assert outputs[0]["top1_agreement"] is None and outputs[1]["top1_agreement"] is not None
    assert report["accuracy"]["after"] >= report["accuracy"]["before"] + 0.3
    loaded = torch.jit.load(str(tmp_path / "out.pt"))
    assert [tuple(t.shape) for t in loaded(x[:5])] == [(5, 2, 3), (5, 4)]


def test_dict_outputs_are_named_by_key_and_a_missing_key_is_refused(tmp_path: Path) -> None:
    model = save_scripted(DictHeads(), tmp_path / "dict.pt")
    spec = {"method": "quantize", "input_shape": [4, 12]}
    with pytest.raises(
        InvalidInput,
        match=r"spec\.output is 'logits' but the model's dict output has the keys "
        "'embedding', 'scores'",
    ):
        _compress(model, {**spec, "output": "logits"}, tmp_path)
    report = _compress(model, {**spec, "output": "scores"}, tmp_path)
    assert [o["name"] for o in report["fidelity"]["outputs"]] == ["embedding", "scores"]
    assert report["warnings"] == []


def test_quantizing_nothing_and_collapsed_outputs_are_warned(tmp_path: Path) -> None:
    conv = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    report = _compress(conv, {"method": "quantize", "input_shape": [2, 3, 8, 8]}, tmp_path)
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith("nothing was quantized")

    torch.manual_seed(0)
    heads = save_scripted(TupleHeads(), tmp_path / "heads.pt")
    report = _compress(
        heads,
        {"method": "prune", "input_shape": [64, 12], "prune": {"amount": 0.97, "scope": "per_layer", "exclude": []}},
        tmp_path,
    )
    collapsed = [w for w in report["warnings"] if w.startswith("outputs collapsed: output '1' has top-1 agreement")]
    assert len(collapsed) == 1 and "measured on random inputs" in collapsed[0]
    assert report["fidelity"]["outputs"][1]["top1_agreement"] < 0.5
