"""Per-row adapters (`AdapterModel.forward(..., adapter_names=[...])`): a mixed batch equals each
adapter run alone on the same padded batch, row by row within 1e-5 (logits of each row's own head
and hidden states on real tokens), for every family that mixes, a fusion and a stack, on a tiny BERT
and a tiny Llama, prompt tuning on the encoders it joins; a family that could not share a batch would be
refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, TINY, tiny_model
from test_seq2seq import T5
from transformers import AutoConfig, AutoModel

import adaptercli
from adaptercli import BatchSplit, Parallel, Stack
from adaptercli.errors import AdapterCliError, AdapterError

MIXED = {
    "bottleneck": ["seq_bn", "par_bn", "compacter[reduction_factor=4]", "seq_bn_inv"],
    "lora_family": ["lora", "dora", {"method": "vera", "attn_matrices": ["q"]}, "ia3"],
    "prefix": ["prefix_tuning[prefix_length=4,bottleneck_size=8]", "prefix_tuning[prefix_length=2,bottleneck_size=8]",
               "prefix_tuning_flat[prefix_length=3]"],
    "prefix_one_length": ["prefix_tuning[prefix_length=3,bottleneck_size=8]", "prefix_tuning_flat[prefix_length=3]", "lora",
                          "prefix_tuning[prefix_length=3,bottleneck_size=6]"],
    # Pools as wide as the layers each reaches (AdapterHub's layout), a layer's slice looked up per pool.
    "prefix_left_out": [{"method": "prefix_tuning", "prefix_length": 3, "bottleneck_size": 8, "leave_out": [0]},
                        {"method": "prefix_tuning", "prefix_length": 3, "bottleneck_size": 8, "leave_out": [1]},
                        "prefix_tuning[prefix_length=3,bottleneck_size=8]", "lora"],
    "unions": ["mam", "unipelt", "lora"],
    "across_families": ["seq_bn", "lora", "prefix_tuning[prefix_length=3,bottleneck_size=8]", "mam"],
    "reft": ["loreft", {"method": "direft", "prefix_positions": 2, "suffix_positions": 2}, "lora",
             {"method": "noreft", "layers": [0]}],
}


def _model(model_type: str, configs: list, perturb, labels: int | list[int] = 3):
    model = adaptercli.AdapterModel(tiny_model(model_type, attn="sdpa"))
    names = []
    for i, config in enumerate(configs):
        name = f"a{i}"
        model.add_adapter(name, config)
        perturb(model, name, seed=i)
        model.add_classification_head(name, num_labels=labels if isinstance(labels, int) else labels[i])
        names.append(name)
    return model.eval(), names


def _padded(rows: int = 6, length: int = 9, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, length - row % 4:] = 0  # 0 to 3 padded positions (right padding)
    return ids, mask


def _alone(model, setup, ids, mask):
    model.set_active_adapters(model.setup_named(setup))  # an adapter, a fusion by its name or a block
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


def _assert_rows_equal(model, per_row: list, ids, mask) -> None:
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=per_row)
    for row, name in enumerate(per_row):
        alone = _alone(model, name, ids, mask)
        real = mask[row].bool()
        assert (mixed.logits[row] - alone.logits[row]).abs().max() <= 1e-5, (row, name)
        hidden = (mixed.hidden_states[row][real] - alone.hidden_states[row][real]).abs().max()
        assert hidden <= 1e-5, (row, name, hidden.item())


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("family", list(MIXED))
def test_mixed_batch_rows_equal_each_adapter_alone(model_type: str, family: str, perturb) -> None:
    model, names = _model(model_type, MIXED[family], perturb)
    per_row = [names[i % len(names)] for i in (0, 1, 2, 0, 3, 1)]  # interleaved, not grouped
    ids, mask = _padded()
    _assert_rows_equal(model, per_row, ids, mask)
    first, second = (_alone(model, n, ids, mask).logits for n in names[:2])
    assert (first - second).abs().max() > 1e-4  # the adapters differ, so a mix-up would show


@pytest.mark.parametrize("config", ["prefix_tuning[prefix_length=4,bottleneck_size=8]", "mam"])
def test_prefixes_are_computed_once_at_inference_and_again_when_a_weight_changes(config: str, perturb) -> None:
    model, (name,) = _model("bert", [config], perturb)
    model.set_active_adapters(name)
    pool = next(m for m in model.modules() if type(m).__name__ == "PrefixPool")
    calls = []
    pool.control_trans.register_forward_hook(lambda *args: calls.append(1))
    ids, mask = _padded()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 1 and torch.equal(first, again)  # the MLP ran once for two batches
    with torch.no_grad():
        pool.control_trans[0].weight.mul_(1.5)  # an in-place update, as an optimizer step makes
        changed = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 2 and (changed - first).abs().max() > 1e-4
    fresh = model(input_ids=ids, attention_mask=mask).logits  # autograd on: computed, never kept
    assert len(calls) == 3
    torch.testing.assert_close(changed, fresh.detach(), atol=1e-6, rtol=0)


def test_groups_with_prefixes_go_last_so_the_others_attend_as_one_run(perturb) -> None:
    """Prefixed attention runs each group with prefixes on its own and neighbouring groups without
    prefixes together: the batch puts the groups that use prefixes (prefix tuning, MAM) after the
    others, in order of first appearance within each kind, and rows still come back in order."""
    model, names = _model("bert", ["prefix_tuning[prefix_length=3,bottleneck_size=8]", "lora", "mam", "seq_bn"], perturb)
    per_row = [names[i] for i in (0, 1, 2, 3, 0, 1)]
    order, setup = model.rows_setup(per_row, len(per_row))
    assert [c.last() for c in setup.children] == ["a1", "a3", "a0", "a2"] and setup.batch_sizes == [2, 1, 2, 1]
    assert order == [1, 5, 3, 0, 4, 2]
    ids, mask = _padded()
    _assert_rows_equal(model, per_row, ids, mask)


def _kept_values(model) -> dict:
    return {(id(m), slot): entry[2] for m in model.modules() for slot, entry in vars(m).get("_adaptercli_kept", {}).items()}


@pytest.mark.parametrize("config", ["dora", {"method": "vera", "attn_matrices": ["q"]}, "compacter[reduction_factor=4]",
                                    "lora", "ia3"])
def test_batch_independent_weights_are_kept_at_inference_and_follow_every_weight_change(config, perturb) -> None:
    """DoRA's magnitude, VeRA's and LoRA's scaled up-projection, Compacter's Kronecker weight, IA3's
    scale: computed once for many batches at inference, and recomputed after an in-place change to
    any weight they come from (each of the adapter's own, and the adapted layer's for DoRA)."""
    model, (name,) = _model("bert", [config], perturb)
    model.set_active_adapters(name)
    ids, mask = _padded()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        values = _kept_values(model)
        again = model(input_ids=ids, attention_mask=mask).logits
    assert values and all(v is values[k] for k, v in _kept_values(model).items())  # nothing computed again
    assert torch.equal(first, again)
    sources = list(model.adapter_state.adapter_parameters(name).values())
    if config == "dora":
        sources += [m.weight for m in model.modules() if hasattr(m, "loras")]
    for tensor in sources:
        with torch.no_grad():
            tensor.mul_(1.25).add_(0.05)  # in place, as an optimizer step or a merge changes a weight
            served = model(input_ids=ids, attention_mask=mask).logits
        fresh = model(input_ids=ids, attention_mask=mask).logits  # autograd on: computed, never kept
        torch.testing.assert_close(served, fresh.detach(), atol=1e-6, rtol=0)
    assert (served - first).abs().max() > 1e-4


def test_inference_mode_keeps_values_and_adapters_made_in_it_are_computed_each_time(perturb) -> None:
    """Under torch.inference_mode() the values are kept as under no_grad; an adapter created inside
    it has inference tensors, which keep no version: its values are computed at every call, so an
    in-place change still shows."""
    model, (name,) = _model("bert", ["dora"], perturb)
    ids, mask = _padded()
    model.set_active_adapters(name)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask).logits
        values = _kept_values(model)
        assert values and torch.equal(model(input_ids=ids, attention_mask=mask).logits, first)
        assert all(v is values[k] for k, v in _kept_values(model).items())
        model.add_adapter("made_here", "dora")
        model.add_classification_head("made_here", num_labels=3)
        model.set_active_adapters("made_here")
        before = model(input_ids=ids, attention_mask=mask).logits
        for p in model.adapter_state.adapter_parameters("made_here").values():
            p.mul_(1.5).add_(0.1)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (after - before).abs().max() > 1e-4  # a value kept from `before` would hide the change


@pytest.mark.parametrize("arch", ["modernbert", "phi"])
def test_mixed_batch_on_models_whose_adapters_replace_a_projection(arch: str, perturb) -> None:
    """Models where the adapter's result replaces a projection's output and the model adds its
    residual itself (AdapterHub's plugin placement): rows still equal each adapter alone."""
    from pathlib import Path

    from transformers import AutoModel

    folder = Path(__file__).parent / "fixtures/breadth/models" / arch
    model = adaptercli.AdapterModel(AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval())
    names = []
    # (no parallel adapter: Phi's FFN has no residual input of its own)
    for i, config in enumerate(["seq_bn", "lora", "prefix_tuning[prefix_length=3,bottleneck_size=8]", "double_seq_bn"]):
        model.add_adapter(f"a{i}", config)
        perturb(model, f"a{i}", seed=i)
        model.add_classification_head(f"a{i}", num_labels=3)
        names.append(f"a{i}")
    model.eval()
    ids, mask = _padded()
    _assert_rows_equal(model, [names[i % len(names)] for i in (0, 1, 2, 0, 3, 1)], ids, mask)


@pytest.mark.parametrize(("auto", "model_type"), [("AutoModelForSequenceClassification", "bert"),
                                                  ("AutoModelForCausalLM", "llama"), ("AutoModelForSeq2SeqLM", "t5")])
def test_an_initialised_transformers_model_takes_adapter_names_too(auto: str, model_type: str, perturb) -> None:
    """``adaptercli.init`` on a transformers model with its own head: ``model(..., adapter_names=)``
    runs each row through its adapter (it was passed on to the model's kwargs and ignored), the
    outputs in the rows' order; the signature transformers' generate reads keeps every argument."""
    import inspect

    import transformers

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(CONFIGS[model_type] if model_type in CONFIGS else T5))
    backbone = getattr(transformers, auto).from_config(config, attn_implementation="sdpa").eval()
    model = adaptercli.init(backbone)
    for i, method in enumerate(["lora", "seq_bn", "prefix_tuning[prefix_length=3,bottleneck_size=8]"]):
        model.add_adapter(f"a{i}", method)
        perturb(model, f"a{i}", scale=0.3, seed=i)
    model.eval()
    ids, mask = _padded(rows=5, length=7)
    ids = ids % config.vocab_size
    extra = {"decoder_input_ids": ids[:, :4]} if model_type == "t5" else {}
    per_row = ["a2", "a0", "a1", "a0", "a2"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=per_row, **extra).logits
        alone = {}
        for name in dict.fromkeys(per_row):
            model.set_active_adapters(name)
            alone[name] = model(input_ids=ids, attention_mask=mask, **extra).logits
    for row, name in enumerate(per_row):
        assert (mixed[row] - alone[name][row]).abs().max() <= 1e-5, (row, name)
    assert (alone["a0"] - alone["a1"]).abs().max() > 1e-4  # the adapters differ, so a mix-up would show
    own = [p for p in inspect.signature(getattr(transformers, type(backbone).__name__.removesuffix("WithAdapters")).forward
                                        ).parameters if p != "self"]
    assert [p for p in inspect.signature(model.forward).parameters if p != "adapter_names"] == own
    assert "adapter_names" in inspect.signature(model.forward).parameters
    if model_type == "bert":  # the model's own head reads every row at position 0: prompts must line up
        model.add_adapter("p", "prompt_tuning[prompt_length=3]")
        with pytest.raises(AdapterError, match="prompts of different lengths") as error:
            model(input_ids=ids, attention_mask=mask, adapter_names=["p", "a0", "p", "a1", "a2"])
        assert "\n" not in str(error.value)


