"""Every tensor adaptercli makes takes its device and dtype from its inputs or its layer, shown
without a GPU: every method and every composition block runs forward and backward on the `meta`
device (model built there, inputs there; a stray CPU tensor fails the run) and under bf16 autocast
on the CPU, on an encoder (BERT) and a decoder (Llama); adapters, fusion layers and heads added to
a bf16 or fp16 model, or to layers on different devices, land in the dtype and on the device of
the layer they attach to.

What has no meta kernel: transformers' ``masking_utils._ignore_bidirectional_mask_sdpa`` (BERT-like
encoders, with eager attention too) and ``_ignore_causal_mask_sdpa`` (decoders with SDPA) read a
2D padding mask's values (``padding_mask.all()``, a ``.item()``) to decide whether building the 4D
mask can be skipped. The `meta` tests stub these two checks to "build it" (the `meta_masks`
fixture), so our mask handling runs with a padded mask there, and
``test_the_stubbed_mask_checks_change_no_output`` shows on the CPU that building the mask gives the
outputs that skipping it gives."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, batch
from transformers import AutoConfig, masking_utils

from adaptercli import Average, BatchSplit, Fuse, Parallel, Split, Stack
from adaptercli.methods import FAMILIES, METHODS
from adaptercli.model import AutoAdapterModel

ARCHS = ("bert", "llama")
# Tiny shapes some presets cannot take as they are: Compacter's PHM width must divide by phm_dim; a
# Llama's k and v are narrower than q (grouped KV heads), and VeRA's shared matrices need one shape.
TINY = {"compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4}}
ON_LLAMA = {"vera": {"attn_matrices": ["q"]}, "dvora": {"attn_matrices": ["q"]}}
# Prompt tuning joins encoders only (refused on decoders, as in AdapterHub).
CASES = [(arch, m) for arch in ARCHS for m in METHODS if not (arch == "llama" and m == "prompt_tuning")]
MODES = ("meta", "bf16-autocast")


def method_config(method: str, arch: str) -> dict:
    return {"method": method, **TINY.get(method, {}), **(ON_LLAMA.get(method, {}) if arch == "llama" else {})}


def build(arch: str, device: str = "cpu") -> torch.nn.Module:
    """A tiny AdapterModel built on ``device`` (on `meta`: no memory, no values)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoAdapterModel.from_config(AutoConfig.for_model(arch, **CONFIGS[arch]), attn_implementation="sdpa")


def inputs(device: str, rows: int = 2) -> dict[str, torch.Tensor]:
    """Token ids, a padded attention mask (the second row ends in padding) and labels."""
    ids, mask = batch()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.tensor([0, 1][:rows], device=device)}


@pytest.fixture
def meta_masks(monkeypatch):
    """Always build the 4D mask (see the module docstring): the skip checks read mask values."""
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)


def run_step(model, mode: str) -> torch.Tensor:
    """Forward (through the active head) and backward; returns the loss."""
    device = "meta" if mode == "meta" else "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
        out = model(**inputs(device))
        loss = out.loss if out.loss is not None else out.hidden_states.float().pow(2).mean()
    loss.backward()
    return loss


