"""Saving and loading adapter folders: native round trips, PEFT export, and clear errors."""

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
from adaptercli.formats import AdapterFileError

ROOT = Path(__file__).resolve().parents[1]


def _output(model, **kw):
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("method", ["seq_bn", "par_bn", "seq_bn_inv", "double_seq_bn", "lora", "ia3", "prefix_tuning"])
def test_native_round_trip_with_head(method: str, tmp_path: Path, perturb) -> None:
    model = adaptercli.AdapterModel(tiny_model("bert"))
    model.add_adapter("sst", method)
    model.add_classification_head("sst", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    perturb(model, "sst")
    model.set_active_adapters("sst")
    model.eval()
    expected = _output(model)
    folder = tmp_path / "does" / "not" / "exist" / "yet"
    model.save_adapter(folder, "sst")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json", "head.safetensors", "head_config.json"]
    weights = load_file(folder / "adapter.safetensors")
    assert sum(v.numel() for v in weights.values()) == model.adapter_summary()[0]["params"]
    assert not any("encoder.layer.0.attention.self.query.weight" == k for k in weights)

    fresh = adaptercli.AdapterModel(tiny_model("bert"))
    name = fresh.load_adapter(folder, load_as="copy", set_active=True)
    fresh.eval()
    assert name == "copy" and fresh.heads["copy"].config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert torch.allclose(_output(fresh), expected, atol=1e-6)


def test_static_head_of_a_transformers_task_model_is_saved(tmp_path: Path, perturb) -> None:
    from conftest import CONFIGS
    from transformers import AutoConfig, AutoModelForSequenceClassification

    def make():
        torch.manual_seed(0)
        config = AutoConfig.for_model("bert", num_labels=2, **CONFIGS["bert"])
        return adaptercli.init(AutoModelForSequenceClassification.from_config(config).eval())

    model = make()
    model.add_adapter("a", "lora")
    perturb(model, "a")
    model.train_adapter("a")
    assert model.classifier.weight.requires_grad  # PEFT users must name it in modules_to_save; we don't
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    model.eval()
    expected = _output(model)
    model.save_adapter(tmp_path / "a", "a")
    fresh = make()
    fresh.load_adapter(tmp_path / "a", set_active=True)
    assert torch.allclose(_output(fresh), expected, atol=1e-6)


def test_peft_export_loads_back_and_matches_peft_layout(tmp_path: Path, perturb) -> None:
    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("a", "lora[r=8,alpha=16,use_rslora=true]")
    perturb(model, "a")
    model.set_active_adapters("a")
    expected = _output(model)
    model.save_adapter(tmp_path / "peft", "a", format="peft")
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True and config["lora_alpha"] == 16
    ours = set(load_file(tmp_path / "peft/adapter_model.safetensors"))
    reference = set(load_file(ROOT / "tests/fixtures/peft/peft_bert_lora/adapter_model.safetensors"))
    assert ours == reference  # same keys as a folder PEFT itself wrote for query/value LoRA
    fresh = adaptercli.init(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "peft", load_as="a", set_active=True)
    assert torch.allclose(_output(fresh), expected, atol=1e-6)


def test_errors_are_one_clear_message(tmp_path: Path) -> None:
    model = adaptercli.init(tiny_model("bert"))
    with pytest.raises(AdapterFileError, match="adapter folder not found"):
        model.load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        model.load_adapter(tmp_path / "empty")
    model.add_adapter("a", "seq_bn")
    model.save_adapter(tmp_path / "a", "a")
    (tmp_path / "a/adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="cannot read weights"):
        model.load_adapter(tmp_path / "a", load_as="b")
    assert "b" not in model.adapters_config  # nothing half-loaded
    (tmp_path / "a/adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        model.load_adapter(tmp_path / "a", load_as="b")

    other = adaptercli.init(tiny_model("gpt2"))
    other.add_adapter("g", "seq_bn")
    other.save_adapter(tmp_path / "g", "g")
    with pytest.raises(AdapterFileError, match="saved for a gpt2 model; this model is bert"):
        model.load_adapter(tmp_path / "g")
    meta = json.loads((tmp_path / "g/adapter_config.json").read_text())
    meta["hidden_size"] = 768
    (tmp_path / "g/adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="hidden size 768; this bert model has hidden size 32"):
        model.load_adapter(tmp_path / "g")


def test_pickles_are_read_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"config": {"reduction_factor": 16}, "name": "x",
                                                             "version": "adapters.1.3.0"}))
    torch.save({"x": Evil()}, folder / "pytorch_adapter.bin")
    model = adaptercli.init(tiny_model("bert"))
    with pytest.raises(AdapterFileError, match="cannot read weights"):
        model.load_adapter(folder)


class Interrupted(Exception):
    """Stands in for the process dying in the middle of a write."""


def test_an_interrupted_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptercli.formats import common

    weights, config = tmp_path / "adapter.safetensors", tmp_path / "adapter_config.json"
    common.write_weights(weights, {"w": torch.ones(3)})
    common.write_json(config, {"r": 8})

    def save_half(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise Interrupted

    def dump_half(data, handle, **kwargs):
        handle.write('{"r": ')
        raise Interrupted

    monkeypatch.setattr(common, "save_file", save_half)
    monkeypatch.setattr(common.json, "dump", dump_half)
    with pytest.raises(Interrupted):
        common.write_weights(weights, {"w": torch.zeros(3)})
    with pytest.raises(Interrupted):
        common.write_json(config, {"r": 16})
    monkeypatch.undo()

    assert torch.equal(load_file(weights)["w"], torch.ones(3))
    assert json.loads(config.read_text()) == {"r": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


# AdapterHub folders whose adapter_config.json names the config by identifier (AdapterHub's loader
# resolves the name to that config's defaults). Each fixture below was saved by adapters 1.3.0 with
# exactly those defaults, so the same folder with the identifier must give the same outputs.
IDENTIFIER_CASES = [
    ("adapters/bert_seq_bn", "seq_bn"), ("adapters/bert_seq_bn", "pfeiffer"),
    ("adapters/bert_double_seq_bn", "houlsby"), ("adapters/bert_par_bn", "parallel"),
    ("adapters/bert_seq_bn_inv", "pfeiffer+inv"), ("adapters/bert_lora", "lora"), ("adapters/bert_ia3", "ia3"),
    ("adapters/bert_prefix_tuning", "prefix_tuning"), ("breadth/adapters/bert_loreft", "loreft"),
    ("breadth/adapters/bert_dora", "dora"), ("breadth/adapters/bert_vera", "vera"),
    ("breadth/adapters/bert_scaled_par_bn", "scaled_par_bn"),
]


@pytest.mark.parametrize("fixture, identifier", IDENTIFIER_CASES)
def test_adapterhub_config_given_by_identifier_loads_as_its_defaults(fixture: str, identifier: str,
                                                                     tmp_path: Path) -> None:
    folder = ROOT / "tests/fixtures" / fixture
    meta = json.loads((folder / "adapter_config.json").read_text())
    shutil.copytree(folder, tmp_path / "by_id")
    (tmp_path / "by_id" / "adapter_config.json").write_text(json.dumps({**meta, "config": identifier}))
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = []
    for source in (folder, tmp_path / "by_id"):
        model = adaptercli.init(AutoModel.from_pretrained(ROOT / meta["model_name"]).eval())
        model.load_adapter(source, set_active=True)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).last_hidden_state)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("config", [{"method": "prefix_tuning", "prefix_length": 3, "bottleneck_size": 8},
                                    {"method": "prefix_tuning_flat", "prefix_length": 3}])
def test_prefix_pools_saved_all_layers_wide_before_leave_out_was_fixed_load_their_reached_layers(config, tmp_path) -> None:
    """Until 2026-12-07 a pool with ``leave_out`` was as wide as all the layers (layer i read slice i);
    such a folder loads with each reached layer's own slice (AdapterHub's layout since)."""
    from adaptercli.formats.common import read_weights

    model = adaptercli.AdapterModel(tiny_model("bert"))
    model.add_adapter("p", config)  # all layers: the old width
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_state.adapter_parameters("p").values():
            p.add_(torch.randn(p.shape, generator=g))
    model.save_adapter(tmp_path / "old", "p")
    meta = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    meta["config"]["leave_out"] = [0]  # what the old code saved for leave_out=[0]
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    saved = read_weights(tmp_path / "old", "adapter.safetensors")

    fresh = adaptercli.AdapterModel(tiny_model("bert"))
    fresh.load_adapter(tmp_path / "old")
    loaded = fresh.adapter_state.adapter_parameters("p")
    for key in ("prefix_tunings.p.control_trans.2.weight", "prefix_tunings.p.control_trans.2.bias"):
        if key in saved:  # layer 1's rows: the second half of the old, all-layers-wide rows
            half = saved[key].shape[0] // 2
            assert torch.equal(loaded[key], saved[key][half:])
    if "prefix_tunings.p.control_trans" in saved:  # flat: [P, layers, per layer] -> layer 1's block
        old = saved["prefix_tunings.p.control_trans"].reshape(3, 2, -1)
        assert torch.equal(loaded["prefix_tunings.p.control_trans"], old[:, 1].reshape(-1))
