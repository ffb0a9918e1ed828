"""Pruning the models people bring: `transformers` BERT, GPT-2 and ViT (traced as their docs show),
linear layers in other spellings, attention heads, concatenations of concatenations, and the
verdict on outputs that did not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # the test extra installs it: a missing one fails, never skips
from torch import nn

from modelpress.spec import parse_spec
from tests.models import LinearSpellings, PixelLogits, TextOutput, save_scripted
from workers.engine.run.pipeline import compress

transformers.logging.set_verbosity_error()


def _traced_text(model: nn.Module, field: str, path: Path) -> Path:
    ids = torch.randint(0, 1000, (2, 16))
    torch.jit.trace(TextOutput(model.eval(), field).eval(), (ids, torch.ones_like(ids)), strict=False).save(str(path))
    return path


def _prune(path: Path, out: Path, inputs: list[dict] | None = None, **prune: object) -> dict:
    inputs = inputs or [
        {"shape": [2, 16], "dtype": "int64", "low": 0, "high": 1000},
        {"shape": [2, 16], "dtype": "int64", "low": 1, "high": 2},
    ]
    spec = parse_spec(
        {"method": "prune", "seed": 0, "evaluation": {"runs": 1, "warmup": 0}, "inputs": inputs, "prune": prune}
    )
    return compress(path, spec, out)


def _ratio(report: dict) -> float:
    return report["parameters"]["after"] / report["parameters"]["before"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    return _traced_text(transformers.GPT2LMHeadModel(config), "logits", tmp_path_factory.mktemp("gpt2") / "gpt2.pt")


def test_bert_structured_prunes_heads_and_mlp_instead_of_failing(tmp_path: Path) -> None:
    """Was "ZeroDivisionError: integer modulo by zero" (a traced scalar tensor of the sequence length)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    model = _traced_text(transformers.BertModel(config), "last_hidden_state", tmp_path / "bert.pt")
    report = _prune(model, tmp_path / "out.pt", amount=0.3, structured=True)

    details = report["details"]
    groups = {g["group"]: g for g in details["groups"]}
    for layer in range(2):
        heads = groups[f"model.encoder.layer.{layer}.attention.self.query"]
        assert heads["heads"]["width"] == 16 and heads["heads"]["before"] == 4 and len(heads["heads"]["kept"]) == 3
        assert (heads["channels_before"], heads["channels_after"]) == (64, 48)
        prefix = f"model.encoder.layer.{layer}.attention"
        assert {f"{prefix}.self.{p}.weight" for p in ("query", "key", "value")} | {
            f"{prefix}.output.dense.weight"
        } <= set(heads["tensors"])
        mlp = groups[f"model.encoder.layer.{layer}.intermediate.dense"]
        assert (mlp["channels_before"], mlp["channels_after"]) == (128, 90)
    assert details["heads_kept"] == {name: g["heads"]["kept"] for name, g in groups.items() if "heads" in g}
    assert not any(entry["reason"].startswith("put back") for entry in details["left_whole"])  # proof passed
    assert report["fidelity"]["outputs"][0]["shape"] == [2, 16, 64]
    pruned = torch.jit.load(str(tmp_path / "out.pt"))
    ids = torch.randint(0, 1000, (3, 9))  # other batch and sequence sizes still run
    assert pruned(ids, torch.ones_like(ids)).shape == (3, 9, 64)
    assert dict(pruned.named_parameters())["model.encoder.layer.0.attention.self.key.weight"].shape == (48, 64)