def test_base_rows_run_the_bare_backbone_beside_adapters_fusions_prompts_and_interventions(perturb) -> None:
    """A row named "__base__" (PEFT's name) runs no adapter: its hidden states equal the bare
    model's (after the longest prompt's positions) and it has no head's logits; the other rows
    (an invertible adapter, a prompt, LoReFT, a fusion) still equal their adapters alone."""
    model, names = _model("bert", ["seq_bn_inv", "prompt_tuning[prompt_length=2]", "loreft", "seq_bn"], perturb)
    model.add_adapter_fusion(["a0", "a3"])
    model.add_classification_head("a0,a3", num_labels=3)
    model.eval()
    per_row = ["__base__", "a0", "a1", "a0,a3", "a2", "__base__", "a3"]
    ids, mask = _padded(rows=len(per_row))
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=per_row)
        model.set_active_adapters(None)
        bare = model(input_ids=ids, attention_mask=mask).hidden_states
    for row, name in enumerate(per_row):
        real = mask[row].bool()
        if name == "__base__":
            assert mixed.logits[row] is None
            states = mixed.hidden_states[row][-ids.shape[1]:]  # after the prompt's two positions
            assert (states[real] - bare[row][real]).abs().max() <= 1e-5, row
        else:
            alone = _alone(model, name, ids, mask).logits[row]
            assert (mixed.logits[row] - alone).abs().max() <= 1e-5, (row, name)
    with pytest.raises(AdapterError, match="'__base__' is reserved"):
        model.add_adapter("__base__", "lora")