def check_gradients(model, mode: str, trained: dict[str, torch.nn.Parameter]) -> None:
    """Every trained tensor got a gradient of its own shape, device and dtype (finite under autocast)."""
    assert trained
    for key, p in trained.items():
        assert p.grad is not None, f"{key}: no gradient"
        assert (p.grad.shape, p.grad.device, p.grad.dtype) == (p.shape, p.device, p.dtype), key
        if mode == "meta":
            assert p.device.type == "meta", key
        else:
            assert torch.isfinite(p.grad).all(), key
    if mode != "meta":
        assert any(p.grad.abs().sum() > 0 for p in trained.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,method", CASES)
def test_every_method_trains_on_meta_and_in_bf16_autocast(arch: str, method: str, mode: str, meta_masks) -> None:
    model = build(arch, "meta" if mode == "meta" else "cpu")
    model.add_adapter("a", method_config(method, arch))
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    loss = run_step(model, mode)
    assert loss.device.type == ("meta" if mode == "meta" else "cpu")
    if mode != "meta":
        assert torch.isfinite(loss)
    trained = {k: p for k, p in model.adapter_state.adapter_parameters("a").items() if p.requires_grad}
    check_gradients(model, mode, trained)
    frozen = model.adapter_state.adapter_parameters("a").keys() - trained.keys()
    assert all(model.adapter_state.adapter_parameters("a")[k].grad is None for k in frozen)


def block_setups() -> list[tuple[str, str, str]]:
    """(family's method, block, arch) for every block each family says it runs (UniPELT for the unions:
    MAM's parallel adapter, stacked, leaves only the last adapter's output, as in AdapterHub)."""
    method_of = {"bottleneck": "seq_bn", "lora": "lora", "prefix_tuning": "prefix_tuning",
                 "prompt_tuning": "prompt_tuning", "reft": "loreft", "union": "unipelt"}
    assert method_of.keys() == FAMILIES.keys()
    return [(method_of[f], block, arch) for f, family in FAMILIES.items() for block in family.blocks for arch in ARCHS
            if (arch, method_of[f]) in CASES]


def make_block(block: str):
    return {"Stack": lambda: Stack("a", "b"), "Fuse": lambda: Fuse("a", "b"), "Parallel": lambda: Parallel("a", "b"),
            "BatchSplit": lambda: BatchSplit("a", "b", batch_sizes=[1, 1]),
            "Average": lambda: Average("a", "b", weights=[0.3, 0.7]),
            "Split": lambda: Split("a", "b", splits=[4, 5])}[block]()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method,block,arch", block_setups())
def test_every_composition_block_trains_on_meta_and_in_bf16_autocast(method: str, block: str, arch: str, mode: str,
                                                                     meta_masks) -> None:
    """Two adapters of one family in each block it runs; fusion layers (Fuse) and one head per
    row group (Parallel, BatchSplit) included."""
    model = build(arch, "meta" if mode == "meta" else "cpu")
    for name in ("a", "b"):
        model.add_adapter(name, method_config(method, arch))
        model.add_classification_head(name, num_labels=2)
    setup = make_block(block)
    if block == "Fuse":
        model.add_adapter_fusion(setup)
        model.add_classification_head("a,b", num_labels=2)
        model.train_adapter_fusion(setup)
        trained = {k: p for k, p in model.adapter_state.fusion_parameters("a,b").items()}
    else:
        model.train_adapter(setup)
        trained = {k: p for n in "ab" for k, p in model.adapter_state.adapter_parameters(n).items() if p.requires_grad}
    run_step(model, mode)
    if method == "prompt_tuning":  # as AdapterHub: a Stack of prompts runs the first one only
        trained = {k: p for k, p in trained.items() if ".a." in k}
    check_gradients(model, mode, trained)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_stubbed_mask_checks_change_no_output(arch: str, monkeypatch) -> None:
    """Building the 4D mask where transformers would skip it (what `meta_masks` forces) gives the
    same outputs, with padding and without: the meta runs take the path a real run computes."""
    model = build(arch).eval()
    model.add_adapter("a", "prefix_tuning", set_active=True)
    ids, mask = batch()
    with torch.no_grad():
        skipped = [model(input_ids=ids, attention_mask=m).hidden_states for m in (mask, torch.ones_like(mask))]
        monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)
        monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
        built = [model(input_ids=ids, attention_mask=m).hidden_states for m in (mask, torch.ones_like(mask))]
    keep = mask.bool()
    torch.testing.assert_close(built[0][keep], skipped[0][keep])
    torch.testing.assert_close(built[1], skipped[1])


def test_a_padding_mask_on_meta_needs_the_stub() -> None:
    """Pins what has no meta kernel: without the stub, transformers' mask code reads the padding
    mask's values (``Tensor.item()``) and fails on `meta`. When this starts passing, the
    `meta_masks` stub can go."""
    model = build("bert", "meta")
    ids = torch.zeros(2, 9, dtype=torch.long, device="meta")
    model(input_ids=ids)  # without a mask there is nothing to read
    with pytest.raises(RuntimeError, match="meta"):
        model(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long, device="meta"))


def expected_dtype(key: str, layer_dtype: torch.dtype) -> torch.dtype:
    """LoReFT's orthogonal projection stays fp32 on any layer: torch's ``householder_product``,
    which its parametrisation calls, has no bf16 or fp16 kernel."""
    return torch.float32 if ".projection.parametrizations." in key else layer_dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch,method", CASES)
def test_adapters_take_the_dtype_of_a_half_precision_model(arch: str, method: str, dtype: torch.dtype) -> None:
    """Adapter and head in the model's dtype; a forward and backward in it run, gradients finite."""
    model = build(arch).to(dtype)
    model.add_adapter("a", method_config(method, arch))
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    params = model.adapter_state.adapter_parameters("a")
    assert {k: p.dtype for k, p in params.items()} == {k: expected_dtype(k, dtype) for k in params}
    assert {p.dtype for p in model.heads["a"].parameters()} == {dtype}
    out = model(**inputs("cpu"))
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    check_gradients(model, "cpu", {k: p for k, p in params.items() if p.requires_grad})


def test_each_adapter_lands_on_the_device_and_dtype_of_its_layer() -> None:
    """A model whose second layer sits elsewhere (on `meta`, in fp16, as a layer on a second GPU
    would): the adapters, fusion layers and ReFT units of that layer follow it, the rest stay with
    the first layer (CPU, fp32); pools that belong to no layer go with the embeddings. (Not DoRA
    here: its magnitudes are read from the layer's weights, which `meta` does not hold.)"""
    model = build("bert")
    model.bert.encoder.layer[1].to("meta", torch.float16)
    for name, method in (("bn", "seq_bn"), ("bn2", "seq_bn"), ("lora", "lora"), ("prefix", "prefix_tuning"),
                         ("reft", "noreft"), ("union", "unipelt")):
        model.add_adapter(name, method)
    model.add_adapter_fusion(["bn", "bn2"])
    state = model.adapter_state
    tensors = {k: p for n in state.adapters for k, p in state.adapter_parameters(n).items()}
    tensors.update(state.fusion_parameters("bn,bn2"))
    assert any(k.startswith("encoder.layer.1.") for k in tensors) and any(k.startswith("encoder.layer.0.") for k in tensors)
    for key, p in tensors.items():
        where = ("meta", torch.float16) if key.startswith("encoder.layer.1.") else ("cpu", torch.float32)
        assert (p.device.type, p.dtype) == where, key
