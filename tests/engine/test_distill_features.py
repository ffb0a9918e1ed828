"""Feature distillation (hint losses between layers) and distillation schedules, on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.exported_archives import save_exported
from tests.models import DigitsCNN, save_scripted
from workers.engine.errors import InvalidInput, UnsupportedModel
from workers.engine.inputs import load_dataset
from workers.engine.layer_outputs import LayerReader, readable_layers
from workers.engine.measure import count_parameters
from workers.engine.methods.distill.torchscript import width_student
from workers.engine.run.pipeline import compress


def _spec(**distill: object) -> dict:
    options = {"student": {"source": "width", "width": 0.25}, "epochs": 4, "lr": 3e-3, "seed": 0}
    options.update(distill)
    return {"method": "distill", "seed": 0, "evaluation": {"runs": 1, "warmup": 0}, "distill": options}


def _channels(groups: list[dict]) -> dict[str, tuple[int, int]]:
    return {g["group"]: (g["channels_before"], g["channels_after"]) for g in groups}


@pytest.fixture(scope="module")
def hinted(digits: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A width-1/4 student distilled with the default hints (4 epochs): the report and the saved file."""
    output = tmp_path_factory.mktemp("hinted") / "student.pt"
    report = compress(digits["model"], _spec(features={}), output, data_path=digits["labelled"])
    return {"report": report, "output": output}


def test_the_hint_loss_is_reported_per_epoch_and_decreases(hinted: dict) -> None:
    details = hinted["report"]["details"]
    curve = details["epochs"]

    assert [row["epoch"] for row in curve] == [1, 2, 3, 4]
    for row in curve:  # the total is the logit loss plus weight (1.0) x the hint loss
        assert row["train_loss"] == pytest.approx(row["logit_loss"] + row["hint_loss"], abs=1e-4)
    assert curve[-1]["hint_loss"] < 0.8 * curve[0]["hint_loss"]
    # Matched automatically: the last conv of each stage (8x8: features.3, 4x4: features.7), student 1/4 as wide.
    pairs = details["features"]["pairs"]
    assert [(p["student"], p["teacher"]) for p in pairs] == [("features.3", "features.3"), ("features.7", "features.7")]
    assert [(p["student_shape"], p["teacher_shape"]) for p in pairs] == [
        ([2, 16, 8, 8], [2, 64, 8, 8]),
        ([2, 32, 4, 4], [2, 128, 4, 4]),
    ]
    assert [p["projection"] for p in pairs] == [
        "conv 1x1 16 -> 64 channels (axis 1)",
        "conv 1x1 32 -> 128 channels (axis 1)",
    ]
    assert details["features"]["weight"] == 1.0
    assert details["validation"]["accuracy"] > 0.8


def test_the_projections_are_not_part_of_the_saved_student(hinted: dict, digits: dict) -> None:
    saved = torch.jit.load(str(hinted["output"]))
    plain, _ = width_student(torch.jit.load(str(digits["model"])), 0.25, load_dataset(digits["labelled"]))

    assert {k: tuple(v.shape) for k, v in saved.state_dict().items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }
    assert count_parameters(saved) == count_parameters(plain) == hinted["report"]["parameters"]["after"]
    projections = sum(p["projection_parameters"] for p in hinted["report"]["details"]["features"]["pairs"])
    assert projections == 16 * 64 + 64 + 32 * 128 + 128


def test_a_two_step_schedule_goes_through_an_assistant_within_the_same_epochs(digits: dict, tmp_path: Path) -> None:
    report = compress(
        digits["model"], _spec(epochs=3, schedule={"steps": 2}), tmp_path / "student.pt", data_path=digits["labelled"]
    )

    details = report["details"]
    schedule = details["schedule"]
    assert schedule["widths"] == [0.5, 0.25] and schedule["epoch_budget"] == [1, 2]  # sqrt(1/4), then 1/4
    assistant, student = schedule["steps"]
    assert (assistant["role"], assistant["distilled_from"], student["role"], student["distilled_from"]) == (
        "assistant",
        "teacher",
        "student",
        "step 1",
    )
    assert [len(assistant["epochs"]), len(student["epochs"])] == [1, 2]  # 3 epochs in all, as without a schedule
    assert _channels(assistant["groups"]) == {"features.0": (32, 16), "features.3": (64, 32), "features.7": (128, 64)}
    assert _channels(student["groups"]) == {"features.0": (16, 8), "features.3": (32, 16), "features.7": (64, 32)}
    assert _channels(details["student"]["groups"]) == {
        "features.0": (32, 8),
        "features.3": (64, 16),
        "features.7": (128, 32),
    }
    teacher, data = torch.jit.load(str(digits["model"])), load_dataset(digits["labelled"])
    assert assistant["parameters"] == count_parameters(width_student(teacher, 0.5, data)[0])
    assert (
        student["parameters"]
        == report["parameters"]["after"]
        == count_parameters(width_student(teacher, 0.25, data)[0])
    )
    assert details["epochs"] == student["epochs"] and details["best_epoch"] == student["best_epoch"]
    assert "hint_loss" not in details["epochs"][0]


