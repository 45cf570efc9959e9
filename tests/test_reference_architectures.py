"""The architectures and methods beyond the core (encoder-decoders, DeBERTa, ViT, CLIP, decoders; compacter, ReFT, VeRA, ...) against AdapterHub `adapters` 1.3.0: each folder it
saved loads into our library on transformers 5.x and gives its output within 1e-4 on real tokens,
under eager and SDPA attention where the model has SDPA; deactivating gives the bare model back.
Fixtures: scripts/make_breadth_fixtures.py (tests/fixtures/breadth/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "tests/fixtures/breadth/manifest.json").read_text())
CASES = [c for c in MANIFEST["cases"] if c["status"] == "ok"]
# Models whose transformers 5.x implementation has no SDPA path (their own attention code).
EAGER_ONLY = {"deberta", "deberta-v2", "gemma2"}


def _params() -> list:
    return [pytest.param(case, attn, id=f"{case['name']}-{attn}")
            for case in CASES for attn in ("eager", "sdpa") if not (attn == "sdpa" and case["arch"] in EAGER_ONLY)]


def _load(case: dict, attn: str, layout: dict | None = None):
    """The bare model with the adapter API. A model outside the table (OPT) gets its layout from
    the AdapterHub plugin interface saved beside it, unless ``layout`` is given."""
    folder = ROOT / case["model_dir"]
    interface = folder / "adapter_interface.json"
    if layout is None and interface.exists():
        layout = json.loads(interface.read_text())["interface"]
    return adaptercli.init(AutoModel.from_pretrained(folder, attn_implementation=attn).eval(), layout=layout)


def _close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4) -> None:
    if actual.shape[1] > mask.shape[1]:  # prompt tuning: the prompt positions come first and count
        extra = actual.shape[1] - mask.shape[1]
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    keep = mask.bool()
    diff = (actual[keep] - expected[keep]).abs().max().item()
    assert diff <= atol, f"max abs difference on real tokens {diff:.2e} > {atol:.0e}"


def _inputs(io: dict) -> tuple[dict, torch.Tensor]:
    """The model inputs of a fixture and the mask of positions to compare (ViT: pixels, all; an
    encoder-decoder: the decoder's output, unpadded)."""
    if "pixel_values" in io:
        return {"pixel_values": io["pixel_values"]}, torch.ones(io["expected"].shape[:2], dtype=torch.long)
    if "input_features" in io:  # Whisper: audio features, no padding
        inputs = {"input_features": io["input_features"], "decoder_input_ids": io["decoder_input_ids"]}
        return inputs, torch.ones(io["decoder_input_ids"].shape, dtype=torch.long)
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    if "decoder_input_ids" in io:
        inputs["decoder_input_ids"] = io["decoder_input_ids"]
        return inputs, torch.ones(io["decoder_input_ids"].shape, dtype=torch.long)
    return inputs, io["attention_mask"]


@pytest.mark.parametrize("case,attn", _params())
def test_output_matches_adapters_1_3_0(case: dict, attn: str) -> None:
    io = load_file(ROOT / case["io"])
    inputs, mask = _inputs(io)
    model = _load(case, attn)
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    _close(before, io["bare"], mask)
    model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    with torch.no_grad():
        outputs = model(**inputs)
    _close(outputs.last_hidden_state, io["expected"], mask)
    if "expected_encoder" in io:  # and the encoder's adapters, on its real tokens
        encoder_mask = io.get("attention_mask", torch.ones(io["expected_encoder"].shape[:2], dtype=torch.long))
        _close(outputs.encoder_last_hidden_state, io["expected_encoder"], encoder_mask)
    model.set_active_adapters(None)
    with torch.no_grad():
        bare = model(**inputs).last_hidden_state
    assert torch.equal(bare, before), "deactivating must give the bare model back exactly"


# The worked example of the docs ("Any model: the layout" in docs/support-matrix.md): OPT described in
# adaptercli's own layout keys (the shipped preset configs/layout/opt.yaml) gives the same outputs as AdapterHub's
# plugin interface for it.
OPT_LAYOUT = yaml.safe_load((ROOT / "configs/layout/opt.yaml").read_text())["model"]["layout"]


@pytest.mark.parametrize("case", [c for c in CASES if c["arch"] == "opt"], ids=lambda c: c["name"])
def test_layout_in_our_keys_equals_adapterhub_plugin_interface(case: dict) -> None:
    io = load_file(ROOT / case["io"])
    model = _load(case, "sdpa", layout=OPT_LAYOUT)
    model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    _close(out, io["expected"], io["attention_mask"])


def test_adapter_model_reads_the_adapterhub_interface_beside_the_model() -> None:
    case = next(c for c in CASES if c["name"] == "opt_lora")
    io = load_file(ROOT / case["io"])
    model = adaptercli.AutoAdapterModel.from_pretrained(ROOT / case["model_dir"]).eval()
    model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).hidden_states
    _close(out, io["expected"], io["attention_mask"])