def test_gpt2_unstructured_prunes_its_conv1d_layers_like_linear(gpt2: Path, tmp_path: Path) -> None:
    report = _prune(gpt2, tmp_path / "out.pt", amount=0.5)

    layers = {layer["parameter"] for layer in report["details"]["layers"]}
    assert layers == {
        f"model.transformer.h.{i}.{name}.weight"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert report["details"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not report["warnings"]


def test_gpt2_structured_prunes_heads_of_the_fused_qkv_and_the_mlp(gpt2: Path, tmp_path: Path) -> None:
    report = _prune(gpt2, tmp_path / "out.pt", amount=0.3, structured=True)

    groups = {g["group"]: g for g in report["details"]["groups"]}
    for layer in range(2):
        attention = groups[f"model.transformer.h.{layer}.attn.c_attn"]
        assert len(attention["heads"]["kept"]) == 3 and attention["channels_after"] == 48
        assert f"model.transformer.h.{layer}.attn.c_proj.weight" in attention["tensors"]
        assert groups[f"model.transformer.h.{layer}.mlp.c_fc"]["channels_after"] == 179
    pruned = dict(torch.jit.load(str(tmp_path / "out.pt")).named_parameters())
    assert pruned["model.transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 48)  # Conv1D: [in, out]
    assert pruned["model.transformer.h.0.attn.c_proj.weight"].shape == (48, 64)
    assert report["fidelity"]["outputs"][0]["shape"] == [2, 16, 1000]


def test_gpt2_hidden_width_is_pruned_when_asked_and_its_tied_output_layer_stays_one_tensor(
    gpt2: Path, tmp_path: Path
) -> None:
    default = _prune(gpt2, tmp_path / "default.pt", amount=0.3, structured=True)
    hidden = _prune(gpt2, tmp_path / "hidden.pt", amount=0.3, structured=True, hidden=True)

    # By default the residual width stays, and the report says which option would prune it.
    assert any("prune.hidden" in entry["reason"] for entry in default["details"]["left_whole"])
    stream = [g for g in hidden["details"]["groups"] if g.get("layer_norms_renormalised")]
    assert len(stream) == 1 and stream[0]["layer_norms_renormalised"] == 5  # two per block and ln_f
    assert (stream[0]["channels_before"], stream[0]["channels_after"]) == (64, 45)
    assert {"model.transformer.wte.weight", "model.transformer.wpe.weight"} <= set(stream[0]["tensors"])
    assert not any(entry["reason"].startswith("put back") for entry in hidden["details"]["left_whole"])
    pruned = torch.jit.load(str(tmp_path / "hidden.pt"))
    weights = dict(pruned.named_parameters(remove_duplicate=False))
    assert weights["model.transformer.wte.weight"].shape == (1000, 45)
    assert weights["model.transformer.wpe.weight"].shape == (64, 45)
    assert weights["model.transformer.ln_f.weight"].shape == (45,)
    # The output layer is the token embedding (tied): one tensor after pruning too, not a stale copy.
    assert weights["model.lm_head.weight"].data_ptr() == weights["model.transformer.wte.weight"].data_ptr()
    assert _ratio(hidden) <= 0.75 < _ratio(default)
    ids = torch.randint(0, 1000, (3, 9))
    assert pruned(ids, torch.ones_like(ids)).shape == (3, 9, 1000)


def test_vit_structured_reaches_three_quarters_of_the_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    path = tmp_path / "vit.pt"
    torch.jit.trace(
        PixelLogits(transformers.ViTForImageClassification(config).eval()), torch.randn(2, 3, 32, 32), strict=False
    ).save(str(path))
    report = _prune(
        path, tmp_path / "out.pt", [{"shape": [2, 3, 32, 32], "dtype": "float32"}], amount=0.3, structured=True
    )

    heads = report["details"]["heads_kept"]
    assert len(heads) == 4 and all(len(kept) == 3 for kept in heads.values())
    mlp = [g["channels_after"] for g in report["details"]["groups"] if g["group"].endswith(".mlp.fc1")]
    assert mlp == [717] * 4
    assert _ratio(report) <= 0.75
    assert report["fidelity"]["outputs"][0]["shape"] == [2, 10]
    assert any("prune.hidden" in entry["reason"] for entry in report["details"]["left_whole"])

    # The residual width too: the patch projection, the class token (expanded to the batch and
    # concatenated along tokens), the position embeddings, every LayerNorm and what reads them.
    hidden = _prune(
        path,
        tmp_path / "hidden.pt",
        [{"shape": [2, 3, 32, 32], "dtype": "float32"}],
        amount=0.3,
        structured=True,
        hidden=True,
    )
    assert _ratio(hidden) <= 0.6
    weights = {name: p.shape for name, p in torch.jit.load(str(tmp_path / "hidden.pt")).named_parameters()}
    tokens = [shape for name, shape in weights.items() if name.endswith(("cls_token", "position_embeddings"))]
    assert len(tokens) == 2 and all(shape[-1] == 179 for shape in tokens)
    assert hidden["fidelity"]["outputs"][0]["shape"] == [2, 10]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_heads_with_rotary_embeddings_prune_and_grouped_kv_heads_stay_whole(
    kv_heads: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    model = _traced_text(transformers.LlamaForCausalLM(config), "logits", tmp_path / "llama.pt")
    report = _prune(model, tmp_path / "out.pt", amount=0.3, structured=True)

    groups = {g["group"]: g for g in report["details"]["groups"]}
    for layer in range(2):  # SwiGLU: gate and up lose the same channels
        mlp = groups[f"model.model.layers.{layer}.mlp.gate_proj"]
        assert mlp["channels_after"] == 90 and f"model.model.layers.{layer}.mlp.up_proj.weight" in mlp["tensors"]
    if kv_heads == 4:
        assert [len(kept) for kept in report["details"]["heads_kept"].values()] == [3, 3]
    else:  # grouped-query attention is not modelled yet: left whole, with the reason
        whole = {e["group"]: e["reason"] for e in report["details"]["left_whole"]}
        assert "scaled_dot_product_attention" in whole["model.model.layers.0.self_attn.q_proj"]
    assert report["fidelity"]["outputs"][0]["shape"] == [2, 16, 1000]
    if kv_heads == 4:  # the residual width when asked: the embedding and every RMSNorm (mean of squares)
        hidden = _prune(model, tmp_path / "hidden.pt", amount=0.3, structured=True, hidden=True)
        stream = {g["group"]: g for g in hidden["details"]["groups"]}["model.model.embed_tokens"]
        assert (stream["channels_after"], stream["layer_norms_renormalised"]) == (45, 5)  # 2 per block, the last
        assert not any(entry["reason"].startswith("put back") for entry in hidden["details"]["left_whole"])
        weights = dict(torch.jit.load(str(tmp_path / "hidden.pt")).named_parameters())
        assert weights["model.model.norm.weight"].shape == (45,)
        assert weights["model.lm_head.weight"].shape == (1000, 45)
        assert _ratio(hidden) <= 0.7


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_linear_layers_written_as_products_are_pruned(compile_with: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = LinearSpellings().eval()
    compiled = torch.jit.script(module) if compile_with == "script" else torch.jit.trace(module, torch.randn(4, 32))
    compiled.save(str(tmp_path / "m.pt"))
    inputs = [{"shape": [4, 32], "dtype": "float32"}]

    structured = _prune(tmp_path / "m.pt", tmp_path / "s.pt", inputs, amount=0.5, structured=True, exclude=[])
    widths = {g["group"]: (g["channels_before"], g["channels_after"]) for g in structured["details"]["groups"]}
    assert widths == {"w_in_out": (48, 24), "w_out_in": (40, 20)}  # the output (addmm's) keeps its shape
    pruned = dict(torch.jit.load(str(tmp_path / "s.pt")).named_parameters())
    assert [tuple(pruned[n].shape) for n in ("w_in_out", "b", "w_out_in", "addmm_w")] == [
        (32, 24),
        (24,),
        (20, 24),
        (20, 24),
    ]

    unstructured = _prune(tmp_path / "m.pt", tmp_path / "u.pt", inputs, amount=0.5, exclude=[])
    assert {layer["parameter"] for layer in unstructured["details"]["layers"]} == {"w_in_out", "w_out_in", "addmm_w"}
    assert unstructured["details"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


class _LiteralHeads(nn.Module):
    """Self-attention whose view writes the head count and width as literals ([B, T, 4, 8]): the heads
    cannot follow a pruned width, so the proof must put the group back, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(32, dim=-1)
        q, k, v = (t.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2) for t in (q, k, v))
        y = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 32)) + x


def test_heads_that_cannot_follow_are_put_back_with_the_reason(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.jit.trace(_LiteralHeads().eval(), torch.randn(2, 5, 32)).save(str(path))
    with pytest.raises(Exception, match="put back: the model failed after slicing it"):
        _prune(path, tmp_path / "out.pt", [{"shape": [2, 5, 32], "dtype": "float32"}], amount=0.5, structured=True)


class _Inception(nn.Module):
    """Two Inception-style blocks: the second concatenates a pool of the first's concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(32, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(48, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        second = torch.cat([torch.relu(self.c(first)), nn.functional.max_pool2d(first, 3, 2, 1)], 1)
        return self.head(second).mean((2, 3))


def test_a_concatenation_of_concatenations_prunes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_scripted(_Inception(), tmp_path / "m.pt")
    report = _prune(
        path, tmp_path / "out.pt", [{"shape": [2, 3, 16, 16], "dtype": "float32"}], amount=0.5, structured=True
    )

    widths = {g["group"]: g["channels_after"] for g in report["details"]["groups"]}
    assert widths == {"a": 8, "b": 8, "c": 8}
    assert dict(torch.jit.load(str(tmp_path / "out.pt")).named_parameters())["head.weight"].shape == (8, 24, 1, 1)


def test_outputs_that_did_not_change_are_not_collapsed(tmp_path: Path) -> None:
    """A head initialised to zeros (torchvision's ViT): all-zero outputs before and after, cosine 1, no warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    report = _prune(
        save_scripted(model, tmp_path / "m.pt"),
        tmp_path / "out.pt",
        [{"shape": [2, 8], "dtype": "float32"}],
        amount=0.5,
    )

    assert report["fidelity"]["max_abs_error"] == 0.0
    assert report["fidelity"]["cosine_similarity"] == 1.0
    assert not [w for w in report["warnings"] if "collapsed" in w]