def test_base_rows_of_an_initialised_causal_lm_forward_and_generate_as_the_bare_model(perturb) -> None:
    import transformers

    torch.manual_seed(0)
    model = adaptercli.init(transformers.AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **CONFIGS["llama"]), attn_implementation="sdpa").eval())
    model.add_adapter("a", "lora")
    perturb(model, "a", scale=0.5)
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(1))
    per_row = ["__base__", "a", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=per_row).logits
        bare = model(input_ids=ids).logits
        written = model.generate(input_ids=ids, adapter_names=per_row, max_new_tokens=4, do_sample=False)
        bare_written = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        model.set_active_adapters("a")
        adapted = model(input_ids=ids).logits
        adapted_written = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(mixed[[0, 2]], bare[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], adapted[1], atol=1e-5, rtol=0)
    assert (bare[1] - adapted[1]).abs().max() > 1e-3
    assert written[[0, 2]].tolist() == bare_written[[0, 2]].tolist()
    assert written[1].tolist() == adapted_written[1].tolist()


def test_generate_refuses_a_row_without_a_causal_lm_head_in_one_line(perturb) -> None:
    model = _causal_model(["lora"], perturb)
    model.add_adapter("b", "lora")
    ids = torch.randint(3, 60, (2, 5))
    for per_row, message in ((["a0", "b"], "generate: 'b' has no causal-LM head to write with"),
                             (["__base__", "a0"], "generate: '__base__' has no causal-LM head to write with")):
        with pytest.raises(AdapterError, match=message) as error:
            model.generate(ids, adapter_names=per_row, max_new_tokens=2)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["vit", "clip_vision_model", "whisper"])
