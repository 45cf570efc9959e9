"""QLoRA: ``model.quantization: 4bit`` (and ``8bit``) loads the frozen base with bitsandbytes (NF4,
double quantization); LoRA and the head stay in full precision, train, save alone and reload. On
the CPU bitsandbytes 0.50 runs its (slow) torch fallback: enough for a tiny Llama here. The GPU run
on a Llama-family model is documented in docs/scale.md when one was measured."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptercli.cli import app
from adaptercli.inference import evaluate_run
from adaptercli.recipe import load_recipe
from adaptercli.runs import load_run
from adaptercli.train import train
from tests.conftest import write_recipe

bitsandbytes = pytest.importorskip("bitsandbytes")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_saves_only_the_adapter_and_reloads(bits: str, tmp_path: Path, tiny_llama_dir: Path,
                                                        sentiment_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir, sentiment_csv, method="lora", config={"r": 4},
                          data={"task": "causal_lm", "max_eval_samples": 8}, max_steps=3, eval_steps=3, save_steps=3)
    loaded = load_recipe(recipe, [f"model.quantization={bits}"])
    final = train(loaded, console=Console(quiet=True))
    run = tmp_path / "run"
    saved = load_file(run / "adapter/adapter.safetensors")
    assert saved and all(".loras.tiny." in key for key in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())  # the adapter stays in full precision
    assert load_file(run / "adapter/head.safetensors") == {}  # the LM head is the (tied) embeddings
    assert sum(p.stat().st_size for p in (run / "adapter").iterdir()) < 50_000  # LoRA alone, never the base

    recipe_back, model, _, name = load_run(run)  # the run's recipe loads the base quantized again
    assert recipe_back.model.quantization == bits
    q_proj = model.base_model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear4bit" if bits == "4bit" else "Linear8bitLt")
    lora = q_proj.loras[name]
    torch.testing.assert_close(lora.lora_B, saved["layers.0.self_attn.q_proj.loras.tiny.lora_B"])
    assert evaluate_run(run)["loss"] == pytest.approx(final["loss"], rel=1e-4)


def test_quantization_without_bitsandbytes_is_a_recipe_error(tmp_path: Path, tiny_llama_dir: Path,
                                                              sentiment_csv: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_llama_dir, sentiment_csv, method="lora", data={"task": "causal_lm"})
    result = CliRunner().invoke(app, ["validate", str(recipe), "model.quantization=4bit"], env=ENV)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: model.quantization: 4bit loading needs bitsandbytes (pip install bitsandbytes)" in result.output
    result = CliRunner().invoke(app, ["validate", str(recipe), "model.quantization=2bit"], env=ENV)
    assert result.exit_code == 1 and "model.quantization: expected one of 4bit, 8bit" in result.output
