"""A PEFT export's ``adapter_config.json`` says what PEFT needs to rebuild the adapter: for the same
adapter, the same r, lora_alpha, use_rslora, fan_in_fan_out and task fields as a folder PEFT itself
wrote (tests/fixtures/peft, from scripts/make_fixtures.py), and target_modules that select the
same layers under PEFT's matching rule. (Our own reader rebuilds the modules from the weight keys,
so a round trip through adaptercli alone would not notice a wrong target_modules.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# PEFT fixture -> (its base model, the same adapter in our terms)
CASES = {
    "peft_bert_lora": ("bert", "lora[r=8,alpha=16]"),  # AdapterHub's default placement: query and value
    "peft_bert_rslora": ("bert", "lora[r=4,alpha=8,use_rslora=true,target_modules=[dense,key,query,value]]"),
    "peft_gpt2_lora": ("gpt2", "lora[r=4,alpha=8,target_modules=[c_attn]]"),  # a Conv1D: fan_in_fan_out
    "peft_llama_lora_all": ("llama", "lora[r=8,alpha=16,target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                     "up_proj,down_proj]]"),
}
FIELDS = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "task_type", "bias",
          "use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern")


def peft_selects(module_names: list[str], target_modules: str | list[str]) -> list[str]:
    """The modules PEFT wraps for ``target_modules`` (peft.tuners.tuners_utils.check_target_module_exists):
    a string is a regex that must match the whole name; a list entry matches a name equal to it or
    ending in ``.entry``."""
    if isinstance(target_modules, str):
        return [n for n in module_names if re.fullmatch(target_modules, n)]
    return [n for n in module_names if n in target_modules or any(n.endswith(f".{t}") for t in target_modules)]


@pytest.mark.parametrize("fixture", list(CASES))
def test_peft_export_config_matches_a_peft_written_folder(fixture: str, tmp_path: Path) -> None:
    arch, spec = CASES[fixture]
    reference_folder = FIXTURES / "peft" / fixture
    reference = json.loads((reference_folder / "adapter_config.json").read_text())
    model = adaptercli.init(AutoModel.from_pretrained(FIXTURES / "models" / arch))
    model.add_adapter("a", spec)
    model.save_adapter(tmp_path / "peft", "a", format="peft")
    ours = json.loads((tmp_path / "peft/adapter_config.json").read_text())

    assert {key: ours.get(key) for key in FIELDS} == {key: reference.get(key) for key in FIELDS}
    names = [name for name, _ in AutoModel.from_pretrained(FIXTURES / "models" / arch).named_modules()]
    selected = peft_selects(names, ours["target_modules"])
    assert selected and selected == peft_selects(names, reference["target_modules"])
    assert set(load_file(tmp_path / "peft/adapter_model.safetensors")) == set(
        load_file(reference_folder / "adapter_model.safetensors"))


def test_without_the_model_s_module_list_the_targets_are_an_exact_regex_under_any_prefix() -> None:
    from adaptercli.formats.peft import targets_for

    adapted = {"encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"}
    names = [n for n, _ in AutoModel.from_pretrained(FIXTURES / "models" / "bert").named_modules()]
    written = targets_for(adapted, None)
    assert isinstance(written["target_modules"], str) and written["layers_to_transform"] is None
    assert set(peft_selects(names, written["target_modules"])) == adapted
    assert set(peft_selects([f"bert.{n}" for n in names], written["target_modules"])) == {f"bert.{a}" for a in adapted}
    assert targets_for(adapted, names) == {"target_modules": ["query", "value"], "layers_to_transform": [1]}
