"""`transformers` models uploaded as `.pt2` (``torch.export`` of the model, as its docs show): GPT-2's
``Conv1D`` layers (``addmm`` with an ``[in, out]`` weight) and its embeddings are quantized and pruned
like ``nn.Linear``, the tied output layer reads one int8 table, and the program still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchao  # noqa: F401  (registers the quantized_decomposed ops an int8 program needs to load)
import transformers  # the test extra installs it: a missing one fails, never skips
from torch import nn

from modelpress.spec import parse_spec
from tests.models import LinearSpellings, TextOutput
from workers.engine.run.pipeline import compress

transformers.logging.set_verbosity_error()

VOCAB = 1000
INPUTS = [
    {"shape": [2, 16], "dtype": "int64", "low": 0, "high": VOCAB},
    {"shape": [2, 16], "dtype": "int64", "low": 1, "high": 2},
]
CONV1D = [
    f"model.transformer.h.{layer}.{name}"
    for layer in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = TextOutput(transformers.GPT2LMHeadModel(config).eval(), "logits").eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(model, (ids, torch.ones_like(ids)), dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path_factory.mktemp("gpt2-program") / "gpt2.pt2"
    torch.export.save(program, path)
    return path, model


def _spec(method: str, **options: object) -> object:
    return parse_spec(
        {
            "method": method,
            "seed": 0,
            "evaluation": {"runs": 2, "warmup": 1},
            "inputs": INPUTS,
            **({method: options} if options else {}),
        }
    )


def _stored_bytes(program: torch.export.ExportedProgram) -> dict[str, int]:
    tensors = {
        id(t): t for t in [*program.state_dict.values(), *program.constants.values()] if isinstance(t, torch.Tensor)
    }
    by_dtype: dict[str, int] = {}
    for tensor in tensors.values():
        by_dtype[str(tensor.dtype)] = by_dtype.get(str(tensor.dtype), 0) + tensor.numel() * tensor.element_size()
    return by_dtype


def test_gpt2_program_conv1d_and_embeddings_are_int8_with_one_tied_table(gpt2, tmp_path: Path) -> None:
    path, model = gpt2
    report = compress(path, _spec("quantize"), tmp_path / "out.pt2")

    details = report["details"]
    assert [form["module"] for form in details["linear_forms"]] == CONV1D
    assert all(form["form"] == "addmm" for form in details["linear_forms"])
    quantized = {entry["module"]: entry for entry in details["quantized"]}
    assert set(quantized) == {*CONV1D, "model.transformer.wte", "model.transformer.wpe"}
    assert quantized["model.transformer.wte"]["tied_to"] == ["model.lm_head"]
    assert quantized["model.transformer.wpe"]["tied_to"] is None
    left = {entry["module"]: entry["reason"] for entry in details["left_float"]}
    assert "tied to an int8 embedding" in left["model.lm_head"]
    assert report["fidelity"]["cosine_similarity"] >= 0.998

    before = _stored_bytes(torch.export.load(path))
    result = torch.export.load(tmp_path / "out.pt2")  # plain torch + torchao, as a user loads it
    after = _stored_bytes(result)
    # No float copy of any matrix is left: 1000 x 64 table, its tied head and 8 layers are int8 (a quarter).
    assert after["torch.float32"] < 0.05 * before["torch.float32"], after
    assert sum(after.values()) <= 0.30 * sum(before.values()), (before, after)
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        expected, got = model(ids, torch.ones_like(ids)), result.module()(ids, torch.ones_like(ids))
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.998
    targets = [str(node.target) for node in result.graph.nodes if node.op == "call_function"]
    assert "aten.addmm.default" not in targets, [t for t in targets if "addmm" in t]
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == len(CONV1D)


def test_gpt2_program_unstructured_prune_reaches_its_conv1d_layers(gpt2, tmp_path: Path) -> None:
    path, _ = gpt2
    report = compress(path, _spec("prune", amount=0.5, scope="per_layer"), tmp_path / "out.pt2")

    layers = {layer["weight"].removesuffix(".weight"): layer["sparsity"] for layer in report["details"]["layers"]}
    assert set(layers) == set(CONV1D)
    assert report["details"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    pruned = torch.export.load(tmp_path / "out.pt2").state_dict
    for name in CONV1D:
        assert float((pruned[f"{name}.weight"] == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    # The output layer is the final classifier, left whole by default: its weight is the input embedding's too.
    assert not bool((pruned["model.lm_head.weight"] == 0).any())
    assert "the final layer 'model.lm_head' is excluded by default" in " ".join(report["details"]["notes"])


def test_every_spelling_of_a_linear_layer_in_a_program_runs_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LinearSpellings().eval()
    batch = torch.export.Dim("batch", max=256)
    torch.export.save(
        torch.export.export(model, (torch.randn(4, 32),), dynamic_shapes=({0: batch},)), tmp_path / "spellings.pt2"
    )
    spec = parse_spec({"method": "quantize", "seed": 0, "input_shape": [4, 32], "evaluation": {"runs": 2, "warmup": 1}})
    report = compress(tmp_path / "spellings.pt2", spec, tmp_path / "out.pt2")

    assert sorted(form["form"] for form in report["details"]["linear_forms"]) == ["addmm", "matmul", "matmul"]
    assert len(report["details"]["quantized"]) == 3
    result = torch.export.load(tmp_path / "out.pt2")
    stored = _stored_bytes(result)
    assert stored["torch.int8"] == 32 * 48 + 40 * 48 + 40 * 24  # the three matrices, one byte a weight
    assert stored["torch.float32"] == 4 * (48 + 24 + 48 + 40 + 24)  # two biases, one scale per output channel
    x = torch.randn(7, 32)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(result.module()(x).flatten(), model(x).flatten(), dim=0)
    assert cosine >= 0.995


def test_bert_program_structured_prune_removes_heads_through_its_position_ids(tmp_path: Path) -> None:
    """BERT's export computes position ids with ``arange(seq_len)``; the channel analysis traces it all the same."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = TextOutput(transformers.BertForSequenceClassification(config).eval(), "logits").eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(model, (ids, torch.ones_like(ids)), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, tmp_path / "bert.pt2")
    report = compress(tmp_path / "bert.pt2", _spec("prune", amount=0.3, structured=True), tmp_path / "out.pt2")

    heads = [group["heads"] for group in report["details"]["groups"] if "heads" in group]
    assert len(heads) == 2 and all(h["before"] == 4 and len(h["kept"]) == 3 for h in heads)
    assert report["parameters"]["after"] < report["parameters"]["before"]
    result = torch.export.load(tmp_path / "out.pt2").module()
    ids = torch.randint(0, VOCAB, (3, 16))
    assert result(ids, torch.ones_like(ids)).shape == (3, 2)


