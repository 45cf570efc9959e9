"""Gradient checkpointing (``train.gradient_checkpointing: true``): the adapter's gradients with
checkpointing equal those without it — every method on BERT and Llama, the bottleneck, LoRA and
prefix-tuning families on every other architecture in the table — and the layers do run again."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import adaptercli
from adaptercli.methods import METHODS, ConfigError
from tests.conftest import CONFIGS, batch, tiny_model

# Every method on an encoder and a decoder; the three families on every other architecture.
CASES = [(arch, method) for arch in ("bert", "llama") for method in METHODS] + [
    (arch, method) for arch in CONFIGS if arch not in ("bert", "llama") for method in ("seq_bn", "lora", "prefix_tuning")]


def _gradients(model, name: str, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both runs
    hidden = model(input_ids=ids, attention_mask=mask)[0]  # (prompt tuning makes it longer than ids)
    hidden.pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in model.adapter_state.adapter_parameters(name).items() if p.grad is not None}


@pytest.mark.parametrize("arch,method", CASES)
def test_checkpointing_gives_the_same_gradients(arch: str, method: str, perturb) -> None:
    model = adaptercli.init(tiny_model(arch))
    try:
        model.add_adapter("a", method)
    except ConfigError as error:  # e.g. a PHM width that 32 hidden units cannot divide
        pytest.skip(f"{method} on a 32-wide model: {error}")
    perturb(model, "a", scale=0.1)  # LoRA's B and IA3's scales start at 0 / 1: move them off
    model.train_adapter("a")
    ids, mask = batch(length=9)
    plain = _gradients(model, "a", ids, mask)
    model.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = _gradients(model, "a", ids, mask)
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpointing_recomputes_inside_the_layers(perturb) -> None:
    """The layers' forward runs again in the backward pass (what saves the memory)."""
    model = adaptercli.init(tiny_model("llama"))
    model.add_adapter("a", "seq_bn")
    model.train_adapter("a")
    model.enable_gradient_checkpointing()
    calls = []  # a pre-hook: recomputation stops (mid-module) once it has what the backward pass needs
    model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids, mask = batch()
    _gradients(model, "a", ids, mask)
    assert len(calls) == 2


def test_recipe_switch_trains_the_same_adapter(tmp_path, tiny_bert_dir, sentiment_csv) -> None:
    """`train.gradient_checkpointing: true` from a recipe: same adapter (dropout included: the
    recomputation replays the random state)."""
    from rich.console import Console

    from adaptercli.recipe import load_recipe
    from adaptercli.train import train
    from tests.conftest import write_recipe

    adapters = []
    for switch in (False, True):
        recipe = write_recipe(tmp_path / str(switch), tiny_bert_dir, sentiment_csv, max_steps=3, eval_steps=3,
                              save_steps=3, gradient_checkpointing=switch)
        train(load_recipe(recipe), console=Console(quiet=True))
        adapters.append(load_file(tmp_path / str(switch) / "run/adapter/adapter.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=1e-5, atol=1e-6, msg=key)
