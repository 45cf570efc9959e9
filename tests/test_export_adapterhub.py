"""`adapter export --to adapterhub` for the architectures beyond BERT-like encoders (ViT and CLIP, whose module
paths transformers 5 renamed; encoder-decoder and DeBERTa prefix tuning): an adapter made by
AdapterHub `adapters` 1.3.0, loaded into ours and exported again, gives back AdapterHub's own
folder: the same tensors under the same keys and the same config. That folder is the one adapters
1.3.0 wrote and reloaded to its output (scripts/make_breadth_fixtures.py); loading our exports in
adapters 1.3.0 itself is recorded in tests/fixtures/breadth/export_check/ (its check.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reference_architectures import CASES, ROOT, _close, _inputs, _load

from adaptercli.export import export, open_source

EXPORTED = [c for c in CASES if c["arch"] in ("vit", "clip_text_model", "clip_vision_model")
            or "prefix_tuning" in c["name"] or c["name"] in ("deberta_mam", "deberta_unipelt", "deberta_v2_mam",
                                                              "deberta_v2_unipelt")]
# Config keys AdapterHub keeps as class attributes, which it does not write (ReFT's).
CLASS_ATTRIBUTES = {"subtract_projection"}


def _adapterhub_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter.safetensors").exists():
        return load_file(folder / "adapter.safetensors")
    return torch.load(folder / "pytorch_adapter.bin", weights_only=True)


@pytest.mark.parametrize("case", EXPORTED, ids=lambda c: c["name"])
def test_adapterhub_export_is_adapterhubs_own_folder(case: dict, tmp_path: Path) -> None:
    model = _load(case, "eager")
    model.load_adapter(ROOT / case["adapter_dir"])
    model.save_adapter(tmp_path / "native", "ref")
    export(open_source(tmp_path / "native"), "adapterhub", str(tmp_path / "ah"))
    model.save_adapter(tmp_path / "py", "ref", format="adapterhub")  # the Python API writes the same folder
    theirs = _adapterhub_weights(ROOT / case["adapter_dir"])
    for ours in (load_file(tmp_path / "ah/adapter.safetensors"), load_file(tmp_path / "py/adapter.safetensors"),
                 torch.load(tmp_path / "ah/pytorch_adapter.bin", weights_only=True)):
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours_config = json.loads((tmp_path / "ah/adapter_config.json").read_text())["config"]
    theirs_config = json.loads((ROOT / case["adapter_dir"] / "adapter_config.json").read_text())["config"]
    assert {k: v for k, v in ours_config.items() if k not in CLASS_ATTRIBUTES} == theirs_config

    again = _load(case, "eager")  # and the export reads back into ours with AdapterHub's output
    again.load_adapter(tmp_path / "ah", set_active=True)
    io = load_file(ROOT / case["io"])
    inputs, mask = _inputs(io)
    with torch.no_grad():
        _close(again(**inputs).last_hidden_state, io["expected"], mask)


def test_adapters_1_3_0_loaded_our_exports_with_its_outputs() -> None:
    """The recorded check (export_check/check.py, run in the reference venv) covers these cases."""
    record = json.loads((ROOT / "tests/fixtures/breadth/export_check/result.json").read_text())
    assert record["versions"]["adapters"] == "1.3.0"
    results = {r["name"]: r for r in record["cases"]}
    for case in EXPORTED:
        assert case["name"] in results, case["name"]
        assert results[case["name"]]["max_abs_diff"] <= 1e-4, case["name"]
