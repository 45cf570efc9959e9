"""AdapterFusion: AdapterHub 1.x fusion folders load and give its outputs and attentions; our own
folders round-trip; training touches only the fusion layers and the head; wrong members,
sizes and base models are refused with one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_model
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli
from adaptercli import CompositionError, Fuse, Stack
from adaptercli.formats import AdapterFileError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/composition"
MODEL_DIR = ROOT / "tests/fixtures/models/bert"


def _base(attn: str = "eager"):
    model = adaptercli.init(AutoModel.from_pretrained(MODEL_DIR, attn_implementation=attn).eval())
    for name in ("bn_a", "bn_b", "bn_c"):
        model.load_adapter(FIXTURES / "adapters" / name)
    return model


def _masked_mean(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AdapterHub's per-layer softmax [L, B, T, N] averaged over real tokens -> [L, N]."""
    return torch.stack([layer[mask.bool()].mean(dim=0) for layer in attention])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_adapterhub_fusion_folder_gives_its_outputs_and_attention(attn: str) -> None:
    io = load_file(FIXTURES / "io/fuse_dynamic.safetensors")
    model = _base(attn)
    name = model.load_adapter_fusion(FIXTURES / "fusion/fuse_dynamic", set_active=True)
    assert name == "bn_a,bn_b,bn_c" and model.active_adapters == Fuse("bn_a", "bn_b", "bn_c")
    with model.record_fusion_attention() as recorder, torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    keep = io["attention_mask"].bool()
    assert (out - io["expected"])[keep].abs().max() <= 1e-4
    assert (out - io["bare"]).abs().max() > 1e-3
    result = recorder.result()[name]
    assert result.members == ["bn_a", "bn_b", "bn_c"] and result.places == [(0, "output"), (1, "output")]
    assert result.tokens == int(keep.sum())
    assert torch.allclose(result.weights, _masked_mean(io["fusion_attention"], io["attention_mask"]), atol=1e-5)
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(2))


def test_adapterhub_fusion_with_head_and_model_prefix() -> None:
    io = load_file(FIXTURES / "io/fuse_static_head.safetensors")
    model = adaptercli.AutoAdapterModel.from_pretrained(MODEL_DIR).eval()
    for name in ("bn_a", "bn_b"):
        model.load_adapter(FIXTURES / "adapters" / name)
    name = model.load_adapter_fusion(FIXTURES / "fusion/fuse_static_head", set_active=True)
    assert name in model.heads and model.adapter_state.fusions[name].config.value is False  # "static"
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    assert torch.allclose(logits, io["expected"], atol=1e-4)


def test_recording_accumulates_over_passes_and_stops_outside_the_block() -> None:
    io = load_file(FIXTURES / "io/fuse_dynamic.safetensors")
    model = _base()
    model.load_adapter_fusion(FIXTURES / "fusion/fuse_dynamic", set_active=True)
    ids, mask = io["input_ids"], io["attention_mask"]
    with model.record_fusion_attention() as recorder, torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])
        model(input_ids=ids[1:], attention_mask=mask[1:])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # not recorded
    result = recorder.result()["bn_a,bn_b,bn_c"]
    assert result.tokens == int(mask.sum())
    assert torch.allclose(result.weights, _masked_mean(io["fusion_attention"], mask), atol=1e-5)
    rows = result.as_dict()["places"]
    assert rows[0]["layer"] == 0 and set(rows[0]["weights"]) == {"bn_a", "bn_b", "bn_c"}


def test_native_fusion_folder_round_trips(tmp_path: Path) -> None:
    io = load_file(FIXTURES / "io/fuse_dynamic.safetensors")
    model = _base()
    model.add_adapter_fusion(Fuse("bn_a", "bn_b", "bn_c"), "dynamic")
    with torch.no_grad():
        for p in model.adapter_state.fusion_parameters("bn_a,bn_b,bn_c").values():
            p.add_(0.05 * torch.randn_like(p))
    model.set_active_adapters(Fuse("bn_a", "bn_b", "bn_c"))
    with torch.no_grad():
        before = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    model.save_adapter_fusion(tmp_path / "deep/fusion", "bn_a,bn_b,bn_c")
    assert sorted(p.name for p in (tmp_path / "deep/fusion").iterdir()) == ["adapter_fusion.safetensors",
                                                                           "adapter_fusion_config.json"]
    other = _base()
    name = other.load_adapter_fusion(tmp_path / "deep/fusion", load_as="mine", set_active=True)
    assert name == "mine" and other.active_adapters == Fuse("bn_a", "bn_b", "bn_c", name="mine")
    with torch.no_grad():
        after = other(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    assert torch.equal(before, after)


def test_native_fusion_with_head(tmp_path: Path) -> None:
    model = adaptercli.AutoAdapterModel.from_pretrained(MODEL_DIR).eval()
    for name in ("bn_a", "bn_b"):
        model.load_adapter(FIXTURES / "adapters" / name)
    model.load_adapter_fusion(FIXTURES / "fusion/fuse_static_head", set_active=True)
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    model.save_adapter_fusion(tmp_path / "f", Fuse("bn_a", "bn_b"), with_head=True)
    with pytest.raises(AdapterFileError, match="no head named 'nope'"):
        model.save_adapter_fusion(tmp_path / "g", "bn_a,bn_b", with_head="nope")
    other = adaptercli.AutoAdapterModel.from_pretrained(MODEL_DIR).eval()
    for name in ("bn_a", "bn_b"):
        other.load_adapter(FIXTURES / "adapters" / name)
    other.load_adapter_fusion(tmp_path / "f", set_active=True)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, before)


