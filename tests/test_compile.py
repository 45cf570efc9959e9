"""``train.compile: true`` runs the adapted model through torch.compile (via Accelerate's dynamo
backend): the same recipe trains to the same adapter as eager, within floating-point reordering,
and the saved adapter is the plain module's (no ``_orig_mod.`` prefixes). The eager run comes first
in the same process: the compiled one must not inherit its Accelerate settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, batch, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModel

import adaptercli
from adaptercli import train as train_module
from adaptercli.model import AutoAdapterModel
from adaptercli.recipe import load_recipe


@pytest.mark.parametrize("method", ["lora", pytest.param("seq_bn", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager(method: str, tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    # dropout off (model and head): eager and compiled code draw their dropout masks differently
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / f"compile-{compiled}"
        recipe = write_recipe(folder, model, sentiment_csv, method=method, max_steps=4, save_steps=4,
                              eval_steps=4, compile=compiled, learning_rate=1e-2)
        counters.clear()
        train_module.train(load_recipe(recipe, ["head.dropout=0"]), console=Console(quiet=True))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo really compiled it (or not)
        runs[compiled] = folder / "run"
    eager, compiled = (load_file(runs[c] / "adapter" / "adapter.safetensors") for c in (False, True))
    assert eager.keys() == compiled.keys()
    assert not any("_orig_mod" in k for k in compiled)
    start = load_file(runs[False] / "checkpoints" / "step-4" / "trainable.safetensors")
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in start.values())
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-4)
    losses = [[json.loads(line).get("loss") for line in (runs[c] / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for c in (False, True)]
    assert losses[0] and len(losses[0]) == len(losses[1])
    for a, b in zip(*losses, strict=True):
        assert b == pytest.approx(a, abs=1e-4)


# -- graph breaks and recompiles (torch._dynamo.explain traces without compiling: seconds each) --------

CORE = ["seq_bn", "lora", "prefix_tuning", "ia3", "dora"]
ON = {"bert": dict(CONFIGS["bert"]), "llama": dict(CONFIGS["llama"])}


def _some_slow(cases: list[tuple[str, str]], fast: set[tuple[str, str]]) -> list:
    """Dynamo takes seconds per trace on a small CPU: `make test` runs the ``fast`` cases, `make repro` all."""
    return [c if c in fast else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


def _adapted(arch: str, methods: dict[str, str], heads: bool):
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **ON[arch])
    if heads:
        model = AutoAdapterModel.from_config(config, attn_implementation="sdpa")
    else:
        model = adaptercli.init(AutoModel.from_config(config, attn_implementation="sdpa"))
    for name, method in methods.items():
        model.add_adapter(name, method)
        if heads:
            model.add_classification_head(name, num_labels=2)
    return model


@pytest.mark.parametrize("arch,method", _some_slow([(a, m) for a in ("bert", "llama") for m in CORE], {
    ("bert", "seq_bn"), ("bert", "prefix_tuning"), ("llama", "lora"), ("llama", "dora")}))
def test_an_adapted_model_compiles_to_one_graph(arch: str, method: str) -> None:
    """The AdapterModel (what `train.compile` compiles) with an adapter and its head, in training
    mode with labels: one graph, no break."""
    model = _adapted(arch, {"a": method}, heads=True)
    model.train_adapter("a")
    ids, mask = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_hooks_on_the_compiled_module_itself_are_a_frame_of_their_own() -> None:
    """Compiling a transformers model given the adapter API (`adaptercli.init`, no AdapterModel
    around it): torch.compile runs the compiled module's own hooks outside the traced frame. Prefix
    tuning computes its prefixes in a pre-hook on that module, so they are a graph of their own
    (no break reason: a frame boundary, not a break in our code); prompt tuning, the unions and
    Parallel/Fuse setups hook there too. With dynamo's `wrap_top_frame` the hooks are traced in."""
    model = _adapted("bert", {"a": "prefix_tuning"}, heads=False)
    model.train_adapter("a")
    ids, mask = batch()
    counts = []
    for wrap in (False, True):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(wrap_top_frame=wrap):
            explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
        assert not explained.break_reasons
        counts.append(explained.graph_count)
    assert counts == [2, 1]


SWITCH = ["seq_bn", "seq_bn_inv", "lora", "ia3", "dora", "prefix_tuning", "unipelt", "noreft"]


@pytest.mark.parametrize("arch,method", _some_slow([("bert", m) for m in SWITCH] + [("llama", m) for m in CORE], {
    ("bert", "seq_bn_inv"), ("bert", "lora"), ("bert", "prefix_tuning"), ("llama", "ia3")}))
def test_switching_between_adapters_of_one_shape_does_not_recompile(arch: str, method: str, perturb) -> None:
    """Compiled once with adapter `a` (and its head) active, the AdapterModel runs `b` (same method,
    other weights, its own head) and `a` again without recompiling, and gives the eager outputs of
    each. (LoReFT is the exception: torch's orthogonal parametrisation gives every projection a
    class of its own, and the guards check the class.)"""
    model = _adapted(arch, {"a": method, "b": method}, heads=True).eval()
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ids, mask = batch()
    eager = {}
    for name in ("a", "b"):
        model.set_active_adapters(name)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        eager[name] = (out.hidden_states, out.logits)
    assert (eager["a"][0] - eager["b"][0]).abs().max() > 1e-3
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    for step, name in enumerate(("a", "b", "a")):
        model.set_active_adapters(name)
        with torch._dynamo.config.patch(error_on_recompile=step > 0), torch.no_grad():
            out = compiled(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close((out.hidden_states, out.logits), eager[name])
