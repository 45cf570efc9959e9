"""The `adapter` command as a user runs it: broken recipes, the quickstart smoke run, kill -9 and
--resume, the run-folder commands, and every command's --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adaptercli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = ["text,label"] + [f"{w} movie number {i},{lab}" for i in range(60)
                             for w, lab in (("great", "pos"), ("awful", "neg"))]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def tiny_recipe(tmp_path: Path, model_dir: Path, data: Path, **train: object) -> Path:
    settings = {"max_steps": 12, "save_steps": 4, "batch_size": 8, "eval_steps": 6, "logging_steps": 2,
                "learning_rate": 1e-3, "max_seq_length": 16, **train}
    lines = "\n".join(f"  {k}: {v}" for k, v in settings.items())
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""model:
  name_or_path: {model_dir}
adapter:
  name: tiny
  method: seq_bn
  config: {{reduction_factor: 4}}
data:
  train_file: {data}
  label_column: label
train:
{lines}
output_dir: {tmp_path / 'run'}
""")
    return path


def test_broken_recipe_reports_every_problem_on_one_line_each(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("""defaults: [model/minilm, method/lora]
data:
  train_file: no/such/file.csv
train:
  learning_rat: 1e-4
  batch_size: abc
output_dir: out
""")
    result = subprocess.run([sys.executable, "-m", "adaptercli.cli", "train", str(recipe)], capture_output=True,
                            text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 1  # the docs' promise for user mistakes (docs/troubleshooting.md)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 3, lines
    assert any("train.learning_rat: unknown key, did you mean train.learning_rate?" in line for line in lines)
    assert any(line.startswith("error: train.batch_size") for line in lines)
    assert any(line.startswith("error: data.train_file") and "no/such/file.csv" in line for line in lines)

    debug = subprocess.run([sys.executable, "-m", "adaptercli.cli", "--debug", "train", str(recipe)],
                           capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "RecipeError" in debug.stderr


def test_unreachable_hub_model_says_so(tmp_path: Path, tiny_data: Path) -> None:
    # A fresh process with HF_HUB_OFFLINE=1 in its environment (the Hub libraries read it at
    # import, so setting it later has no effect) and an empty cache: the Hub is unreachable here
    # whether or not this machine has a network.
    recipe = tiny_recipe(tmp_path, Path("bert-base-uncased"), tiny_data)
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = subprocess.run([sys.executable, "-m", "adaptercli.cli", "train", str(recipe)], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Hugging Face Hub could not be reached" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_quickstart_smoke_writes_only_a_small_adapter(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    result = runner.invoke(app, ["train", str(ROOT / "recipes/rotten_tomatoes_lora.yaml"), f"output_dir={out}",
                                 "train.max_steps=3", "train.batch_size=8", "data.max_eval_samples=64"], env=ENV)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (out / "adapter").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json", "head.safetensors", "head_config.json"]
    size = sum(p.stat().st_size for p in (out / "adapter").iterdir())
    assert 100_000 < size < 2_000_000  # a few hundred KB of LoRA + head, never the 90 MB backbone
    assert all(len(load_file(p)) < 100 for p in (out / "adapter").glob("*.safetensors"))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.jsonl").read_text().count("\n") >= 2


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_bert_dir: Path, tiny_data: Path) -> None:
    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    straight_dir.mkdir()
    crashed_dir.mkdir()
    cmd = [sys.executable, "-m", "adaptercli.cli", "train"]
    straight = tiny_recipe(straight_dir, tiny_bert_dir, tiny_data)
    assert subprocess.run(cmd + [str(straight)], env=ENV, capture_output=True).returncode == 0

    crashed = tiny_recipe(crashed_dir, tiny_bert_dir, tiny_data)
    killed = subprocess.run(cmd + [str(crashed)], env={**ENV, "ADAPTERCLI_TEST_KILL_AT_STEP": "6"}, capture_output=True)
    assert killed.returncode == -9  # SIGKILL, after the step-4 checkpoint and mid-way to step 8
    assert not (crashed_dir / "run/adapter").exists()
    # The resumed run would be killed again at step 4 if it started over; from the step-4
    # checkpoint its first step is 5, so it runs to the end.
    resumed = subprocess.run(cmd + [str(crashed), "--resume"], env={**ENV, "ADAPTERCLI_TEST_KILL_AT_STEP": "4"},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(straight_dir / "run/adapter/adapter.safetensors")
    b = load_file(crashed_dir / "run/adapter/adapter.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    head_a = load_file(straight_dir / "run/adapter/head.safetensors")
    head_b = load_file(crashed_dir / "run/adapter/head.safetensors")
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_run_folder_commands(tmp_path: Path, tiny_bert_dir: Path, tiny_data: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, tiny_data, max_steps=4)
    assert runner.invoke(app, ["train", str(recipe)], env=ENV).exit_code == 0
    run = tmp_path / "run"
    result = runner.invoke(app, ["eval", str(run)], env=ENV)
    assert result.exit_code == 0 and "accuracy" in result.output
    result = runner.invoke(app, ["predict", str(run), "great movie", "--json"], env=ENV)
    assert result.exit_code == 0 and '"label": "' in result.output and '"probability"' in result.output
    result = runner.invoke(app, ["summary", str(run)], env=ENV)
    assert result.exit_code == 0 and "seq_bn" in result.output
    result = runner.invoke(app, ["export", str(run), "--to", "native", "--dest", str(tmp_path / "exported")], env=ENV)
    assert result.exit_code == 0 and (tmp_path / "exported/adapter.safetensors").exists()
    result = runner.invoke(app, ["train", str(recipe)], env=ENV)
    assert result.exit_code == 1 and "--resume" in result.output


def test_validate_and_recipes_commands(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "rotten_tomatoes_lora", "adapter.method=seq_bn"], env=ENV)
    assert result.exit_code == 0, result.output
    assert "method: seq_bn" in result.output and "attn_matrices" not in result.output
    result = runner.invoke(app, ["validate", "rotten_tomatoes_lora", "adapter.config.rr=4"], env=ENV)
    assert result.exit_code == 1 and "did you mean 'r'" in result.output
    listed = runner.invoke(app, ["recipes", "list"], env=ENV)
    assert "rotten_tomatoes_lora" in listed.output
    shown = runner.invoke(app, ["recipes", "show", "rotten_tomatoes_lora"], env=ENV)
    assert "output_dir:" in shown.output
    copied = runner.invoke(app, ["recipes", "cp", "rotten_tomatoes_lora", str(tmp_path)], env=ENV)
    assert copied.exit_code == 0 and (tmp_path / "rotten_tomatoes_lora.yaml").exists()


@pytest.mark.parametrize("command", [[], ["train"], ["validate"], ["eval"], ["predict"], ["summary"], ["export"],
                                     ["recipes"], ["recipes", "cp"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.slow
def test_causal_lm_recipe_on_smollm2(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    result = runner.invoke(app, ["train", "sms_spam_causal_lm_smollm2", f"output_dir={out}", "train.max_steps=2",
                                 "train.batch_size=2", "data.max_eval_samples=8"], env=ENV)
    assert result.exit_code == 0, result.output
    assert '"eval": true' in (out / "metrics.jsonl").read_text()
    assert load_file(out / "adapter/adapter.safetensors")


def test_stack_composition_trains_only_the_top_adapter(tmp_path: Path, tiny_bert_dir: Path, tiny_data: Path) -> None:
    lower_dir, upper_dir = tmp_path / "lower", tmp_path / "upper"
    lower_dir.mkdir()
    upper_dir.mkdir()
    lower = tiny_recipe(lower_dir, tiny_bert_dir, tiny_data, max_steps=2)
    assert runner.invoke(app, ["train", str(lower)], env=ENV).exit_code == 0
    lower_adapter = lower_dir / "run/adapter"
    upper = tiny_recipe(upper_dir, tiny_bert_dir, tiny_data, max_steps=3)
    upper.write_text(upper.read_text().replace("name: tiny", "name: task").replace(
        "data:", f"composition:\n  type: stack\n  adapters: [{lower_adapter}]\ndata:"))
    result = runner.invoke(app, ["train", str(upper)], env=ENV)
    assert result.exit_code == 0, result.output
    checkpoint = next((upper_dir / "run/checkpoints").glob("step-*"))
    trained = load_file(checkpoint / "trainable.safetensors")
    assert trained and all(".adapters.task." in k or k.startswith("heads.task.") for k in trained)
    result = runner.invoke(app, ["predict", str(upper_dir / "run"), "great movie", "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    bad = tiny_recipe(upper_dir, tiny_bert_dir, tiny_data)
    bad.write_text(bad.read_text().replace("data:", f"composition:\n  type: split\n  adapters: [{lower_adapter}]\ndata:"))
    result = runner.invoke(app, ["train", str(bad), f"output_dir={tmp_path / 'bad'}"], env=ENV)
    assert result.exit_code == 1 and "a recipe trains stack, fuse, average" in result.output