def test_mixed_batch_of_images_or_audio_equals_each_adapter_alone(arch: str, perturb) -> None:
    """Rows read from ``pixel_values`` (ViT, CLIP's vision tower) or ``input_features`` (Whisper,
    with its decoder's ids): the mixed batch finds its rows there (it looked for input_ids or
    inputs_embeds only), and an AdapterModel on Whisper runs at all (it passed input_ids=None on)."""
    from pathlib import Path

    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(Path(__file__).parent / "fixtures/breadth/models" / arch).eval()
    model = adaptercli.AdapterModel(backbone)
    for i, method in enumerate(["seq_bn", "lora", "prefix_tuning[prefix_length=3,bottleneck_size=8]"]):
        model.add_adapter(f"a{i}", method)
        perturb(model, f"a{i}", scale=0.1, seed=i)
    model.eval()
    config, g = backbone.config, torch.Generator().manual_seed(0)
    if arch == "whisper":
        inputs = {"input_features": torch.randn(4, config.num_mel_bins, 2 * config.max_source_positions, generator=g),
                  "decoder_input_ids": torch.tensor([[1, 2, 3]] * 4)}
    else:
        inputs = {"pixel_values": torch.randn(4, config.num_channels, config.image_size, config.image_size, generator=g)}
    per_row = ["a2", "a0", "a1", "a0"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=per_row).hidden_states
        alone = {}
        for name in dict.fromkeys(per_row):
            model.set_active_adapters(name)
            alone[name] = model(**inputs).hidden_states
    for row, name in enumerate(per_row):
        assert (mixed[row] - alone[name][row]).abs().max() <= 1e-5, (row, name)
    assert (alone["a0"] - alone["a1"]).abs().max() > 1e-4


def test_whisper_generate_with_adapter_names_reads_its_rows_from_input_features(perturb) -> None:
    from pathlib import Path

    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)  # the fixture is the bare model: the output projection is new
    model = adaptercli.init(WhisperForConditionalGeneration.from_pretrained(
        Path(__file__).parent / "fixtures/breadth/models/whisper").eval())
    for i, method in enumerate(["lora", "seq_bn"]):
        model.add_adapter(f"a{i}", method)
        perturb(model, f"a{i}", scale=0.5, seed=i)
    config = model.config
    features = torch.randn(3, config.num_mel_bins, 2 * config.max_source_positions, generator=torch.Generator().manual_seed(1))
    per_row = ["a1", "a0", "__base__"]
    written = model.generate(input_features=features, adapter_names=per_row, max_new_tokens=4, do_sample=False)
    seen = set()
    for row, name in enumerate(per_row):
        model.set_active_adapters(None if name == "__base__" else name)
        alone = model.generate(input_features=features, max_new_tokens=4, do_sample=False)
        assert written[row].tolist() == alone[row].tolist(), (row, name)
        seen.add(tuple(alone[0].tolist()))
    assert len(seen) > 1  # the adapters write different tokens for one input: a mix-up would show


