"""Every method against AdapterHub `adapters` 1.3.0 on a BERT whose biases are not zero (the other
fixtures' tiny models have zero biases, under which a bias scaled, renormalised, added twice or left
out would not show), with adapters moved four times as far: our output within 1e-4 on the real
tokens, eager and SDPA. Fixtures: scripts/make_biased_fixtures.py (tests/fixtures/biased/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli

ROOT = Path(__file__).resolve().parents[1]
CASES = json.loads((ROOT / "tests/fixtures/biased/manifest.json").read_text())["cases"]


def test_the_base_model_has_biases_to_get_wrong() -> None:
    model = AutoModel.from_pretrained(ROOT / CASES[0]["model_dir"])
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert min(b.abs().max().item() for b in biases) > 0.05


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_output_matches_adapters_1_3_0_with_biases(case: dict, attn: str) -> None:
    io = load_file(ROOT / case["io"])
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / case["model_dir"], attn_implementation=attn).eval())
    model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    real = io["attention_mask"].bool()
    diff = (out[real] - io["expected"][real]).abs().max().item()
    assert diff <= 1e-4, f"max abs difference on real tokens {diff:.2e}"


def test_a_folder_as_adapters_saves_it_without_its_shared_tensors_is_refused_in_one_line(tmp_path: Path) -> None:
    """adapters 1.3.0's own save_adapter leaves out Compacter's shared PHM rule (our fixture adds it)."""
    import shutil

    from safetensors.torch import save_file

    from adaptercli.formats.common import AdapterFileError

    case = next(c for c in CASES if c["name"] == "compacter")
    folder = tmp_path / "compacter"
    shutil.copytree(ROOT / case["adapter_dir"], folder)
    weights = load_file(folder / "adapter.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("shared_parameters.")}, str(folder / "adapter.safetensors"))
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / case["model_dir"]).eval())
    with pytest.raises(AdapterFileError, match=r"lacks the adapter's shared tensors \(shared_parameters\.ref\.phm_rule\)"):
        model.load_adapter(folder)
    assert "ref" not in model.adapter_state.adapters  # nothing half-loaded left behind