def test_train_adapter_fusion_trains_only_fusion_and_head() -> None:
    model = adaptercli.AdapterModel(tiny_model("bert"))
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn")
    model.add_adapter("c", "lora")
    model.add_adapter_fusion(["a", "b"])
    model.add_classification_head("task", num_labels=2)
    model.train_adapter_fusion(Fuse("a", "b"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_fusion_layer.a,b." in n or n.startswith("heads.task.") for n in trainable)
    assert any(n.startswith("heads.task.") for n in trainable) and model.training
    ids, mask = batch()
    frozen = {k: v.clone() for k, v in model.adapter_state.adapter_parameters("a").items()}
    fusion = {k: v.clone() for k, v in model.adapter_state.fusion_parameters("a,b").items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss
    reg = model.get_fusion_regularization_loss()
    assert reg is not None and 0 <= reg.item() < 1e-6  # W_v starts at the identity
    (loss + reg).backward()
    optimizer.step()
    assert all(torch.equal(v, model.adapter_state.adapter_parameters("a")[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, model.adapter_state.fusion_parameters("a,b")[k]) for k, v in fusion.items())
    assert model.get_fusion_regularization_loss().item() > reg.item()
    model.train_adapter_fusion(Fuse("a", "b"), unfreeze_adapters=True)
    assert all(p.requires_grad for p in model.adapter_state.adapter_parameters("b").values())


def test_nested_list_shorthand_runs_a_fusion(perturb) -> None:
    model = adaptercli.init(tiny_model("bert"))
    for name, config in (("a", "seq_bn"), ("b", "seq_bn"), ("c", "lora")):
        model.add_adapter(name, config)
        perturb(model, name)
    model.add_adapter_fusion(["a", "b"])
    ids, mask = batch()
    outputs = []
    for setup in ([["a", "b"], "c"], Stack(Fuse("a", "b"), "c")):
        model.set_active_adapters(setup)
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert torch.equal(*outputs)
    model.set_active_adapters("c")
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).last_hidden_state - outputs[0]).abs().max() > 1e-4


def test_fusion_of_double_seq_bn_fuses_both_places(perturb) -> None:
    model = adaptercli.init(tiny_model("gpt2"))
    for name in ("a", "b"):
        model.add_adapter(name, "double_seq_bn")
        perturb(model, name)
    model.add_adapter_fusion(["a", "b"], set_active=True)
    ids, mask = batch()
    with model.record_fusion_attention() as recorder, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    places = recorder.result()["a,b"].places
    assert places == [(0, "attention"), (0, "output"), (1, "attention"), (1, "output")]


# -- refusals -------------------------------------------------------------------------------------------
@pytest.fixture
def three():
    model = adaptercli.init(tiny_model("bert"))
    for name, config in (("a", "seq_bn"), ("b", "seq_bn"), ("l", "lora"), ("h", "double_seq_bn")):
        model.add_adapter(name, config)
    return model


@pytest.mark.parametrize("members, message", [
    (["a", "zz"], r"Fuse 'a,zz' needs adapter\(s\) zz, which are not on this model \(adapters: a, b, l, h\)"),
    (["a", "l"], r"Fuse does not work with lora adapters \('l'\): Fuse runs bottleneck adapters"),
    (["a", "h"], r"Fuse needs its members at the same places: only 'h' of \['a', 'h'\] set mh_adapter"),
])
def test_bad_members_are_refused(three, members, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        three.add_adapter_fusion(members)
    assert not three.adapter_state.fusions


def test_fusion_name_collisions_and_unknown_config(three) -> None:
    three.add_adapter_fusion(["a", "b"])
    with pytest.raises(adaptercli.AdapterCliError, match="already exists"):
        three.add_adapter_fusion(["a", "b"])
    three.add_adapter_fusion(["a", "b"], "static", overwrite_ok=True)
    assert three.adapter_state.fusions["a,b"].config.value is False
    with pytest.raises(adaptercli.AdapterCliError, match="unknown fusion config 'dynamik'"):
        three.add_adapter_fusion(["a", "b"], "dynamik", name="other")
    with pytest.raises(adaptercli.AdapterCliError, match="fuses \\['a', 'b'\\], not \\['b', 'a'\\]"):
        three.set_active_adapters(Fuse("b", "a", name="a,b"))


def test_missing_member_on_load_is_refused() -> None:
    model = adaptercli.init(AutoModel.from_pretrained(MODEL_DIR).eval())
    model.load_adapter(FIXTURES / "adapters/bn_a")
    with pytest.raises(CompositionError, match=r"needs adapter\(s\) bn_b, bn_c, which are not on this model"):
        model.load_adapter_fusion(FIXTURES / "fusion/fuse_dynamic")
    assert not model.adapter_state.fusions


def test_fusion_for_another_hidden_size_or_model_type_is_refused(tmp_path: Path) -> None:
    model = _base()
    for key, value, message in (("hidden_size", 64, "hidden size 64; this bert model has hidden size 32"),
                                ("model_type", "roberta", "saved for a roberta model; this model is bert")):
        folder = tmp_path / key
        shutil.copytree(FIXTURES / "fusion/fuse_dynamic", folder)
        meta = json.loads((folder / "adapter_fusion_config.json").read_text())
        meta[key] = value
        (folder / "adapter_fusion_config.json").write_text(json.dumps(meta))
        with pytest.raises(AdapterFileError, match=message):
            model.load_adapter_fusion(folder)
    assert not model.adapter_state.fusions


def test_members_from_different_base_models_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bn_b_other"
    shutil.copytree(FIXTURES / "adapters/bn_b", folder)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["model_name"] = "roberta-base-lookalike"
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    model = adaptercli.init(AutoModel.from_pretrained(MODEL_DIR).eval())
    model.load_adapter(FIXTURES / "adapters/bn_a")
    model.load_adapter(folder)
    with pytest.raises(CompositionError, match="different base models: 'bn_a' on tests/fixtures/models/bert, "
                                               "'bn_b' on roberta-base-lookalike"):
        model.add_adapter_fusion(["bn_a", "bn_b"])


def test_deleting_a_member_deletes_its_fusions(three) -> None:
    three.add_adapter_fusion(["a", "b"], set_active=True)
    three.delete_adapter("b")
    assert not three.adapter_state.fusions and three.active_adapters is None
    assert not [n for n, _ in three.named_parameters() if "adapter_fusion_layer" in n]
    with pytest.raises(CompositionError, match="no AdapterFusion named 'a,b'"):
        three.delete_adapter_fusion(["a", "b"])


def test_labels_of_a_head() -> None:
    model = adaptercli.AdapterModel(tiny_model("bert"))
    model.add_classification_head("sent", num_labels=2, id2label={1: "pos", 0: "neg"})
    model.add_regression_head("score")
    assert model.get_labels_dict("sent") == {0: "neg", 1: "pos"}
    assert model.get_labels("sent") == ["neg", "pos"]
    assert model.get_labels() is None  # the active head (the last added) has no labels
    with pytest.raises(adaptercli.AdapterCliError, match="no head named 'x'"):
        model.get_labels("x")


@pytest.mark.parametrize("how", ["added", "loaded"])
def test_a_fusion_follows_the_models_mode(how: str, tmp_path: Path) -> None:
    """Dropout in the fusion layers is off in eval mode: repeated passes are identical, whether the
    fusion was added to a model already in eval mode or loaded into one."""
    model = adaptercli.init(tiny_model("bert"))
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn")
    model.eval()
    if how == "added":
        model.add_adapter_fusion(["a", "b"], {"dropout_prob": 0.5}, set_active=True)
    else:
        source = adaptercli.init(tiny_model("bert"))
        for name in ("a", "b"):
            source.add_adapter(name, "seq_bn")
        source.add_adapter_fusion(["a", "b"], {"dropout_prob": 0.5})
        source.save_adapter_fusion(tmp_path / "fusion", "a,b")
        model.load_adapter_fusion(tmp_path / "fusion", set_active=True)
    layers = model.adapter_state.families["bottleneck"].fusion_layers(model.adapter_state, "a,b")
    assert layers and not any(m.training for layer in layers for m in layer.modules())
    ids, mask = batch()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        second = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(first, second)
    model.train()
    assert all(layer.training for layer in layers)