@pytest.mark.parametrize("arch", ["t5", "mt5"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_rows_with_prefixes_of_different_lengths_and_layers_equal_each_alone(arch: str, attn: str, perturb) -> None:
    """T5's relative position bias follows the prefix in AdapterHub's layout (its length moves the
    keys' positions; a layer left out after a prefixed one gets zeros), so each group of rows needs
    its own bias and its own history along the stack: prefixes of lengths 3 and 2, layers left out,
    and rows without a prefix, the decoder's output of each row equal to its adapter's alone."""
    from pathlib import Path

    from transformers import AutoModel

    folder = Path(__file__).parent / "fixtures/breadth/models" / arch
    model = adaptercli.AdapterModel(AutoModel.from_pretrained(folder, attn_implementation=attn).eval())
    configs = [{"method": "prefix_tuning", "prefix_length": 3, "bottleneck_size": 8, "leave_out": [0]},
               {"method": "prefix_tuning", "prefix_length": 2, "bottleneck_size": 8, "leave_out": [1, 2]},
               "seq_bn", "prefix_tuning[prefix_length=3,bottleneck_size=8]", "lora"]
    for i, config in enumerate(configs):
        model.add_adapter(f"a{i}", config)
        perturb(model, f"a{i}", seed=i)
    model.eval()
    per_row = ["a0", "a1", "a2", "a3", "a1", "a0", "a4"]
    ids, mask = _padded(rows=len(per_row))
    decoder = torch.randint(3, 100, (len(per_row), 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, adapter_names=per_row).hidden_states
        alone = {}
        for name in dict.fromkeys(per_row):
            model.set_active_adapters(name)
            alone[name] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).hidden_states
    for row, name in enumerate(per_row):
        assert (mixed[row] - alone[name][row]).abs().max() <= 1e-5, (row, name)
    assert (alone["a0"][0] - alone["a3"][0]).abs().max() > 1e-4  # leaving layer 0 out changes the output


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("family", ["bottleneck", "lora_family", "across_families"])
def test_mixed_batch_gradients_equal_each_adapter_alone(model_type: str, family: str, perturb) -> None:
    """With autograd on (training a BatchSplit), each adapter's gradient from a mixed batch equals
    the gradient from its own rows run alone: the rows' paths do not leak into each other."""
    model, names = _model(model_type, MIXED[family], perturb)
    _assert_gradients_match(model, [names[i % len(names)] for i in (0, 1, 2, 0, 3, 1)])


def test_prompt_tuning_rows_of_a_mixed_batch_train_as_alone(perturb) -> None:
    model, names = _prompt_model("bert", perturb, "classification")
    _assert_gradients_match(model, [names[i] for i in (0, 1, 2, 0, 3, 4, 5, 6)])


def _assert_gradients_match(model, per_row: list[str]) -> None:
    model.train()
    for module in model.modules():  # dropout off: both passes must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = _padded(rows=len(per_row))
    weights = torch.linspace(0.5, 1.5, 3)  # a loss that reads every logit of every row

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    mixed = grads((model(input_ids=ids, attention_mask=mask, adapter_names=per_row).logits * weights).sum())
    alone: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(per_row):
        rows = [i for i, n in enumerate(per_row) if n == name]
        model.set_active_adapters(name)
        loss = (model(input_ids=ids[rows], attention_mask=mask[rows]).logits * weights).sum()
        for key, grad in grads(loss).items():
            alone[key] = alone[key] + grad if key in alone else grad
    assert mixed.keys() == alone.keys() and len(mixed) > 2 * len(set(per_row))
    for key in mixed:
        torch.testing.assert_close(mixed[key], alone[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_fusion_and_stack_rows_mix_with_single_adapters(model_type: str, perturb) -> None:
    model, names = _model(model_type, ["seq_bn", "seq_bn", "lora"], perturb)
    fusion = model.add_adapter_fusion(["a0", "a1"], "dynamic", name="fused")
    perturb(model, "a1", seed=7)
    model.add_classification_head(fusion, num_labels=3)
    stack = Stack("a2", "a0")  # its head is a0's
    per_row = [fusion, "a2", stack, fusion, "a1", stack]
    ids, mask = _padded()
    _assert_rows_equal(model, per_row, ids, mask)


def test_heads_of_different_sizes_give_per_row_logits(perturb) -> None:
    model, names = _model("bert", ["seq_bn", "lora"], perturb, labels=[2, 5])
    ids, mask = _padded(rows=3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=["a1", "a0", "a1"])
    assert [tuple(t.shape) for t in out.logits] == [(5,), (2,), (5,)]
    torch.testing.assert_close(out.logits[1], _alone(model, "a0", ids, mask).logits[1], atol=1e-5, rtol=0)


def test_active_setup_is_restored_and_one_adapter_needs_no_split(perturb) -> None:
    model, names = _model("bert", ["prompt_tuning", "lora"], perturb)
    model.set_active_adapters("a1")
    ids, mask = _padded(rows=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "a0"])  # prompt tuning alone: fine
    torch.testing.assert_close(out.logits, _alone(model, "a0", ids, mask).logits, atol=1e-5, rtol=0)
    model.set_active_adapters("a1")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "a0"])
    assert model.active_adapters == Stack("a1")


def _prompt_model(model_type: str, perturb, head: str):
    if model_type == "deberta-v2":  # its encoder builds the mask before the prompt joins (prompts="attention")
        torch.manual_seed(0)
        config = AutoConfig.for_model("deberta-v2", **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])
        backbone = AutoModel.from_config(config, attn_implementation="eager").eval()
    else:
        backbone = tiny_model(model_type, attn="sdpa")
    model = adaptercli.AdapterModel(backbone)
    configs = ["prompt_tuning[prompt_length=4]", "prompt_tuning[prompt_length=2,combine=prefix_after_bos]", "seq_bn",
               "lora", "loreft", "prompt_tuning[prompt_length=4]"]
    if model_type != "deberta-v2":  # DeBERTa computes its own attention scores: no prefix tuning there
        configs.append("prefix_tuning[prefix_length=3,bottleneck_size=8]")
    for i, config in enumerate(configs):
        model.add_adapter(f"a{i}", config)
        perturb(model, f"a{i}", seed=i)
        (model.add_classification_head if head == "classification" else model.add_tagging_head)(f"a{i}", num_labels=3)
    return model.eval(), [f"a{i}" for i in range(len(configs))]


