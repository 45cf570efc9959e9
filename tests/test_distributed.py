"""Several processes (``accelerate launch``, 2 CPU processes over gloo): the same adapter as one
process with the same global batch, one metrics.jsonl, one checkpoint set, no line printed twice,
and --resume on another number of processes. The loss weighting that makes shares add up to the
whole batch is checked in-process, for sequence- and token-level tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from adaptercli.assets import resolve_model_path
from adaptercli.distributed import share
from adaptercli.evaluation import loss_units
from adaptercli.recipe import load_recipe
from adaptercli.train import train

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# accelerate 1.x runs `--cpu --num_processes N` as one process (several need mpirun); --multi_gpu
# with ACCELERATE_USE_CPU starts N processes with torchrun, joined over gloo.
LAUNCH = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny BERT without dropout (each process draws its own dropout masks, so with dropout two
    processes match one only in distribution) and MiniLM's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    minilm = Path(resolve_model_path("minilm"))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    return folder


def _recipe(folder: Path, model_dir: Path, train_file: Path) -> Path:
    # batch 7: the two shares are 4 and 3 examples; 2 micro-batches per step
    recipe = {"model": {"name_or_path": str(model_dir)},
              "adapter": {"name": "tiny", "method": "seq_bn", "config": {"reduction_factor": 4}},
              "head": {"dropout": 0.0},
              "data": {"train_file": str(train_file), "label_column": "label"},
              "train": {"max_steps": 6, "save_steps": 3, "eval_steps": 3, "logging_steps": 1, "batch_size": 7,
                        "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "max_seq_length": 16,
                        "save_total_limit": 5},
              "output_dir": str(folder / "run")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def _launch(recipe: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, "-m", "adaptercli", "train", str(recipe), *extra], capture_output=True, text=True,
                          env=env or ENV, cwd=recipe.parent, timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "samples_per_s"}
            for entry in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dir: Path, sentiment_csv: Path) -> Path:
    recipe = _recipe(tmp_path_factory.mktemp("one"), model_dir, sentiment_csv)
    train(load_recipe(recipe), console=Console(quiet=True))
    return recipe.parent / "run"


def test_two_processes_train_the_adapter_one_process_trains(tmp_path: Path, model_dir: Path, sentiment_csv: Path,
                                                            one_process: Path) -> None:
    result = _launch(_recipe(tmp_path, model_dir, sentiment_csv))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("adapter.safetensors", "head.safetensors"):
        _assert_same_weights(load_file(one_process / "adapter" / name), load_file(run / "adapter" / name))
    # one metrics.jsonl, the same entries (losses to float tolerance), written once
    one, two = _metrics(one_process), _metrics(run)
    assert [(e["step"], e.get("eval", False)) for e in two] == [(e["step"], e.get("eval", False)) for e in one]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    # one checkpoint set, each whole (every trained weight, full size)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-3", "step-6"]
    _assert_same_weights(load_file(one_process / "checkpoints/step-6/trainable.safetensors"),
                         load_file(run / "checkpoints/step-6/trainable.safetensors"))
    assert not (run / ".lock").exists()
    # the main process alone prints: the final table and the closing line appear once
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert sum("final evaluation" in line or "tiny: final" in line for line in lines) == 1, result.stdout
    assert sum(line.startswith("adapter written to") for line in lines) == 1, result.stdout
    assert "(2 processes)" in result.stdout


def test_resume_on_another_number_of_processes(tmp_path: Path, model_dir: Path, sentiment_csv: Path,
                                               one_process: Path) -> None:
    recipe = _recipe(tmp_path, model_dir, sentiment_csv)
    killed = _launch(recipe, env={**ENV, "ADAPTERCLI_TEST_KILL_AT_STEP": "4"})  # after the step-3 checkpoint
    assert killed.returncode != 0
    assert not (tmp_path / "run/adapter").exists()
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 3
    train(load_recipe(recipe), resume=True, console=Console(quiet=True))  # one process takes over
    _assert_same_weights(load_file(one_process / "adapter/adapter.safetensors"),
                         load_file(tmp_path / "run/adapter/adapter.safetensors"))
    assert [e["step"] for e in _metrics(tmp_path / "run")] == [e["step"] for e in _metrics(one_process)]


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_weighted_shares_add_up_to_the_whole_batch(task: str) -> None:
    """What each process backpropagates — its share's mean loss times processes × its share of the
    loss units — averages (as DDP averages gradients) to the whole batch's mean loss."""
    torch.manual_seed(0)
    rows, width, classes = 7, 6, 11
    logits = torch.randn(rows, width if task == "causal_lm" else 1, classes).squeeze(1)
    if task == "causal_lm":
        labels = torch.randint(0, classes, (rows, width))
        labels[torch.rand(rows, width) < 0.4] = -100  # padding and prompts: not scored

        def loss_of(part: slice) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits[part, :-1].reshape(-1, classes),
                                                     labels[part, 1:].reshape(-1), ignore_index=-100)
    else:
        labels = torch.randint(0, classes, (rows,))

        def loss_of(part: slice) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits[part], labels[part])

    class Processes:  # what `share` reads of an Accelerator
        num_processes = 2
        process_index = 0

    shares = []
    for rank in range(2):
        Processes.process_index = rank
        part, real = share(rows, Processes)
        assert real
        shares.append(loss_of(part) * 2 * loss_units(labels[part], task) / loss_units(labels, task))
    torch.testing.assert_close(sum(shares) / 2, loss_of(slice(0, rows)))
    Processes.num_processes, Processes.process_index = 8, 7  # 7 rows, 8 processes: the last has none
    assert share(rows, Processes) == (slice(0, 1), False)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_launch_configs_parse(name: str, tmp_path: Path) -> None:
    """configs/accelerate/*.yaml are accelerate config files (FSDP2; ZeRO-3 saves 16-bit weights),
    and a recipe cannot take one for a preset."""
    from accelerate.commands.config.config_args import load_config_from_file

    from adaptercli.errors import RecipeError
    from adaptercli.recipe import CONFIGS_DIR, available_presets

    config = load_config_from_file(str(CONFIGS_DIR / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
    assert f"accelerate/{name}" not in available_presets()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"defaults: [accelerate/{name}]\nmodel: {{name_or_path: m}}\ndata: {{source: trec}}\noutput_dir: o\n")
    with pytest.raises(RecipeError, match=f"accelerate/{name} configures `accelerate launch --config_file"):
        load_recipe(recipe)


def test_fsdp2_saves_whole_adapters_and_reshards_the_optimizer_state() -> None:
    """Accelerate runs FSDP on GPUs only; tests/fsdp2_check.py shards a tiny Llama with torch's
    fully_shard on 2 CPU processes and checks the gathering in distributed.py (a saved adapter holds
    whole weights, never a shard) and checkpoints.py's whole-tensor optimizer state cut back into the
    same shards."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(Path(__file__).parent / "fsdp2_check.py")],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("fsdp2 gather and optimizer round trip ok") == 2
