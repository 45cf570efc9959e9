"""PEFT adapters beyond plain LoRA. IA3 as PEFT configures it by default: on its
``feedforward_modules`` (BERT's ``output.dense``, Llama's ``down_proj``, GPT-2's ``mlp.c_proj``)
``ia3_l`` scales the layer's input, elsewhere its output. LoRA with ``use_dora`` (PEFT's DoRA: the
norm of ``W + scaling B A``, the bias left out). Folders PEFT 0.18.1 wrote load with its outputs and
export back as its own folder; input-scaled IA3 merges, mixes in a batch and trains. Fixtures:
scripts/make_peft_more_fixtures.py (tests/fixtures/peft_more/).
And what PEFT can save that we have no place for (LoRA on embeddings, trained biases): one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli
from adaptercli.methods.base import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "tests/fixtures/peft_more/manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}


def _load(case: dict, attn: str = "eager"):
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / case["model_dir"], attn_implementation=attn).eval())
    model.load_adapter(ROOT / case["adapter_dir"], load_as="peft", set_active=True)
    return model


def _output(model, io: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state


def _close(actual: torch.Tensor, io: dict, atol: float = 1e-5) -> None:
    real = io["attention_mask"].bool()
    diff = (actual[real] - io["expected"][real]).abs().max().item()
    assert diff <= atol, f"max abs difference on real tokens {diff:.2e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CASES))
def test_peft_ia3_folders_load_with_peft_s_outputs(name: str, attn: str) -> None:
    case, io = CASES[name], load_file(ROOT / CASES[name]["io"])
    model = _load(case, attn)
    if case["config"] == "IA3Config":
        scaled_inputs = [n for n, m in model.base_model.named_modules()
                         if "peft" in getattr(m, "loras", {}) and m.loras["peft"].scales_input is not None]
        assert scaled_inputs, "the feedforward modules scale their input"
        assert all(n.endswith(tuple(case["feedforward_modules"])) for n in scaled_inputs)
    elif case["kwargs"].get("use_dora"):
        assert model.adapter_state.adapters["peft"].config.dora_norm == "peft"
    for name, r in case["kwargs"].get("rank_pattern", {}).items():  # per-layer ranks: A is [r, in] as it says
        shapes = {m.loras["peft"].lora_A.shape[0] for n, m in model.base_model.named_modules()
                  if "peft" in getattr(m, "loras", {}) and re.match(rf"(.*\.)?({name})$", n)}
        assert shapes == {r}, (name, shapes)
    _close(_output(model, io), io)
    with model.running(None):
        bare = _output(model, io)
    assert (bare - io["bare"])[io["attention_mask"].bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_export_to_peft_is_peft_s_own_folder(name: str, tmp_path: Path) -> None:
    case, io = CASES[name], load_file(ROOT / CASES[name]["io"])
    model = _load(case)
    model.save_adapter(tmp_path / "out", "peft", format="peft")
    theirs = load_file(ROOT / case["adapter_dir"] / "adapter_model.safetensors")
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():  # [1, in] on the feedforward modules, [out, 1] elsewhere
        assert ours[key].shape == value.shape, key
        assert torch.allclose(ours[key], value, atol=1e-6), key
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    if case["config"] == "IA3Config":
        modules = {k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in theirs}
        pattern = config["feedforward_modules"]
        assert ({m for m in modules if re.fullmatch(pattern, m)}
                == {m for m in modules if theirs[f"base_model.model.{m}.ia3_l"].shape[0] == 1})
    else:  # LoRA: DoRA, rsLoRA and the per-layer ranks and alphas written as PEFT wrote them
        assert config["peft_type"] == "LORA"
        for key, default in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {})):
            assert config[key] == case["kwargs"].get(key, default), key
    again = adaptercli.init(AutoModel.from_pretrained(ROOT / case["model_dir"], attn_implementation="eager").eval())
    again.load_adapter(tmp_path / "out", load_as="peft", set_active=True)
    _close(_output(again, io), io)


@pytest.mark.parametrize("name", ["peft_bert_ia3_default", "peft_gpt2_ia3_default"])
def test_merging_scales_the_weight_s_input_columns_and_unmerging_restores_it(name: str) -> None:
    case, io = CASES[name], load_file(ROOT / CASES[name]["io"])
    model = _load(case)
    before = {n: p.clone() for n, p in model.base_model.named_parameters() if "loras" not in n}
    model.merge_adapter("peft")
    with model.running(None):  # the hooks are off: the weights alone give PEFT's output
        _close(_output(model, io), io)
    model.unmerge_adapter("peft")
    after = dict(model.base_model.named_parameters())
    assert all(torch.allclose(after[n], p, atol=1e-6) for n, p in before.items())


def test_input_scaling_and_peft_dora_rows_mix_with_other_adapters(perturb) -> None:
    """On a BERT with non-zero biases (PEFT's DoRA adds back the bias it leaves out, per group)."""
    base = AutoModel.from_pretrained(ROOT / "tests/fixtures/biased/models/bert", attn_implementation="sdpa")
    model = adaptercli.AdapterModel(base)
    model.add_adapter("ff", "ia3[target_modules=[key,value,output.dense],feedforward_modules=[output.dense]]")
    model.add_adapter("dora", "dora[dora_norm=peft]")
    model.add_adapter("lora", "lora")
    for i, name in enumerate(("ff", "dora", "lora")):
        perturb(model, name, scale=0.5, seed=i)
        model.add_classification_head(name, num_labels=3)
    model.eval()
    ids = torch.randint(3, 100, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 5:] = 0
    per_row = ["ff", "dora", "lora", "ff", "dora"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=per_row).logits
        for row, name in enumerate(per_row):
            model.set_active_adapters(name)
            alone = model(input_ids=ids, attention_mask=mask).logits
            assert (mixed[row] - alone[row]).abs().max() <= 1e-5, (row, name)
        model.set_active_adapters("ff")
        with_ff = model(input_ids=ids, attention_mask=mask).logits
        model.set_active_adapters("lora")
        assert (with_ff - model(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_input_scaling_trains_with_the_gradient_of_layer_of_x_times_l(perturb) -> None:
    """The gradient of the input scale equals the one through ``layer(x * l)`` written out (PEFT's
    formula), and the output too."""
    model = adaptercli.AdapterModel(tiny_model("bert", attn="eager"))
    model.add_adapter("ff", "ia3[target_modules=[output.dense],feedforward_modules=[output.dense]]")
    perturb(model, "ff", scale=0.5)
    model.set_active_adapters("ff")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    layer = model.base_model.encoder.layer[0].output.dense
    scale = layer.loras["ff"].lora_B
    ours = model(input_ids=ids).hidden_states.pow(2).sum()
    (grad_ours,) = torch.autograd.grad(ours, scale)

    model.set_active_adapters(None)
    handles = []
    for m in model.base_model.modules():
        if "ff" in getattr(m, "loras", {}):
            def scaled(module, args, lora=m.loras["ff"]):
                return (args[0] * lora.lora_B.view(-1) * lora.scaling,)
            handles.append(m.register_forward_pre_hook(scaled))
    reference = model(input_ids=ids).hidden_states.pow(2).sum()
    (grad_reference,) = torch.autograd.grad(reference, scale)
    for h in handles:
        h.remove()
    assert torch.allclose(ours, reference, rtol=1e-5)
    assert grad_ours.abs().max() > 0
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("config", "message"), [
    ("lora[target_modules=[output.dense],feedforward_modules=[output.dense]]", "only IA3"),
    ("ia3[target_modules=[query],feedforward_modules=[output.dense]]", "names none of the layers"),
    ({"method": "lora", "rank_pattern": {"query": 0}}, r"rank_pattern: 'query' needs an integer >= 1, got 0"),
    ({"method": "lora", "rank_pattern": {"query": 2.5}}, r"needs an integer >= 1, got 2.5"),
    ({"method": "lora", "alpha_pattern": {"value": -4}}, r"alpha_pattern: 'value' needs a number > 0, got -4"),
    ({"method": "lora", "rank_pattern": {"(query": 2}}, r"key '\(query' is not a regular expression"),
    ({"method": "dora", "dora_norm": "pef"}, "did you mean peft"),
])
def test_peft_config_fields_refuse_bad_values_in_one_line(config, message: str) -> None:
    model = adaptercli.AdapterModel(tiny_model("bert"))
    with pytest.raises(ConfigError, match=message):
        model.add_adapter("x", config)


def test_dora_as_adapterhub_computes_it_is_not_written_as_peft_s(perturb, tmp_path: Path) -> None:
    """The two DoRAs differ (AdapterHub renormalises the bias and leaves the scaling out of the
    norm): AdapterHub's is refused for PEFT, PEFT's for AdapterHub; each is exact in its own."""
    from adaptercli.formats.common import AdapterFileError

    model = adaptercli.AdapterModel(tiny_model("bert"))
    model.add_adapter("ah", "dora")
    model.add_adapter("pf", "dora[dora_norm=peft]")
    with pytest.raises(AdapterFileError, match="DoRA as AdapterHub renormalises it"):
        model.save_adapter(tmp_path / "p", "ah", format="peft")
    with pytest.raises(AdapterFileError, match="dora_norm"):
        model.save_adapter(tmp_path / "a", "pf", format="adapterhub")
    for name in ("ah", "pf"):
        perturb(model, name, scale=0.3)
    model.eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    outputs = []
    for name in ("ah", "pf"):
        model.set_active_adapters(name)
        with torch.no_grad():
            outputs.append(model(input_ids=ids).hidden_states)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


@pytest.mark.parametrize(("keys", "meta", "message"), [
    (["embed_tokens.base_layer.weight", "embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B"], {},
     r"LoRA on an embedding layer \(embed_tokens\) is not supported"),
    (["layers.0.self_attn.q_proj.lora_A.weight", "layers.0.self_attn.q_proj.lora_B.weight",
      "layers.0.self_attn.q_proj.bias"], {"bias": "all"}, r"bias='all' trained the layers' biases"),
])
def test_peft_folders_with_what_we_have_no_place_for_are_refused_in_one_line(keys, meta, message, tmp_path) -> None:
    from safetensors.torch import save_file

    from adaptercli.formats.common import AdapterFileError

    save_file({f"base_model.model.{k}": torch.ones(2, 2) for k in keys}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **meta}))
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / "tests/fixtures/models/llama"))
    with pytest.raises(AdapterFileError, match=message):
        model.load_adapter(tmp_path)


def test_peft_modules_to_save_copies_of_the_model_s_own_layers_are_refused_in_one_line(tmp_path) -> None:
    """PEFT saves a trained copy of the embeddings when they are in modules_to_save (chat tokens added)."""
    from safetensors.torch import save_file

    from adaptercli.formats.common import AdapterFileError

    base = AutoModel.from_pretrained(ROOT / "tests/fixtures/models/llama")
    width = base.config.hidden_size
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, width),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(width, 2),
               "base_model.model.embed_tokens.weight": base.embed_tokens.weight.detach().clone()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}))
    model = adaptercli.init(base)
    with pytest.raises(AdapterFileError, match=r"trained copies of the model's own layers \(embed_tokens\.weight"):
        model.load_adapter(tmp_path)
    assert not model.adapter_state.adapters  # nothing half-loaded left behind