def test_every_new_architecture_has_reference_cases() -> None:
    """Every table entry beyond the core is covered by AdapterHub-made fixtures."""
    covered = {c["arch"] for c in CASES}
    for model_type in ("electra", "albert", "deberta-v2", "deberta", "qwen2", "qwen3", "gemma2", "gemma3_text",
                       "phi", "modernbert", "opt", "vit", "clip_text_model", "clip_vision_model", "bart", "t5",
                       "mbart", "mt5", "whisper"):
        assert model_type in covered, model_type


# Where each encoder-decoder's decoder keeps its cross-attention adapters in AdapterHub's files.
CROSS_KEYS = {
    "bart_double_seq_bn_cross": r"^decoder\.layers\.\d+\.cross_attention_adapters\.",
    "mbart_double_seq_bn_cross": r"^decoder\.layers\.\d+\.cross_attention_adapters\.",
    "t5_double_seq_bn_cross": r"^decoder\.block\.\d+\.layer\.1\.adapters\.",
    "mt5_double_seq_bn_cross": r"^decoder\.block\.\d+\.layer\.1\.adapters\.",
    "bart_lora": r"^decoder\.layers\.\d+\.encoder_attn\.[qkv]_proj\.loras\.",
    "t5_lora": r"^decoder\.block\.\d+\.layer\.1\.EncDecAttention\.[qkv]\.loras\.",
    "whisper_double_seq_bn_cross": r"^decoder\.layers\.\d+\.cross_attention_adapters\.",
}


@pytest.mark.parametrize("name", list(CROSS_KEYS))
def test_decoder_cross_attention_adapters_sit_where_adapterhub_puts_them(name: str) -> None:
    """Loading is strict (no tensor of AdapterHub's folder left over, none missing), every decoder
    layer has its cross-attention adapter under AdapterHub's key, and they are live: zeroing them
    moves the decoder's output away from AdapterHub's while the encoder's stays put."""
    case = next(c for c in CASES if c["name"] == name)
    io = load_file(ROOT / case["io"])
    inputs, _ = _inputs(io)
    model = _load(case, "eager")
    model.load_adapter(ROOT / case["adapter_dir"], set_active=True)
    cross = {k: p for k, p in model.adapter_state.adapter_parameters("ref").items() if re.search(CROSS_KEYS[name], k)}
    assert {re.match(r"^decoder\.(?:layers|block)\.(\d+)", k).group(1) for k in cross} == {"0", "1"}
    with torch.no_grad():
        for p in cross.values():
            p.zero_()
        outputs = model(**inputs)
    encoder_mask = io.get("attention_mask", torch.ones(io["expected_encoder"].shape[:2], dtype=torch.long))
    _close(outputs.encoder_last_hidden_state, io["expected_encoder"], encoder_mask)
    assert (outputs.last_hidden_state - io["expected"]).abs().max() > 1e-3