@pytest.mark.parametrize("head", ["classification", "tagging"])
@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "deberta-v2"])
def test_prompt_tuning_rows_mix_with_other_prompts_and_families(model_type: str, head: str, perturb) -> None:
    """Prompts of different lengths (4, 2 after the first token, another 4) beside rows without one
    (bottleneck, LoRA, ReFT, prefix tuning): each row's logits equal its adapter's alone, the
    token head's with the row's own prompt positions in front."""
    model, names = _prompt_model(model_type, perturb, head)
    per_row = [names[i % len(names)] for i in (0, 1, 2, 0, 3, 4, 5, 6)]
    ids, mask = _padded(rows=8)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=per_row)
    for row, name in enumerate(per_row):
        alone = _alone(model, name, ids, mask).logits[row]
        assert mixed.logits[row].shape == alone.shape, (row, name)
        if head == "tagging":  # the prompt's positions and the real tokens (padding's logits are noise)
            real = torch.cat([torch.ones(alone.shape[0] - ids.shape[1], dtype=torch.bool), mask[row].bool()])
            alone, mixed_row = alone[real], mixed.logits[row][real]
        else:
            mixed_row = mixed.logits[row]
        assert (mixed_row - alone).abs().max() <= 1e-5, (row, name)
    prompts = [_alone(model, n, ids, mask).logits[0] for n in ("a0", "a5")]
    assert (prompts[0] - prompts[1]).abs().max() > 1e-4  # two prompts of one length differ: a mix-up would show


def test_prompt_tuning_in_an_active_batch_split_gives_each_group_its_rows(perturb) -> None:
    model, _ = _prompt_model("bert", perturb, "classification")
    ids, mask = _padded(rows=6)
    model.set_active_adapters(BatchSplit("a1", "a2", "a0", batch_sizes=[2, 2, 2]))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for group, name in enumerate(("a1", "a2", "a0")):
        rows = slice(2 * group, 2 * group + 2)
        torch.testing.assert_close(out[group].logits, _alone(model, name, ids, mask).logits[rows], atol=1e-5, rtol=0)
    with pytest.raises(AdapterCliError, match="BatchSplit at the top of the setup") as error:
        model.set_active_adapters(Stack("a2", BatchSplit("a0", "a3", batch_sizes=[3, 3])))
    assert "\n" not in str(error.value)


def test_a_family_that_cannot_split_rows_is_refused_in_one_line(perturb, monkeypatch) -> None:
    from adaptercli.methods.prompt_tuning import PromptTuningFamily

    monkeypatch.setattr(PromptTuningFamily, "blocks", ("Stack",))
    model, _ = _model("bert", ["prompt_tuning", "lora"], perturb)
    ids, mask = _padded(rows=2)
    with pytest.raises(AdapterError) as error:
        model(input_ids=ids, attention_mask=mask, adapter_names=["a0", "a1"])
    assert "'a0' is a prompt_tuning adapter, which cannot share a batch" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("configs", "per_row", "message"), [
    (["lora"], ["a0", "nope"], "no adapter or fusion named 'nope' (on this model: a0)"),
    (["lora", "seq_bn"], [Parallel("a0", "a1"), "a0"], "a row cannot run Parallel (it splits or copies rows)"),
    (["lora", "seq_bn"], ["a1", Stack("a0", BatchSplit("a0", "a1", batch_sizes=[1, 1]))], "a row cannot run BatchSplit"),
    (["lora"], ["a0"], "adapter_names needs one name per row: 2 rows, got 1"),
])
def test_refusals_are_one_line(configs, per_row, message, perturb) -> None:
    model, _ = _model("bert", configs, perturb)
    ids, mask = _padded(rows=2)
    with pytest.raises(AdapterError) as error:
        model(input_ids=ids, attention_mask=mask, adapter_names=per_row)
    assert message in str(error.value) and "\n" not in str(error.value)


def _causal_model(configs: list, perturb, model_type: str = "llama"):
    model = adaptercli.AdapterModel(tiny_model(model_type, attn="sdpa"))
    for i, config in enumerate(configs):
        model.add_adapter(f"a{i}", config)
        perturb(model, f"a{i}", scale=0.5, seed=i)  # large: the adapters write different tokens
        model.add_causal_lm_head(f"a{i}")
    return model.eval()


def _greedy_alone(model, name: str, prompt: list[int], steps: int) -> list[int]:
    """What inference.answer does: one unpadded prompt, token by token, the adapter active."""
    model.set_active_adapters(name)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_causal_generate_rows_equal_each_adapter_alone(perturb) -> None:
    configs = ["lora", "seq_bn", "prefix_tuning[prefix_length=3,bottleneck_size=8]", "mam"]
    model = _causal_model(configs, perturb)
    prompts = [[5, 9, 13, 4, 7], [22, 3], [8, 8, 30, 2], [41, 17, 6], [11], [60, 61, 62, 63, 64]]
    per_row = ["a0", "a1", "a2", "a3", "a1", "a0"]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = model.generate(ids, mask, adapter_names=per_row, max_new_tokens=6)
    expected = [_greedy_alone(model, name, p, 6) for p, name in zip(prompts, per_row, strict=True)]
    assert new.tolist() == expected
    assert len({tuple(_greedy_alone(model, n, prompts[0], 6)) for n in ("a0", "a1", "a2")}) > 1  # they differ
    # transformers' greedy settings are accepted as they are written for its generate; others refused
    same = model.generate(input_ids=ids, attention_mask=mask, adapter_names=per_row, max_new_tokens=6,
                          do_sample=False, num_beams=1, pad_token_id=None)
    assert same.tolist() == expected
    with pytest.raises(AdapterError, match="continues greedily") as error:
        model.generate(ids, mask, adapter_names=per_row, do_sample=True, top_k=5)
    assert "do_sample=True, top_k=5" in str(error.value) and "\n" not in str(error.value)


