"""The docs' support matrix (docs/support-matrix.md) is what the code does (scripts/support_matrix.py generates it from
the table, the registry and the fixtures), and every pair it marks as running does run on the
architectures that tests/test_methods.py does not build."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import support_matrix  # noqa: E402

from adaptercli.methods import METHODS  # noqa: E402


def test_support_matrix_page_is_current() -> None:
    text = support_matrix.PAGE.read_text()
    section = text[text.index(support_matrix.START): text.index(support_matrix.END) + len(support_matrix.END)]
    assert section == support_matrix.render(), "run scripts/support_matrix.py to update docs/support-matrix.md"


@pytest.mark.parametrize("model_type", [t for t in support_matrix.model_types() if t not in CONFIGS])
def test_every_accepted_method_changes_the_output_and_deactivates(model_type: str) -> None:
    model = support_matrix.tiny_model(model_type)
    ids, mask = batch()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type in ("vit", "clip_vision_model"):  # pixels: 4 patches + CLS, no padding
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
        mask = torch.ones(2, 5, dtype=torch.long)
    if model_type in ("bart", "mbart", "t5", "mt5", "whisper"):  # encoder-decoders: the decoder's output
        inputs["decoder_input_ids"] = ids[:, :6]
        mask = torch.ones(2, 6, dtype=torch.long)
    if model_type == "whisper":  # 8 mel bins x 16 frames
        inputs = {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)),
                  "decoder_input_ids": ids[:, :6]}
    with torch.no_grad():
        bare = model(**inputs).last_hidden_state
    accepted = [m for m, refusal in support_matrix.probe(model_type).items() if refusal is None]
    assert len(accepted) >= len(METHODS) - 8, accepted
    for method in accepted:
        model.add_adapter("a", method + support_matrix.TINY_SETTINGS.get(method, ""))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, p in model.adapter_state.adapter_parameters("a").items():
                # Not ReFT's orthogonal parametrisation: nudging its ±1 diagonal below 1 zeroes R.
                if ".parametrizations." not in key:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.set_active_adapters("a")
        with torch.no_grad():
            out = model(**inputs).last_hidden_state
        out = out[:, out.shape[1] - bare.shape[1]:]  # prompt tuning's positions come first
        assert torch.isfinite(out).all(), method
        assert (out - bare)[mask.bool()].abs().max() > 1e-4, method
        model.set_active_adapters(None)
        with torch.no_grad():
            assert torch.equal(model(**inputs).last_hidden_state, bare), method
        model.delete_adapter("a")


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text", "phi", "modernbert", "albert", "vit", "opt"])
def test_prefix_tuning_sdpa_equals_eager_where_adapterhub_has_no_reference(model_type: str) -> None:
    """AdapterHub refuses prefix tuning on its plugin-interface models; ours joins through the
    attention functions, so SDPA and eager agree (padding included)."""
    ids, mask = batch()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
        mask = torch.ones(2, 5, dtype=torch.long)
    outputs = []
    for attn in ("eager", "sdpa"):
        model = support_matrix.tiny_model(model_type, attn)
        model.add_adapter("p", "prefix_tuning[prefix_length=5,bottleneck_size=16]")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.adapter_state.adapter_parameters("p").values():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        model.set_active_adapters("p")
        with torch.no_grad():
            outputs.append(model(**inputs).last_hidden_state)
    assert (outputs[0] - outputs[1])[mask.bool()].abs().max() < 1e-5
