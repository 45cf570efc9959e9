"""Stack order and membership: ``Stack("a", "b")`` equals the two adapters composed by hand,
a then b, on a bare copy of the model (forward hooks written here from the adapters' formulas and
weights), and differs from b then a and from either adapter alone.

Hand composition on BERT's FFN sub-layer, ``BertOutput(x, r) = LN(h + r)`` with
``h = dropout(dense(x))``: each stacked seq_bn adapter ``f`` turns ``h`` into ``f(LN(h + r)) + h``,
in stack order, and the layer returns ``LN(h + r)``; each LoRA adds ``scaling * B A x`` to its
projection's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_model

import adaptercli


def _adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in model.adapter_state.adapter_parameters(name).items()}


def _bottleneck_hooks(bare, weights: list[dict[str, torch.Tensor]], names: list[str]) -> list:
    """Run the seq_bn adapters ``names`` (in this order) after each layer's FFN of ``bare``."""
    handles = []
    for i, layer in enumerate(bare.encoder.layer):
        def f(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, i: int = i) -> torch.Tensor:
            key = f"encoder.layer.{i}.output.adapters.{name}."
            down = F.relu(F.linear(x, w[key + "adapter_down.0.weight"], w[key + "adapter_down.0.bias"]))
            return F.linear(down, w[key + "adapter_up.weight"], w[key + "adapter_up.bias"])

        def hook(module, args, kwargs, output, f=f):
            x = args[0] if args else kwargs["hidden_states"]
            r = args[1] if len(args) > 1 else kwargs["input_tensor"]
            h = module.dropout(module.dense(x))
            for w, name in zip(weights, names, strict=True):
                h = f(module.LayerNorm(h + r), w, name) + h
            return module.LayerNorm(h + r)

        handles.append(layer.output.register_forward_hook(hook, with_kwargs=True))
    return handles


def _lora_hooks(bare, weights: dict[str, torch.Tensor], name: str, scaling: float) -> list:
    """Add ``scaling * B A x`` to every projection that LoRA adapter ``name`` holds weights for."""
    handles = []
    for module_name, module in bare.named_modules():
        key = f"{module_name}.loras.{name}."
        if key + "lora_A" in weights:
            a, b = weights[key + "lora_A"], weights[key + "lora_B"]
            handles.append(module.register_forward_hook(
                lambda m, args, out, a=a, b=b: out + scaling * F.linear(F.linear(args[0], a), b)))
    return handles


def _output(model) -> torch.Tensor:
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _by_hand(bare, install) -> torch.Tensor:
    handles = install()
    try:
        return _output(bare)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def two_bottlenecks(perturb):
    model = adaptercli.init(tiny_model("bert"))
    for name in ("a", "b"):
        model.add_adapter(name, "seq_bn")
        perturb(model, name, scale=0.5, seed=ord(name))
    return model


def test_stack_runs_a_then_b(two_bottlenecks) -> None:
    model, bare = two_bottlenecks, tiny_model("bert")  # same seed: the same backbone weights
    w = {name: _adapter(model, name) for name in ("a", "b")}
    by_hand = {order: _by_hand(bare, lambda order=order: _bottleneck_hooks(bare, [w[n] for n in order], list(order)))
               for order in (("a",), ("b",), ("a", "b"), ("b", "a"))}

    model.set_active_adapters("a")
    assert torch.allclose(_output(model), by_hand["a",], atol=1e-5)  # the hand formula is seq_bn's
    model.set_active_adapters(adaptercli.Stack("a", "b"))
    stacked = _output(model)
    assert torch.allclose(stacked, by_hand["a", "b"], atol=1e-5)
    for other in (("b", "a"), ("a",), ("b",)):
        assert (stacked - by_hand[other]).abs().max() > 1e-3, f"Stack(a, b) behaves like {other}"
    model.set_active_adapters(adaptercli.Stack("b", "a"))
    assert torch.allclose(_output(model), by_hand["b", "a"], atol=1e-5)


def test_stack_across_families_runs_every_member(perturb) -> None:
    model, bare = adaptercli.init(tiny_model("bert")), tiny_model("bert")
    model.add_adapter("low", "lora[r=4,alpha=8]")
    model.add_adapter("mid", "lora[r=2,alpha=8,attn_matrices=[q,k]]")
    model.add_adapter("top", "seq_bn")
    for seed, name in enumerate(("low", "mid", "top")):
        perturb(model, name, scale=0.3, seed=seed)
    w = {name: _adapter(model, name) for name in ("low", "mid", "top")}
    install = {
        "low": lambda: _lora_hooks(bare, w["low"], "low", 8 / 4),
        "mid": lambda: _lora_hooks(bare, w["mid"], "mid", 8 / 2),
        "top": lambda: _bottleneck_hooks(bare, [w["top"]], ["top"]),
    }

    model.set_active_adapters(adaptercli.Stack("low", "mid", "top"))
    stacked = _output(model)
    assert torch.allclose(stacked, _by_hand(bare, lambda: sum((f() for f in install.values()), [])), atol=1e-5)
    for left_out in install:
        others = [f for name, f in install.items() if name != left_out]
        without = _by_hand(bare, lambda others=others: sum((f() for f in others), []))
        assert (stacked - without).abs().max() > 1e-3, f"Stack(low, mid, top) does not run {left_out}"