class _Numbers:
    """A tokenizer for a tiny random model: a prompt is its token ids written out ("5 9 13")."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


@pytest.mark.parametrize(("model_type", "same_adapter"), [("llama", False), ("llama", True), ("gpt2", False)])
def test_answer_rows_continue_each_prompt_as_it_is_continued_alone(model_type: str, same_adapter: bool, perturb) -> None:
    """Several prompts continued together (what `adapter serve` does with generate requests that
    arrive together): prompts of different lengths, each row its own adapter (or one for all), its
    own temperature, seed and length, and stop tokens: each row writes what `answer` writes alone."""
    from adaptercli.inference import Continuation, answer, answer_rows

    model = _causal_model(["lora", "seq_bn", "prefix_tuning[prefix_length=3,bottleneck_size=8]", "mam"], perturb, model_type)
    tokenizer = _Numbers()
    prompts = ["5 9 13 4 7", "22 3", "8 8 30 2", "41 17 6", "11", "60 61 62 63 64"]
    per_row = ["a2"] * 6 if same_adapter else ["a0", "a1", "a2", "a3", "a1", "a0"]
    temperatures, lengths = [0.0, 0.8, 0.0, 1.3, 0.5, 0.0], [6, 3, 5, 6, 0, 4]

    def alone(stop: set[int]) -> list[str]:
        answers = []
        for i, (prompt, name) in enumerate(zip(prompts, per_row, strict=True)):
            model.set_active_adapters(name)
            answers.append(answer(model, tokenizer, prompt, False, stop, lengths[i], temperatures[i],
                                  torch.Generator().manual_seed(i)))
        model.set_active_adapters(None)
        return answers

    def together(stop: set[int]) -> list[str]:
        rows = [Continuation(prompt, False, lengths[i], temperatures[i], torch.Generator().manual_seed(i),
                             model.setup_named(name)) for i, (prompt, name) in enumerate(zip(prompts, per_row, strict=True))]
        return answer_rows(model, tokenizer, rows, stop)

    free = alone(set())
    assert together(set()) == free and free[4] == "" and len(free[0].split()) == 6
    row, k = next((r, i) for r, text in enumerate(free) for i, t in enumerate(text.split()) if i and t not in text.split()[:i])
    stop = {int(free[row].split()[k])}  # a token that row writes k-th, not before: it now ends there
    stopped = alone(stop)
    assert stopped[row].split() == free[row].split()[:k] and together(stop) == stopped
    if not same_adapter:  # the adapters write different tokens, so a row given another's would show
        per_row[0] = "a1"
        assert alone(set())[0] != free[0]


_PER_POSITION = {"llama": ["lora", "dora", {"method": "vera", "attn_matrices": ["q"]}, "ia3", "seq_bn", "par_bn", "compacter[reduction_factor=4]", "seq_bn_inv",
                            "prefix_tuning[prefix_length=3,bottleneck_size=8]", "mam"],
                  "gpt2": ["lora", "ia3", "seq_bn", "par_bn", "compacter[reduction_factor=4]", "prefix_tuning[prefix_length=3,bottleneck_size=8]",
                           "mam"]}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_answer_rows_keep_keys_and_values_and_write_what_the_whole_text_read_again_writes(model_type, perturb) -> None:
    """With adapters that change each position from itself and the keys before it, answer_rows
    keeps the keys and values (a KV cache) and reads one token per row per step; what it writes
    equals the whole text read again at every step (``_greedy_alone``, no cache), for each family
    alone, mixed in one padded batch, and for a fusion and a stack."""
    from adaptercli.inference import Continuation, answer_rows

    configs = _PER_POSITION[model_type]
    model = _causal_model(configs, perturb, model_type)
    names = [f"a{i}" for i in range(len(configs))]
    fusable = [n for n, c in zip(names, configs, strict=True) if c in ("seq_bn", "par_bn")]
    fusion = model.add_adapter_fusion(fusable, "dynamic", name="fused")
    model.add_causal_lm_head(fusion)
    stack = Stack(names[0], names[4])  # LoRA under a bottleneck adapter
    prompts = ["5 9 13 4 7", "22 3", "8 8 30 2 41 17 6", "11", "60 61 62 63 64"]
    rows = [(prompts[i % len(prompts)], name) for i, name in enumerate([*names, fusion, stack])]
    assert all(model.per_position(name) for _, name in rows)

    def reference(prompt: str, name) -> list[int]:
        return _greedy_alone(model, model.setup_named(name), [int(t) for t in prompt.split()], 5)

    calls = []
    hook = model.base_model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]), with_kwargs=True)
    together = answer_rows(model, _Numbers(), [Continuation(p, False, 5, 0.0, torch.Generator(), model.setup_named(n))
                                             for p, n in rows], set())
    hook.remove()
    assert calls == [7, 1, 1, 1, 1]  # the padded prompts once, then one token per row per step
    for (prompt, name), text in zip(rows, together, strict=True):
        assert [int(t) for t in text.split()] == reference(prompt, name), name
    assert len({tuple(reference(prompts[0], n)) for n in names}) > 2  # the adapters write different tokens


def test_logits_to_keep_gives_the_last_positions_logits(perturb) -> None:
    """What generation asks for: the LM head on the last position only, equal to that position of
    all the logits, for the active adapter and for per-row adapters."""
    model = _causal_model(["lora", "seq_bn[inv_adapter=nice]"], perturb)
    ids, mask = _padded(rows=4, length=7)
    ids = ids % 60
    with torch.no_grad():
        model.set_active_adapters("a1")
        full = model(input_ids=ids, attention_mask=mask).logits
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        assert last.shape == (4, 1, full.shape[-1])
        torch.testing.assert_close(last, full[:, -1:])
        names = ["a0", "a1", "a1", "a0"]
        full = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        last = model(input_ids=ids, attention_mask=mask, adapter_names=names, logits_to_keep=1).logits
        torch.testing.assert_close(last, full[:, -1:])


def test_causal_lm_heads_of_a_mixed_batch_project_once(perturb) -> None:
    """Every adapter's causal-LM head is the tied input embeddings: a mixed batch projects onto the
    vocabulary once for all its rows (one read of the largest matrix), and each row's logits still
    equal its adapter's alone; heads with weights of their own stay apart."""
    model = _causal_model(["lora", "seq_bn", "ia3"], perturb)
    calls = []
    for name in ("a0", "a1", "a2"):
        model.heads[name][-1].register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    ids, mask = _padded(rows=6, length=7)
    ids = ids % 60
    names = ["a0", "a1", "a2", "a2", "a0", "a1"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        assert calls == [6]
        for name in ("a0", "a1", "a2"):
            model.set_active_adapters(name)
            alone = model(input_ids=ids, attention_mask=mask).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone[rows], atol=1e-5, rtol=1e-4)
    classifier, _ = _model("bert", ["lora", "seq_bn"], perturb, labels=[3, 3])
    assert not classifier.heads["a0"].same_as(classifier.heads["a1"])  # their own weights


