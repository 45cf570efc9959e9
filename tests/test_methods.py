"""Methods on every architecture: parameter counts, merge/unmerge, activation, composition."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, batch, tiny_model
from transformers import AutoModel, RobertaConfig

import adaptercli
from adaptercli.methods import METHODS, ConfigError, resolve_config

PUBLISHED_ROBERTA_BASE = {
    "seq_bn": 894_528, "double_seq_bn": 1_789_056, "seq_bn_inv": 1_190_592, "lora": 294_912,
    "prefix_tuning": 9_872_384,
}


@pytest.mark.parametrize("method,expected", PUBLISHED_ROBERTA_BASE.items())
def test_trainable_parameters_match_published_roberta_base(method: str, expected: int) -> None:
    with torch.device("meta"):
        model = adaptercli.init(AutoModel.from_config(RobertaConfig()))
    model.add_adapter("a", method)
    model.train_adapter("a")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# Tiny models are 32 wide: Compacter's default reduction factor (32) would leave a 1-wide PHM layer.
TINY_SETTINGS = {"compacter": "[reduction_factor=4]", "compacter++": "[reduction_factor=4]"}
# Combinations refused by design, each with a clear error (the same limits as AdapterHub's).
_FUSED = "need separate q/k/v projections"
_GQA = "needs the same shape"
_PROMPT = "prompt tuning is not available"
REFUSED = {
    **{(m, "gpt2"): _FUSED for m in ("dora", "vera", "dvora", "unipelt")},
    **{(m, t): _GQA for m in ("vera", "dvora") for t in ("llama", "mistral", "qwen2")},
    **{("prompt_tuning", t): _PROMPT for t in ("gpt2", "llama", "mistral", "qwen2")},
}


@pytest.mark.parametrize("model_type", list(CONFIGS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_every_architecture(model_type: str, method: str, perturb) -> None:
    model = adaptercli.init(tiny_model(model_type))
    ids, mask = batch()
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if (method, model_type) in REFUSED:
        with pytest.raises(adaptercli.AdapterCliError, match=REFUSED[method, model_type]):
            model.add_adapter("a", method + TINY_SETTINGS.get(method, ""))
        assert not model.adapter_summary()[:-1], "a refused adapter leaves nothing behind"
        return
    model.add_adapter("a", method + TINY_SETTINGS.get(method, ""))
    perturb(model, "a")
    model.set_active_adapters("a")
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).last_hidden_state
    adapted = adapted[:, adapted.shape[1] - bare.shape[1]:]  # prompt tuning's positions come first
    assert torch.isfinite(adapted).all()
    assert (adapted - bare)[mask.bool()].abs().max() > 1e-4
    model.set_active_adapters(None)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(again, bare)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "ia3", "lora[r=4,alpha=16,intermediate_lora=true,output_lora=true]"])
def test_merge_equals_unmerged_and_unmerge_restores(model_type: str, method: str, perturb) -> None:
    model = adaptercli.init(tiny_model(model_type))
    with torch.no_grad():  # non-zero biases, so an IA3 merge that forgot them would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = batch()
    model.add_adapter("a", method)
    perturb(model, "a", scale=0.1)
    model.set_active_adapters("a")
    with torch.no_grad():
        hooked = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.merge_adapter("a")
        merged = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not model.adapter_state.handles, "a merged adapter must run no hook"
    assert torch.allclose(hooked, merged, atol=1e-5)
    model.unmerge_adapter("a")
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.allclose(value, original[key], atol=1e-6), key


def test_prefix_tuning_sdpa_equals_eager_with_padding(perturb) -> None:
    ids, mask = batch()
    outputs = {}
    for model_type in ("bert", "gpt2", "llama"):
        for attn in ("eager", "sdpa"):
            model = adaptercli.init(tiny_model(model_type, attn))
            model.add_adapter("p", "prefix_tuning[prefix_length=5]")
            perturb(model, "p", scale=0.5)
            model.set_active_adapters("p")
            with torch.no_grad():
                outputs[model_type, attn] = model(input_ids=ids, attention_mask=mask).last_hidden_state
            model.set_active_adapters(None)
            assert model.config._attn_implementation == attn
        keep = mask.bool()
        assert torch.allclose(outputs[model_type, "eager"][keep], outputs[model_type, "sdpa"][keep], atol=1e-5)


@pytest.mark.parametrize("model_type,dropout_key", [("bert", "attention_probs_dropout_prob"), ("gpt2", "attn_pdrop")])
def test_prefix_tuning_training_attention_equals_sdpa(model_type: str, dropout_key: str, monkeypatch) -> None:
    """In training on the CPU the prefixed attention runs its own copy of SDPA's math fallback
    (without the fully-masked-row guard): the same dropout draws, outputs and gradients to the bit."""
    from transformers import AutoConfig

    import adaptercli.methods.prefix_tuning as prefix_module

    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], dropout_key: 0.1})
    torch.manual_seed(0)
    model = adaptercli.init(AutoModel.from_config(config, attn_implementation="sdpa"))
    model.add_adapter("p", "prefix_tuning[prefix_length=5]")
    model.train_adapter("p")
    ids, mask = batch()
    calls = []
    math_attention = prefix_module._math_attention
    monkeypatch.setattr(prefix_module, "_math_attention", lambda *a: calls.append(1) or math_attention(*a))
    results = []
    for own in (True, False):
        if not own:
            monkeypatch.setattr(prefix_module, "_math_attention_applies", lambda *a: False)
        torch.manual_seed(3)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((hidden, torch.autograd.grad(hidden.square().sum(), params)))
    assert len(calls) == config.num_hidden_layers  # every layer took our path in the first pass
    (ours, our_grads), (sdpa, sdpa_grads) = results
    assert torch.equal(ours, sdpa)
    assert all(torch.equal(a, b) for a, b in zip(our_grads, sdpa_grads, strict=True))


def test_inactive_adapters_install_no_hooks() -> None:
    model = adaptercli.init(tiny_model("bert"))
    for i, method in enumerate(["seq_bn", "lora", "prefix_tuning", "ia3"]):
        model.add_adapter(f"a{i}", method)
    assert model.adapter_state.handles == []
    model.set_active_adapters("a1")
    assert len(model.adapter_state.handles) == 4  # query and value in two layers


def test_stack_runs_adapters_in_order(perturb) -> None:
    model = adaptercli.init(tiny_model("bert"))
    ids, mask = batch()
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn")
        perturb(model, name, seed=ord(name))
    outputs = {}
    for setup in (adaptercli.Stack("a", "b"), adaptercli.Stack("b", "a"), "a"):
        model.set_active_adapters(setup)
        with torch.no_grad():
            outputs[repr(setup)] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ab, ba, a = outputs.values()
    assert not torch.allclose(ab, ba) and not torch.allclose(ab, a)


def test_composition_blocks_check_what_they_need() -> None:
    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn")
    with pytest.raises(adaptercli.CompositionError, match="no AdapterFusion named 'a,b'.*add_adapter_fusion"):
        model.set_active_adapters(adaptercli.Fuse("a", "b"))
    with pytest.raises(adaptercli.AdapterCliError, match="no adapter named 'c'"):
        model.set_active_adapters(adaptercli.Stack("a", "c"))


def test_train_adapter_freezes_everything_but_adapter_and_head() -> None:
    model = adaptercli.AdapterModel(tiny_model("bert"))
    model.add_adapter("task", "seq_bn")
    model.add_classification_head("task", num_labels=3)
    model.add_adapter("other", "lora")
    model.train_adapter("task")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.task." in n or n.startswith("heads.task.") for n in trainable)
    assert any(n.startswith("heads.task.") for n in trainable)


def test_config_strings_dicts_and_errors() -> None:
    config = resolve_config("lora[r=16,alpha=32,attn_matrices=[q,k,v]]")
    assert (config.r, config.alpha, config.attn_matrices) == (16, 32, ["q", "k", "v"])
    assert resolve_config({"method": "seq_bn", "reduction_factor": 8}).reduction_factor == 8
    assert resolve_config("houlsby").mh_adapter is True
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        resolve_config("lorra")
    with pytest.raises(ConfigError, match="reduction_factr: unknown field.*did you mean 'reduction_factor'"):
        resolve_config("seq_bn[reduction_factr=8]")
    with pytest.raises(ConfigError, match="r=1"):
        resolve_config("ia3[r=4]")


def test_name_collision_and_unsupported_architecture() -> None:
    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("a", "lora")
    with pytest.raises(adaptercli.AdapterCliError, match="already exists"):
        model.add_adapter("a", "lora")
    from transformers import AutoConfig

    t5 = adaptercli.init(AutoModel.from_config(AutoConfig.for_model(
        "t5", d_model=32, num_layers=1, num_heads=2, d_ff=32, d_kv=16, vocab_size=50)).encoder)
    # T5's encoder stack on its own: the table's t5 entry (a whole encoder-decoder) does not fit it.
    with pytest.raises(adaptercli.AdapterCliError, match="(supported: .*\\bbert\\b|does not fit).*target_modules"):
        t5.add_adapter("a", "seq_bn")
    with pytest.raises(adaptercli.AdapterCliError, match="matched no layer.*named: .*\\bq\\b"):
        t5.add_adapter("b", "lora[target_modules=[query]]")
    t5.add_adapter("c", "lora[target_modules=[q,v]]")  # any model works by module name
    assert t5.adapter_summary()[0]["params"] == 2 * 8 * (32 + 32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "seq_bn", "prefix_tuning"])
def test_adapted_model_compiles(method: str) -> None:
    model = adaptercli.init(tiny_model("bert", "sdpa"))
    model.add_adapter("a", method)
    model.set_active_adapters("a")
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(compiled, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["seq_bn_inv", "lora", "prefix_tuning"])
def test_delete_adapter_removes_parameters_and_hooks(method: str) -> None:
    model = adaptercli.init(tiny_model("gpt2"))
    before = {k for k, _ in model.named_parameters()}
    ids, mask = batch()
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.add_adapter("a", method, set_active=True)
    model.delete_adapter("a")
    assert {k for k, _ in model.named_parameters()} == before
    assert model.adapter_state.handles == [] and model.active_adapters is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, bare)
