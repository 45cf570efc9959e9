"""Composition blocks: outputs equal AdapterHub `adapters` 1.3.0's (fixtures from
scripts/make_fusion_fixtures.py), Parallel/BatchSplit rows equal each adapter alone, Average is
the weighted sum it says, and unsupported blocks are refused with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import batch, tiny_model
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli
from adaptercli import Average, BatchSplit, CompositionError, Fuse, Parallel, Split, Stack
from adaptercli.composition import CompositionBlock, parse, run
from adaptercli.methods.lora import LayerComposer, LoRA, LoRAConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/composition"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"] if c["status"] == "ok"}


def _reference_model(attn: str):
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / MANIFEST["model_dir"], attn_implementation=attn).eval())
    for info in MANIFEST["adapters"].values():
        model.load_adapter(ROOT / info["dir"])
    model.load_adapter_fusion(FIXTURES / "fusion/fuse_dynamic")
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def reference_model(request):
    return _reference_model(request.param)


def _forward(model, setup, io) -> torch.Tensor:
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state


def _close_on_tokens(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    keep = mask.repeat(actual.shape[0] // mask.shape[0], 1).bool()
    diff = (actual - expected)[keep].abs().max().item()
    assert diff <= atol, f"max abs difference on real tokens {diff:.2e} > {atol:.0e}"


# Blocks whose output is AdapterHub's, as it computes them (Fuse cases: see test_fusion.py).
EXACT = ["stack_seq_bn", "stack_seq_bn_lora", "stack_prefix", "parallel_seq_bn", "batchsplit_seq_bn",
         "batchsplit_lora", "split_seq_bn", "fuse_dynamic", "stack_fuse"]


@pytest.mark.parametrize("case", EXACT)
def test_outputs_equal_adapterhub(reference_model, case: str) -> None:
    io = load_file(ROOT / CASES[case]["io"])
    out = _forward(reference_model, CompositionBlock.from_dict(CASES[case]["setup"]), io)
    _close_on_tokens(out, io["expected"], io["attention_mask"])
    assert (out - io["bare"].repeat(out.shape[0] // 2, 1, 1)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["average_seq_bn", "average_lora"])
def test_average_is_the_weighted_sum_adapterhub_divides_by_n(reference_model, case: str) -> None:
    """AdapterHub 1.3.0 averages with ``mean(w_i * out_i)``: its output is ours with the weights
    divided by the number of children (and not normalised again)."""
    io = load_file(ROOT / CASES[case]["io"])
    setup = CompositionBlock.from_dict(CASES[case]["setup"])
    n = len(setup.children)
    theirs = Average(*setup.children, weights=[w / n for w in setup.weights], normalize_weights=False)
    _close_on_tokens(_forward(reference_model, theirs, io), io["expected"], io["attention_mask"])
    ours = _forward(reference_model, setup, io)
    assert (ours - io["expected"]).abs().max() > 1e-3  # the weighted average proper is not AdapterHub's


def test_parallel_prefix_rows_equal_each_prefix_alone(reference_model) -> None:
    """Prefixes of different lengths: each group equals that prefix alone in AdapterHub. (AdapterHub's
    own Parallel attends to the padding of the shorter prefix: ``max_diff_to_alone`` in the manifest.)"""
    case = next(c for c in MANIFEST["cases"] if c["name"] == "parallel_prefix")
    alone = load_file(FIXTURES / "io/alone.safetensors")
    out = _forward(reference_model, Parallel("pre_a", "pre_b"), alone)
    expected = torch.cat([alone["expected_pre_a"], alone["expected_pre_b"]])
    _close_on_tokens(out, expected, alone["attention_mask"])
    _close_on_tokens(out[:2], load_file(ROOT / case["io"])["expected"][:2], alone["attention_mask"])


def test_parallel_lora_rows_equal_adapterhub_single_adapters(reference_model) -> None:
    """AdapterHub 1.3.0 fails on Parallel LoRA in BERT (manifest: skipped); each group equals its
    single-adapter output."""
    alone = load_file(FIXTURES / "io/alone.safetensors")
    out = _forward(reference_model, Parallel("lora_a", "lora_b", "bn_c"), alone)
    expected = torch.cat([alone["expected_lora_a"], alone["expected_lora_b"], alone["expected_bn_c"]])
    _close_on_tokens(out, expected, alone["attention_mask"])


# -- row for row: Parallel and BatchSplit equal each child alone -----------------------------------
SETUPS = {
    "bottleneck": (["seq_bn", "par_bn", "double_seq_bn"], None),
    "lora_ia3": (["lora", "ia3", "lora[r=4,alpha=16]"], None),
    "prefix": (["prefix_tuning[prefix_length=4,bottleneck_size=8]", "prefix_tuning[prefix_length=2,bottleneck_size=8]"], None),
    "mixed": (["seq_bn", "lora", "prefix_tuning[prefix_length=3,bottleneck_size=8]"], None),
}


def _model_with(model_type: str, configs: list[str], perturb, head: bool = False):
    model = adaptercli.AdapterModel(tiny_model(model_type, attn="sdpa")) if head else adaptercli.init(tiny_model(model_type, attn="sdpa"))
    names = []
    for i, config in enumerate(configs):
        name = f"a{i}"
        model.add_adapter(name, config)
        perturb(model, name, seed=i)
        if head:
            model.add_classification_head(name, num_labels=3)
        names.append(name)
    return model.eval(), names


def _outputs(model, setup, ids, mask):
    model.set_active_adapters(setup)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("family", list(SETUPS))
def test_parallel_and_batchsplit_rows_equal_each_adapter_alone(model_type: str, family: str, perturb) -> None:
    model, names = _model_with(model_type, SETUPS[family][0], perturb)
    ids, mask = batch(length=7)
    alone = {n: _outputs(model, n, ids, mask).last_hidden_state for n in names}
    parallel = _outputs(model, Parallel(*names), ids, mask).last_hidden_state
    _close_on_tokens(parallel, torch.cat([alone[n] for n in names]), mask, atol=1e-5)
    # BatchSplit over 4 rows: a0 gets rows 0-1, a1 row 2, a2 (or a0) row 3
    ids4, mask4 = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])
    alone4 = {n: _outputs(model, n, ids4, mask4).last_hidden_state for n in names}
    order = [names[0], names[0], names[1], names[-1]]
    split = _outputs(model, BatchSplit(names[0], names[1], names[-1], batch_sizes=[2, 1, 1]), ids4, mask4)
    expected = torch.stack([alone4[n][i] for i, n in enumerate(order)])
    _close_on_tokens(split.last_hidden_state, expected, mask4, atol=1e-5)
    assert (alone[names[0]] - alone[names[1]]).abs().max() > 1e-3  # the adapters differ


def test_nested_parallel_rows_equal_each_child_alone(perturb) -> None:
    model, names = _model_with("bert", ["seq_bn", "lora", "seq_bn"], perturb)
    ids, mask = batch()
    stacked = _outputs(model, Stack("a0", "a1"), ids, mask).last_hidden_state
    averaged = _outputs(model, Average("a0", "a2", weights=[0.2, 0.8]), ids, mask).last_hidden_state
    out = _outputs(model, Parallel(Stack("a0", "a1"), Average("a0", "a2", weights=[0.2, 0.8])), ids, mask)
    _close_on_tokens(out.last_hidden_state, torch.cat([stacked, averaged]), mask, atol=1e-5)


def test_parallel_gives_one_head_output_per_adapter(perturb) -> None:
    model, names = _model_with("bert", ["seq_bn", "lora"], perturb, head=True)
    ids, mask = batch()
    labels = torch.tensor([0, 2])
    alone = [_outputs(model, n, ids, mask) for n in names]
    model.set_active_adapters(Parallel(*names))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out, adaptercli.MultiHeadOutput) and len(out) == 2
    for got, want, name in zip(out, alone, names, strict=True):
        assert torch.allclose(got.logits, want.logits, atol=1e-5), name
    first, second = out  # unpacks like AdapterHub's MultiHeadOutput
    loss = torch.nn.functional.cross_entropy(first.logits, labels) + torch.nn.functional.cross_entropy(second.logits, labels)
    assert torch.allclose(out.loss, loss)
    split = _outputs(model, BatchSplit(*names, batch_sizes=[1, 1]), ids, mask)
    assert torch.allclose(split[0].logits, alone[0].logits[:1], atol=1e-5)
    assert torch.allclose(split[1].logits, alone[1].logits[1:], atol=1e-5)


# -- Average, Split, Stack semantics ------------------------------------------------------------------
@pytest.mark.parametrize("config", ["seq_bn", "lora", "ia3"])
def test_average_is_a_weighted_average(config: str, perturb) -> None:
    model, names = _model_with("bert", [config, config], perturb)
    ids, mask = batch()
    a0 = _outputs(model, "a0", ids, mask).last_hidden_state
    same = _outputs(model, Average("a0", "a0", weights=[0.3, 0.7]), ids, mask).last_hidden_state
    only_first = _outputs(model, Average("a0", "a1", weights=[1.0, 0.0]), ids, mask).last_hidden_state
    assert torch.allclose(same, a0, atol=1e-5) and torch.allclose(only_first, a0, atol=1e-5)
    mixed = _outputs(model, Average("a0", "a1", weights=[3, 1]), ids, mask).last_hidden_state
    assert (mixed - a0).abs().max() > 1e-4


def test_lora_average_equals_the_svd_merge_of_the_deltas(perturb) -> None:
    """Average of LoRA adapters = one adapter whose delta is the weighted sum of theirs, which
    ``average_adapter(..., "lora_delta_w_svd")`` builds exactly at full rank (2 x r = 16)."""
    model, names = _model_with("bert", ["lora", "lora"], perturb)
    ids, mask = batch()
    want = _outputs(model, Average("a0", "a1", weights=[0.25, 0.75]), ids, mask).last_hidden_state
    model.average_adapter("svd", ["a0", "a1"], weights=[0.25, 0.75], combine_strategy="lora_delta_w_svd", svd_rank=16)
    got = _outputs(model, "svd", ids, mask).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    model.average_adapter("svd4", ["a0", "a1"], weights=[0.25, 0.75], combine_strategy="lora_delta_w_svd", svd_rank=4)
    low = _outputs(model, "svd4", ids, mask).last_hidden_state
    bare = _outputs(model, None, ids, mask).last_hidden_state
    assert 1e-6 < (low - want).abs().max() < (want - bare).abs().max()  # rank 4: close, not exact
    assert model.adapter_state.adapters["svd4"].config.r == 4


def test_average_adapter_linear_averages_the_weights(perturb) -> None:
    model, names = _model_with("bert", ["seq_bn_inv", "seq_bn_inv"], perturb)
    model.average_adapter("avg", ["a0", "a1"], weights=[1, 3])
    state = model.adapter_state
    for key, value in state.adapter_parameters("avg").items():
        a0 = state.adapter_parameters("a0")[key.replace(".avg.", ".a0.")]
        a1 = state.adapter_parameters("a1")[key.replace(".avg.", ".a1.")]
        assert torch.allclose(value, 0.25 * a0 + 0.75 * a1), key
    model.add_adapter("other", "seq_bn[reduction_factor=8]")
    with pytest.raises(adaptercli.AdapterCliError, match="same config"):
        model.average_adapter("bad", ["a0", "other"])
    with pytest.raises(adaptercli.AdapterCliError, match="works with LoRA"):
        model.average_adapter("bad", ["a0", "a1"], combine_strategy="lora_delta_w_svd", svd_rank=2)
    assert "bad" not in state.adapters


def test_split_runs_each_child_on_its_positions() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    loras = torch.nn.ModuleDict({n: LoRA(6, 5, LoRAConfig(r=2, init_weights="bert")) for n in ("a", "b")})
    x = torch.randn(2, 7, 6)
    y = linear(x)
    split = run(Split("a", "b", splits=[3, 4]), (x, y), LayerComposer(loras, set()))[1]
    want = torch.cat([loras["a"].apply(x[:, :3], y[:, :3]), loras["b"].apply(x[:, 3:], y[:, 3:])], dim=1)
    assert torch.allclose(split, want)
    with pytest.raises(CompositionError, match="add up to 5, but the sequence has 7"):
        run(Split("a", "b", splits=[2, 3]), (x, y), LayerComposer(loras, set()))


def test_stack_of_lora_adds_the_deltas(perturb) -> None:
    """Our Stack adds LoRA deltas (AdapterHub 1.3.0 feeds the second LoRA the first one's delta)."""
    model, names = _model_with("bert", ["lora", "lora"], perturb)
    ids, mask = batch()
    stacked = _outputs(model, Stack("a0", "a1"), ids, mask).last_hidden_state
    model.merge_adapter("a0")
    model.merge_adapter("a1")
    merged = _outputs(model, Stack("a0", "a1"), ids, mask).last_hidden_state
    assert torch.allclose(stacked, merged, atol=1e-5)


# -- parsing and refusals ---------------------------------------------------------------------------
def test_list_shorthand_and_serialised_form() -> None:
    assert parse([["a", "b"], "c"]) == Stack(Fuse("a", "b"), "c")
    assert parse("a") == Stack("a") and parse(["a", "b"]) == Stack("a", "b") and parse(None) is None
    block = Stack("x", Parallel("a", Average("b", "c", weights=[1, 3])), BatchSplit("d", "e", batch_sizes=[1, 2]))
    assert CompositionBlock.from_dict(block.to_dict()) == block
    assert block.parallel_channels == 2 and block.first() == "x" and block.last() == "e"


@pytest.mark.parametrize("setup, message", [
    (Parallel(Parallel("a", "b"), "c"), "cannot nest Parallel inside Parallel: it may hold adapter names, Stack, BatchSplit, Average"),
    (Stack(Stack("a"), "b"), "cannot nest Stack inside Stack"),
    (Parallel(Average(Split("a", "b", splits=2), "c")), r"cannot nest Split inside Average \(itself nested\)"),
    (Fuse(Stack("a", Average("b", "c")), "d"), r"cannot nest Average inside Stack \(itself nested\): it may hold adapter names"),
])
def test_bad_nesting_is_refused(setup, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        parse(setup)


def test_sizes_must_fit() -> None:
    with pytest.raises(CompositionError, match="one batch size"):
        BatchSplit("a", "b", batch_sizes=[1, 2, 3])
    with pytest.raises(CompositionError, match="2 children but 3 weights"):
        Average("a", "b", weights=[1, 2, 3])


@pytest.fixture
def mixed_model(perturb):
    model, _ = _model_with("bert", ["seq_bn", "lora", "prefix_tuning[prefix_length=2,bottleneck_size=8]", "ia3"], perturb)
    return model


@pytest.mark.parametrize("setup, message", [
    (Fuse("a1", "a3"), r"Fuse does not work with lora adapters \('a1'\): Fuse runs bottleneck adapters; "
                       "lora adapters run in Stack, Parallel, BatchSplit, Average, Split"),
    (Average("a2", "a2"), r"Average does not work with prefix_tuning adapters \('a2'\): Average runs bottleneck "
                          "and lora adapters; prefix_tuning adapters run in Stack, Parallel, BatchSplit"),
    (Split("a0", "a2", splits=[4, 5]), r"Split does not work with prefix_tuning adapters"),
    (Average("a0", "a1"), r"Average combines adapters of one method family only; got 'a0' \(seq_bn\), 'a1' \(lora\)"),
    (Parallel("a0", "nope"), "no adapter named 'nope'"),
])
def test_unsupported_blocks_are_refused_with_one_error(mixed_model, setup, message: str) -> None:
    mixed_model.set_active_adapters("a0")
    with pytest.raises(CompositionError if "nope" not in message else adaptercli.AdapterCliError, match=message):
        mixed_model.set_active_adapters(setup)
    assert mixed_model.active_adapters == Stack("a0")  # the refused setup changed nothing


def test_run_time_size_errors(mixed_model) -> None:
    ids, mask = batch()
    mixed_model.set_active_adapters(BatchSplit("a0", "a1", batch_sizes=[1, 2]))
    with pytest.raises(CompositionError, match=r"batch_sizes \[1, 2\] add up to 3, but the batch has 2 rows"):
        mixed_model(input_ids=ids, attention_mask=mask)


def test_merged_adapters_run_only_in_a_plain_stack(mixed_model) -> None:
    mixed_model.merge_adapter("a1")
    with pytest.raises(adaptercli.AdapterCliError, match="merged into the weights.*unmerge_adapter"):
        mixed_model.set_active_adapters(Parallel("a0", "a1"))
    mixed_model.set_active_adapters(Stack("a0", "a1"))