def test_gpt2_program_structured_prune_removes_heads_and_mlp_width_and_keeps_its_tied_table(
    gpt2, tmp_path: Path
) -> None:
    """A program holds every static size as a number: Conv1D's ``[-1, nf]`` and ``[batch, tokens, nf]``
    views and the q/k/v split of 3 x 64 channels; its lifted scalars (GELU's 0.5) and the empty key/value
    cache it concatenates to were read as tensors of unknown channels. It used to be "nothing to prune"."""
    path, model = gpt2
    report = compress(path, _spec("prune", amount=0.3, structured=True), tmp_path / "out.pt2")

    groups = report["details"]["groups"]
    heads = [group["heads"] for group in groups if "heads" in group]
    assert len(heads) == 2 and all(h["before"] == 4 and len(h["kept"]) == 3 for h in heads)
    widths = {g["group"]: (g["channels_before"], g["channels_after"]) for g in groups if "mlp.c_fc" in g["group"]}
    assert widths == {f"model.transformer.h.{layer}.mlp.c_fc": (256, 179) for layer in range(2)}
    program = torch.export.load(tmp_path / "out.pt2")
    state = program.state_dict
    assert state["model.transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 48)  # [in, out]: 3 heads of q, k, v
    assert state["model.transformer.h.0.mlp.c_proj.weight"].shape == (179, 64)
    # One table for the embedding and the output layer, as uploaded: parameters counted once, fewer than before.
    unique = {t.data_ptr(): t.numel() for t in program.module().parameters()}
    assert sum(unique.values()) == report["parameters"]["after"] < report["parameters"]["before"]
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        assert program.module()(ids, torch.ones_like(ids)).shape == model(ids, torch.ones_like(ids)).shape


def test_gpt2_program_hidden_width_is_pruned_when_asked_and_stays_one_tied_table(gpt2, tmp_path: Path) -> None:
    """torch.export writes the logits' ``hidden[:, slice(0, None), :]`` as ``aten::alias``, which left the
    residual width whole whatever was asked."""
    path, model = gpt2
    report = compress(path, _spec("prune", amount=0.3, structured=True, hidden=True), tmp_path / "out.pt2")

    stream = [g for g in report["details"]["groups"] if g.get("layer_norms_renormalised")]
    assert [(g["channels_before"], g["channels_after"]) for g in stream] == [(64, 45)]
    program = torch.export.load(tmp_path / "out.pt2")
    assert program.state_dict["model.transformer.wte.weight"].shape == (VOCAB, 45)
    unique = {t.data_ptr(): t.numel() for t in program.module().parameters()}
    assert sum(unique.values()) == report["parameters"]["after"] <= 0.75 * report["parameters"]["before"]
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        assert program.module()(ids, torch.ones_like(ids)).shape == model(ids, torch.ones_like(ids)).shape


def test_only_sizes_fixed_at_export_are_made_to_follow_the_channels() -> None:
    """``split`` into equal pieces of a dimension fixed at export becomes ``chunk``; of a dynamic
    dimension it stays: at other sizes ``chunk`` cuts otherwise (8 -> 4 + 4 either way, but 6 ->
    4 + 2 against 3 + 3). Found by a review: the example's size decided it."""
    from workers.engine.methods.prune.exported import _sizes_as_methods

    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(x, 4, dim=-1)
            return a.sum(-1) - b.sum(-1)

    x = torch.randn(2, 8)
    fixed = torch.export.export(Split(), (x,)).module()
    dynamic = torch.export.export(Split(), (x,), dynamic_shapes=({1: torch.export.Dim("n", min=6, max=8)},)).module()
    _sizes_as_methods(fixed)
    _sizes_as_methods(dynamic)

    assert [n.target for n in fixed.graph.nodes if n.target == "chunk"] == ["chunk"]  # positive control
    assert not [n for n in dynamic.graph.nodes if n.target == "chunk"]
    odd = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(dynamic(odd), Split()(odd))
        assert torch.equal(fixed(x), Split()(x))
