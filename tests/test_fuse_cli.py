"""`adapter fuse` as a user runs it: source adapters trained with `adapter train`, fused for a target
task; the run saves only the fusion and its head, resumes exactly after kill -9, serves eval /
predict / summary, draws what the fusion attends to, and refuses bad members before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

import adaptercli
from adaptercli.cli import app

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
CLI = [sys.executable, "-m", "adaptercli"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_bert_dir: Path) -> dict[str, Path]:
    """Two seq_bn source runs on different label sets of the same tiny texts, and a LoRA run."""
    root = tmp_path_factory.mktemp("sources")
    rows = [(f"{w} film number {i}", lab) for i in range(48) for w, lab in (("great", "pos"), ("awful", "neg"))]
    (root / "data.csv").write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows) + "\n")
    runs = {}
    for name, method in (("alpha", "seq_bn"), ("beta", "seq_bn"), ("gamma", "lora")):
        recipe = root / f"{name}.yaml"
        recipe.write_text(f"""model: {{name_or_path: {tiny_bert_dir}}}
adapter: {{name: {name}, method: {method}}}
data: {{train_file: {root / 'data.csv'}, label_column: label}}
train: {{max_steps: 4, batch_size: 8, max_seq_length: 16, learning_rate: 1.0e-3, seed: {len(name)}}}
output_dir: {root / name}
""")
        result = runner.invoke(app, ["train", str(recipe)], env=ENV)
        assert result.exit_code == 0, result.output
        runs[name] = root / name
    runs["data"] = root / "data.csv"
    return runs


def fuse_recipe(folder: Path, model: Path, sources: dict[str, Path], members: list[str | Path], **train) -> Path:
    settings = {"max_steps": 6, "batch_size": 8, "max_seq_length": 16, "learning_rate": 5.0e-3, "save_steps": 2,
                "eval_steps": 3, **train}
    path = folder / "fuse.yaml"
    path.write_text(f"""model: {{name_or_path: {model}}}
adapter: {{name: target}}
composition: {{type: fuse, adapters: [{', '.join(str(m) for m in members)}]}}
data: {{train_file: {sources['data']}, label_column: label}}
train: {{{', '.join(f'{k}: {v}' for k, v in settings.items())}}}
output_dir: {folder / 'run'}
""")
    return path


def test_fuse_trains_only_the_fusion_and_head(tmp_path: Path, tiny_bert_dir: Path, sources) -> None:
    recipe = fuse_recipe(tmp_path, tiny_bert_dir, sources, [sources["alpha"], sources["beta"] / "adapter"])
    result = runner.invoke(app, ["fuse", str(recipe)], env=ENV)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "adapter").iterdir()) == [
        "adapter_fusion.safetensors", "adapter_fusion_config.json", "head.safetensors", "head_config.json"]
    checkpoint = next((run / "checkpoints").glob("step-*"))
    trained = load_file(checkpoint / "trainable.safetensors")
    assert trained and all("adapter_fusion_layer" in k or k.startswith("heads.target.") for k in trained), list(trained)
    assert any("adapter_fusion_layer" in k for k in trained)

    # The fusion attends over both members at every layer: each row is a distribution.
    report = json.loads((run / "fusion_attention.json").read_text())
    assert report["members"] == ["alpha", "beta"] and len(report["places"]) == 2
    for place in report["places"]:
        assert sum(place["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (run / "fusion_attention.png").read_bytes()[:4] == b"\x89PNG"

    # The run folder serves eval / predict / summary: eval equals the final evaluation in metrics.jsonl
    # (no metric_for_best: adapter/ holds the final weights).
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    result = runner.invoke(app, ["eval", str(run)], env=ENV)
    assert result.exit_code == 0 and f"{final['loss']:.4f}" in result.output, (final, result.output)
    result = runner.invoke(app, ["summary", str(run)], env=ENV)
    assert result.exit_code == 0 and "alpha" in result.output and "mean" in result.output
    fusion_row = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("target "))
    assert "fusion" in fusion_row and fusion_row.rstrip(" │").endswith("yes")  # active and trainable


def test_fuse_resumes_exactly_after_kill_9(tmp_path: Path, tiny_bert_dir: Path, sources) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    members = [sources["alpha"], sources["beta"]]
    assert subprocess.run([*CLI, "fuse", str(fuse_recipe(straight, tiny_bert_dir, sources, members))],
                          env=ENV, capture_output=True).returncode == 0
    recipe = fuse_recipe(crashed, tiny_bert_dir, sources, members)
    killed = subprocess.run([*CLI, "fuse", str(recipe)], env={**ENV, "ADAPTERCLI_TEST_KILL_AT_STEP": "3"},
                            capture_output=True)
    assert killed.returncode == -9
    resumed = subprocess.run([*CLI, "fuse", str(recipe), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("adapter_fusion.safetensors", "head.safetensors"):
        a, b = load_file(straight / "run/adapter" / name), load_file(crashed / "run/adapter" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_members_are_refused_before_training(tmp_path: Path, tiny_bert_dir: Path, sources) -> None:
    wider = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)  # same type, other width below
    del wider
    torch.manual_seed(0)
    other = adaptercli.init(BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=100)))
    other.add_adapter("wide", "seq_bn")
    other.save_adapter(tmp_path / "wide", "wide")
    cases = {
        "missing": ([sources["alpha"], tmp_path / "nowhere"], "composition.adapters[1]:"),
        "other base": ([sources["alpha"], tmp_path / "wide"], "was made for hidden size 48"),
        "lora member": ([sources["alpha"], sources["gamma"]], "Fuse does not work with lora adapters"),
    }
    for case, (members, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        result = runner.invoke(app, ["fuse", str(fuse_recipe(folder, tiny_bert_dir, sources, members))], env=ENV)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (case, result.output)
        assert not (folder / "run").exists()


def test_fuse_needs_a_fuse_recipe_and_training_refuses_inference_blocks(tmp_path: Path, tiny_bert_dir: Path,
                                                                         sources) -> None:
    recipe = fuse_recipe(tmp_path, tiny_bert_dir, sources, [sources["alpha"], sources["beta"]])
    recipe.write_text(recipe.read_text().replace("type: fuse", "type: stack"))
    result = runner.invoke(app, ["fuse", str(recipe)], env=ENV)
    assert result.exit_code == 1 and "needs a recipe with composition: {type: fuse" in result.output
    recipe.write_text(recipe.read_text().replace("type: stack", "type: parallel"))
    result = runner.invoke(app, ["train", str(recipe)], env=ENV)
    assert result.exit_code == 1 and "composition.type: parallel runs trained adapters side by side" in result.output


def test_average_composition_starts_from_the_members_average(tmp_path: Path, tiny_bert_dir: Path, sources) -> None:
    recipe = fuse_recipe(tmp_path, tiny_bert_dir, sources, [sources["alpha"], sources["beta"]], max_steps=1,
                         learning_rate=1.0e-12)
    recipe.write_text(recipe.read_text().replace("type: fuse", "type: average, kwargs: {weights: [0.25, 0.75]}"))
    result = runner.invoke(app, ["train", str(recipe)], env=ENV)
    assert result.exit_code == 0, result.output
    trained = load_file(tmp_path / "run/adapter/adapter.safetensors")
    alpha = load_file(sources["alpha"] / "adapter/adapter.safetensors")
    beta = load_file(sources["beta"] / "adapter/adapter.safetensors")
    for key, value in trained.items():
        a, b = alpha[key.replace(".target.", ".alpha.")], beta[key.replace(".target.", ".beta.")]
        assert torch.allclose(value, 0.25 * a + 0.75 * b, atol=1e-6), key