@pytest.mark.parametrize("config", ["loreft", "seq_bn[use_gating=true]", "lora[use_gating=true]"])
def test_answer_rows_read_the_whole_text_again_for_adapters_that_read_the_sequence(config: str, perturb) -> None:
    """ReFT (positions counted from the end) and gated adapters (a gate averaged over the sequence)
    write what they write only when each step reads the whole text: answer_rows keeps no cache
    for them, alone or beside an adapter that could."""
    from adaptercli.inference import Continuation, answer_rows

    model = _causal_model([config, "lora"], perturb)
    assert not model.per_position("a0") and model.per_position("a1")
    prompts, names = ["5 9 13 4 7", "22 3"], ["a0", "a1"]
    rows = [Continuation(p, False, 6, 0.0, torch.Generator(), model.setup_named(n)) for p, n in zip(prompts, names, strict=True)]
    together = answer_rows(model, _Numbers(), rows, set())
    alone = answer_rows(model, _Numbers(), rows[:1], set())
    expected = [_greedy_alone(model, n, [int(t) for t in p.split()], 6) for p, n in zip(prompts, names, strict=True)]
    assert [[int(t) for t in text.split()] for text in together] == expected
    assert [int(t) for t in alone[0].split()] == expected[0]
    ids = torch.tensor([[5, 9, 13, 4, 7], [0, 0, 0, 22, 3]])  # the library's generate: the same
    new = model.generate(ids, (ids > 0).long(), adapter_names=names, max_new_tokens=6)
    assert new.tolist() == expected


def test_seq2seq_generate_rows_equal_each_adapter_alone(perturb) -> None:
    from test_seq2seq import tiny_t5

    model = tiny_t5()
    for i, config in enumerate(["lora", "seq_bn", "prefix_tuning[prefix_length=3,bottleneck_size=8]"]):
        model.add_adapter(f"a{i}", config)
        perturb(model, f"a{i}", scale=0.5, seed=i)
    ids, mask = _padded(rows=4, length=7)
    ids = ids % 60
    per_row = ["a2", "a0", "a1", "a2"]
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=per_row, max_new_tokens=5, do_sample=False)
    alone = {}
    for name in ("a0", "a1", "a2"):
        model.set_active_adapters(name)
        alone[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, name in enumerate(per_row):
        assert mixed[row].tolist() == alone[name][row].tolist(), (row, name)
    assert len({tuple(alone[n][0].tolist()) for n in alone}) > 1  # the adapters write different tokens
    with pytest.raises(AdapterError, match="one sequence per row"):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=per_row, num_beams=2)