def test_named_pairs_train_an_uploaded_student(digits: dict, tmp_path: Path) -> None:
    student = save_scripted(DigitsCNN(width=16), tmp_path / "small.pt")
    spec = _spec(
        student={"source": "upload"},
        epochs=3,
        features={"pairs": [["features.3", "features.3"], ["features", "features"]], "weight": 0.5},
    )
    report = compress(digits["model"], spec, tmp_path / "out.pt", data_path=digits["labelled"], student_path=student)

    details = report["details"]
    pairs = details["features"]["pairs"]
    assert [(p["student_shape"], p["teacher_shape"]) for p in pairs] == [
        ([2, 32, 8, 8], [2, 64, 8, 8]),
        ([2, 64, 1, 1], [2, 128, 1, 1]),
    ]
    assert details["features"]["chosen"].startswith("named")
    curve = details["epochs"]
    assert all(
        row["train_loss"] == pytest.approx(row["logit_loss"] + 0.5 * row["hint_loss"], abs=1e-4) for row in curve
    )
    assert curve[-1]["hint_loss"] < curve[0]["hint_loss"]
    assert count_parameters(torch.jit.load(str(tmp_path / "out.pt"))) == count_parameters(torch.jit.load(str(student)))


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (
            ["features.3", "features.99"],
            r"the teacher has no readable layer 'features\.99' \(no such layer is called in "
            r"forward\); layers that can be read: features, features\.0, features\.1",
        ),
        (["feature.3", "features.3"], r"the student has no readable layer 'feature\.3'.*features\.3"),
        (
            ["features.7", "features.3"],
            r"student's output \[2, 64, 4, 4\] and the teacher's \[2, 64, 8, 8\] differ in "
            r"axes \[2, 3\]",
        ),
    ],
)
def test_a_pair_that_cannot_be_read_or_compared_fails_before_training(
    digits: dict, tmp_path: Path, pair: list[str], message: str
) -> None:
    student = save_scripted(DigitsCNN(width=16), tmp_path / "small.pt")
    spec = _spec(student={"source": "upload"}, features={"pairs": [pair]})
    with pytest.raises(InvalidInput, match=message):
        compress(digits["model"], spec, tmp_path / "out.pt", data_path=digits["labelled"], student_path=student)


def test_a_pt2_teacher_refuses_features_and_schedules(digits: dict, tmp_path: Path) -> None:
    teacher = torch.jit.load(str(digits["model"]))
    model = DigitsCNN()
    model.load_state_dict(teacher.state_dict())
    path = save_exported(model, digits["x_train"][:4], tmp_path / "teacher.pt2")
    with pytest.raises(
        UnsupportedModel, match=r"distill\.features and distill\.schedule train TorchScript models only"
    ):
        compress(path, _spec(features={}, schedule={"steps": 2}), tmp_path / "out.pt2", data_path=digits["labelled"])


class Tangle(nn.Module):
    """A conv changed in place after its call, a ReLU module called twice, convs reached through a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(self.conv(x))
        y = self.act(y)
        for block in self.blocks:
            y = y + block(y)
        return self.head(self.act(y).mean((2, 3)))


def test_layer_outputs_are_read_from_the_torchscript_graph_with_gradients() -> None:
    torch.manual_seed(0)
    eager = Tangle().eval()
    model = torch.jit.script(eager)
    found, refused = readable_layers(model, model.inlined_graph)
    assert list(found) == ["conv", "blocks.0", "blocks.1", "head"]
    assert refused == {"act": "it is called more than once"}

    x = torch.randn(3, 1, 8, 8)
    output, (conv, block) = LayerReader(model, ["conv", "blocks.1"])(x)
    with torch.no_grad():
        y = torch.relu(eager.conv(x))
        y = y + eager.blocks[0](y)
        expected_block = eager.blocks[1](y)
        assert torch.allclose(output, eager(x), atol=1e-6)
        assert torch.allclose(conv, eager.conv(x), atol=1e-6) and (conv < 0).any()  # read before the in-place ReLU
        assert torch.allclose(block, expected_block, atol=1e-6)
    conv.pow(2).mean().backward()
    assert model.conv.weight.grad is not None and model.head.weight.grad is None
