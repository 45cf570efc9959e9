"""Adapter setups (``save_adapter_setup`` / ``load_adapter_setup``): a composition with its members,
fusions and heads saved as one folder and restored in one call. AdapterHub 1.3's setup folders
(tests/fixtures/setups, made by scripts/make_setup_fixtures.py) give its logits within 1e-5 (atol).
Loading by Hub id and `adapter export` of fusion and stack runs are in test_sharing.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli
from adaptercli import Fuse, Parallel, Stack
from adaptercli.formats import AdapterFileError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/setups"
MODEL_DIR = ROOT / "tests/fixtures/models/bert"
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
MASK = (IDS != 0).long()


def fresh() -> adaptercli.AdapterModel:
    return adaptercli.AdapterModel(AutoModel.from_pretrained(MODEL_DIR)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _perturbed(model, params) -> None:
    g = torch.Generator().manual_seed(len(params))
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def fused_model() -> adaptercli.AdapterModel:
    """Fuse(a, b) named 'target' over seq_bn members, with a 3-label head named like the fusion."""
    model = fresh()
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn")
        _perturbed(model, list(model.adapter_state.adapter_parameters(name).values()))
    model.add_adapter_fusion(["a", "b"], name="target")
    model.add_classification_head("target", num_labels=3)
    _perturbed(model, list(model.adapter_state.fusion_parameters("target").values()) + list(model.heads.parameters()))
    model.set_active_adapters(Fuse("a", "b", name="target"))
    return model.eval()


def stacked_model() -> adaptercli.AdapterModel:
    """Stack(bn, lo) of a seq_bn and a LoRA adapter, with a head 'topic' named like neither."""
    model = fresh()
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("lo", "lora[r=4]")
    model.add_classification_head("topic", num_labels=4)
    _perturbed(model, [*model.adapter_state.adapter_parameters("bn").values(),
                       *model.adapter_state.adapter_parameters("lo").values(), *model.heads.parameters()])
    model.set_active_adapters(Stack("bn", "lo"))
    model.active_head = "topic"
    return model.eval()


@pytest.mark.parametrize("case", ["stack", "fuse"])
def test_adapterhub_setup_folders_give_adapterhubs_logits(case: str, tmp_path: Path) -> None:
    manifest = {c["name"]: c for c in json.loads((FIXTURES / "manifest.json").read_text())["cases"]}[case]
    io = load_file(FIXTURES / f"io/{case}.safetensors")
    model = fresh()
    setup, head_setup = model.load_adapter_setup(FIXTURES / case)
    assert setup.to_dict() == manifest["setup"] and head_setup == manifest["head_setup"]
    assert model.active_head == head_setup and model.active_adapters == setup
    with torch.no_grad():
        got = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    assert got.shape == io["expected"].shape
    assert torch.allclose(got, io["expected"], atol=1e-5), (got - io["expected"]).abs().max()

    model.save_adapter_setup(tmp_path / "ours", setup, head_setup)  # and saved again by us: the same logits
    again = fresh()
    again.load_adapter_setup(tmp_path / "ours")
    with torch.no_grad():
        same = again(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    assert torch.equal(same, got)


@pytest.mark.parametrize("build, setup, head_setup", [
    (fused_model, Fuse("a", "b", name="target"), "target"),
    (stacked_model, Stack("bn", "lo"), "topic"),
])
def test_a_saved_setup_loads_in_one_call_with_the_same_logits(build, setup, head_setup, tmp_path: Path) -> None:
    model = build()
    want = logits(model)
    model.save_adapter_setup(tmp_path / "setup", setup, head_setup=head_setup)
    saved = json.loads((tmp_path / "setup/adapter_setup.json").read_text())
    assert saved["adapter_setup"] == setup.to_dict() and saved["head_setup"] == head_setup
    for name in setup.flatten():
        assert (tmp_path / "setup" / name / "adapter_config.json").is_file()
    assert (tmp_path / "setup" / head_setup / "head_config.json").is_file()

    loaded = fresh()
    assert loaded.load_adapter_setup(tmp_path / "setup") == (setup, head_setup)
    assert torch.equal(logits(loaded), want)
    assert torch.equal(logits(loaded), logits(loaded))  # loaded into an eval model: no dropout left on


def test_a_parallel_setup_keeps_a_head_per_child(tmp_path: Path) -> None:
    model = fresh()
    for name, labels in (("x", 2), ("y", 3)):
        model.add_adapter(name, "seq_bn")
        model.add_classification_head(name, num_labels=labels)
        _perturbed(model, [*model.adapter_state.adapter_parameters(name).values(), *model.heads[name].parameters()])
    model.set_active_adapters(Parallel("x", "y"))
    with torch.no_grad():
        want = [out.logits for out in model.eval()(input_ids=IDS, attention_mask=MASK)]
    model.save_adapter_setup(tmp_path / "par", Parallel("x", "y"), head_setup=["x", "y"])
    loaded = fresh()
    loaded.load_adapter_setup(tmp_path / "par")
    with torch.no_grad():
        got = [out.logits for out in loaded(input_ids=IDS, attention_mask=MASK)]
    assert [g.shape[-1] for g in got] == [2, 3]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_model_without_named_heads_round_trips_a_stack(tmp_path: Path) -> None:
    model = adaptercli.init(AutoModel.from_pretrained(MODEL_DIR).eval())
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("lo", "lora[r=4]")
    _perturbed(model, [*model.adapter_state.adapter_parameters("bn").values(),
                       *model.adapter_state.adapter_parameters("lo").values()])
    model.set_active_adapters(Stack("bn", "lo"))
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    model.save_adapter_setup(tmp_path / "s", ["bn", "lo"])  # a list is a Stack, as for set_active_adapters
    other = adaptercli.init(AutoModel.from_pretrained(MODEL_DIR).eval())
    assert other.load_adapter_setup(tmp_path / "s") == (Stack("bn", "lo"), None)
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS, attention_mask=MASK).last_hidden_state, want)
    with pytest.raises(AdapterFileError, match="no head named 'bn'"):
        model.save_adapter_setup(tmp_path / "h", Stack("bn", "lo"), head_setup="bn")


def test_set_active_false_loads_without_activating(tmp_path: Path) -> None:
    fused_model().save_adapter_setup(tmp_path / "s", Fuse("a", "b", name="target"), head_setup="target")
    model = fresh()
    model.load_adapter_setup(tmp_path / "s", set_active=False)
    assert model.active_adapters is None
    assert set(model.adapters_config) == {"a", "b"} and "target" in model.heads


def test_a_folder_that_is_not_a_setup_is_refused_in_one_line(tmp_path: Path) -> None:
    model = fused_model()
    model.save_adapter(tmp_path / "single", "a")
    model.save_adapter(tmp_path / "run/adapter", "a")
    (tmp_path / "run/recipe.yaml").write_text("adapter: {name: a}\n")
    for folder, hint in ((tmp_path / "single", "load it with load_adapter"), (tmp_path, ""),
                         (tmp_path / "run", "a run folder: `adapter export RUN --dest DIR` writes a fusion or stack "
                                            "run as a setup"), (tmp_path / "missing", "")):
        with pytest.raises(AdapterFileError) as error:
            fresh().load_adapter_setup(folder)
        message = str(error.value)
        assert "\n" not in message and str(folder) in message and hint in message
        assert "not found" in message if folder.name == "missing" else "not an adapter setup folder" in message


def test_a_setup_missing_a_part_loads_nothing(tmp_path: Path) -> None:
    fused_model().save_adapter_setup(tmp_path / "s", Fuse("a", "b", name="target"), head_setup="target")
    for name in ("adapter_fusion_config.json", "adapter_fusion.safetensors"):
        (tmp_path / "s/target" / name).unlink()
    model = fresh()
    with pytest.raises(AdapterFileError, match="not an AdapterFusion folder"):
        model.load_adapter_setup(tmp_path / "s")
    assert model.adapters_config == {} and model.adapter_state.fusions == {}


def test_saving_checks_every_part_before_writing(tmp_path: Path) -> None:
    model = fused_model()
    with pytest.raises(AdapterFileError, match="no head named 'nope'"):
        model.save_adapter_setup(tmp_path / "s", Fuse("a", "b", name="target"), head_setup="nope")
    with pytest.raises(adaptercli.errors.AdapterError, match="no adapter named 'c'"):
        model.save_adapter_setup(tmp_path / "s", Stack("a", "c"))
    assert not (tmp_path / "s").exists()
