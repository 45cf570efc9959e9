"""`adaptercli.locate`: every adapter source becomes one local folder — a folder as it is, a run
folder as its ``adapter/``, ``task/dataset@org`` through an index (the descriptor made for this
model, its files checked against their sha256), ``org/name`` from the Hub (failing fast offline)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from adaptercli.hub import HubError
from adaptercli.index import AdapterIndexError
from adaptercli.locate import local_folder, locate, looks_local
from adaptercli.model import init
from tests.conftest import batch, tiny_model


def _saved_adapter(folder: Path, seed: int = 0) -> Path:
    model = init(tiny_model("bert", seed=seed))
    model.add_adapter("sst", config="lora")
    with torch.no_grad():
        for p in model.adapter_state.adapter_parameters("sst").values():
            p.normal_(0, 0.1)
    model.save_adapter(folder, "sst")
    return folder


def _descriptor(index: Path, stem: str, files_at: Path, *, model_type: str, hidden_size: int) -> None:
    """A descriptor for ``sentiment/sst2@lab`` whose files are ``files_at`` (inside the index)."""
    folder = index / "sentiment" / "sst2" / "lab"
    folder.mkdir(parents=True, exist_ok=True)
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_at.iterdir() if p.is_file()}
    data = {"task": "sentiment", "dataset": "sst2", "org": "lab", "name": "sst",
            "model": {"name": None, "type": model_type, "hidden_size": hidden_size}, "method": "lora",
            "config": {}, "files": {"path": str(files_at.relative_to(folder)), "format": "adaptercli", "sha256": sha}}
    (folder / f"{stem}.yaml").write_text(yaml.safe_dump(data))


def test_folders_run_folders_and_names(tmp_path: Path) -> None:
    adapter = _saved_adapter(tmp_path / "run" / "adapter")
    assert local_folder(tmp_path / "run") == adapter  # a run folder stands for its adapter
    assert local_folder(adapter) == adapter
    assert locate(str(tmp_path / "run")) == adapter
    assert local_folder(tmp_path / "missing") is None
    assert locate(tmp_path / "missing" / "x") == tmp_path / "missing" / "x"  # the reader reports it
    assert looks_local("./a") and looks_local("a/b/c") and not looks_local("org/name")


def test_load_adapter_from_a_run_folder_equals_loading_its_adapter(tmp_path: Path) -> None:
    _saved_adapter(tmp_path / "run" / "adapter", seed=3)
    ids, mask = batch()
    outputs = []
    for source in (tmp_path / "run", tmp_path / "run" / "adapter"):
        model = init(tiny_model("bert", seed=1))
        model.load_adapter(str(source), set_active=True)
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert torch.equal(outputs[0], outputs[1])
    bare = tiny_model("bert", seed=1)
    with torch.no_grad():
        assert not torch.allclose(bare(input_ids=ids, attention_mask=mask).last_hidden_state, outputs[0])


def test_index_id_resolves_to_the_descriptor_made_for_this_model(tmp_path: Path) -> None:
    index = tmp_path / "index"
    lab = index / "sentiment" / "sst2" / "lab"
    bert_files = _saved_adapter(lab / "bert_lora")
    other = lab / "gpt2_lora"
    other.mkdir(parents=True)
    (other / "adapter_config.json").write_text("{}")
    _descriptor(index, "bert_lora", bert_files, model_type="bert", hidden_size=32)
    _descriptor(index, "gpt2_lora", other, model_type="gpt2", hidden_size=32)
    assert locate("sentiment/sst2@lab", index=index, model_type="bert", hidden_size=32) == bert_files.resolve()
    assert locate("sentiment/sst2@lab", index=index, model_type="gpt2", hidden_size=32) == other.resolve()
    with pytest.raises(AdapterIndexError, match="2 adapters in the index fit"):
        locate("sentiment/sst2@lab", index=index)
    with pytest.raises(AdapterIndexError, match="not for this roberta model"):
        locate("sentiment/sst2@lab", index=index, model_type="roberta", hidden_size=768)
    # A file that differs from the descriptor's sha256 is refused, not loaded.
    weights = bert_files / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(AdapterIndexError, match="sha256"):
        locate("sentiment/sst2@lab", index=index, model_type="bert", hidden_size=32)


def test_hub_ids_fail_fast_offline_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("ADAPTERCLI_INDEX", raising=False)
    with pytest.raises(HubError, match="pass index= or set ADAPTERCLI_INDEX"):
        locate("sentiment/sst2@lab")
    with pytest.raises(HubError) as error:  # not shaped like task/dataset@org: no word about an index
        locate("some-org/some-adapter")
    assert "ADAPTERCLI_INDEX" not in str(error.value) and "some-org/some-adapter" in str(error.value)
