"""Outputs with an adapter active equal those of AdapterHub `adapters` 1.3.0 and PEFT, on tiny
random models, with the same weights (fixtures made by scripts/make_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "tests/fixtures/manifest.json").read_text())
CASES = [c for c in MANIFEST["cases"] if c["status"] == "ok"]


def _masked_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4) -> None:
    keep = mask.bool()
    diff = (actual[keep] - expected[keep]).abs().max().item()
    assert diff <= atol, f"max abs difference on real tokens {diff:.2e} > {atol:.0e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", [c for c in CASES if c["output"] == "last_hidden_state"], ids=lambda c: c["name"])
def test_hidden_states_match_reference(case: dict, attn: str) -> None:
    io = load_file(ROOT / case["io"])
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / case["model_dir"], attn_implementation=attn).eval())
    name = model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    _masked_close(out, io["expected"], io["attention_mask"])
    model.set_active_adapters(None)
    with torch.no_grad():
        bare = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    _masked_close(bare, io["bare"], io["attention_mask"])
    assert (bare - io["expected"]).abs().max() > 1e-3, "the fixture's adapter must change the output"
    assert name


def test_head_logits_match_reference() -> None:
    case = next(c for c in CASES if c["output"] == "logits")
    io = load_file(ROOT / case["io"])
    model = adaptercli.AutoAdapterModel.from_pretrained(ROOT / case["model_dir"]).eval()
    name = model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    assert name in model.heads
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    assert torch.allclose(logits, io["expected"], atol=1e-4)
