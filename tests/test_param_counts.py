"""Trainable parameter counts: every method identifier on a RoBERTa-base config equals what
AdapterHub `adapters` 1.3.0 builds (counted by scripts/make_breadth_fixtures.py with the real
library), and a published count made on the model it was given for matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, LlamaConfig, RobertaConfig

import adaptercli

ROOT = Path(__file__).resolve().parents[1]
COUNTS = json.loads((ROOT / "tests/fixtures/breadth/manifest.json").read_text())["param_counts"]["roberta-base"]


def trainable(config, method: str) -> int:
    with torch.device("meta"):
        model = adaptercli.init(AutoModel.from_config(config))
    model.add_adapter("a", method)
    model.train_adapter("a")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", list(COUNTS))
def test_trainable_parameters_equal_adapters_1_3_0_on_roberta_base(method: str) -> None:
    assert trainable(RobertaConfig(), method) == COUNTS[method]


def test_loreft_count_matches_pyreft_on_llama_2_7b() -> None:
    """pyreft's README: one rank-4 LoReFT intervention at layer 15 of Llama-2-7b (hidden 4096)
    trains 32,772 parameters (R 4x4096, W 4x4096, b 4)."""
    llama_2_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000)
    one_intervention = "loreft[r=4,layers=[15],tied_weights=true,prefix_positions=0,suffix_positions=1]"
    assert trainable(llama_2_7b, one_intervention) == 32_772
