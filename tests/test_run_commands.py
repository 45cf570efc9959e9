"""The run-folder commands reproduce the model: `adapter eval` gives the final evaluation that
training logged, `adapter predict` gives the model's own forward pass with the run's adapter, and
every `adapter export` target reloads to the same outputs. A run trained on top of a frozen
stack of pretrained adapters runs them in training, in eval and in predict."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import write_recipe
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

import adaptercli
from adaptercli.cli import app
from adaptercli.inference import evaluate_run

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
TEXTS = ["great movie number 7", "awful movie number 3", "a film nobody saw"]


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), env=ENV)
    assert result.exit_code == 0, result.output
    return result.output


def _final_eval(run: Path) -> dict[str, float]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in entries if e.get("eval")][-1]
    return {k: v for k, v in final.items() if k not in ("step", "eval")}


def _table(output: str) -> dict[str, float]:
    """The metric -> value rows of a rich table."""
    return {name: float(value) for name, value in re.findall(r"^\W*(\w+)\W+(-?\d+\.\d+)\W*$", output, re.M)}


def _probabilities(model, tokenizer, max_length: int = 16) -> torch.Tensor:
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(model(**enc).logits, -1)


def _predicted(run: Path) -> list[dict]:
    output = _invoke("predict", str(run), *TEXTS, "--json")
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _assert_predictions(rows: list[dict], probs: torch.Tensor, id2label: dict[int, str]) -> None:
    assert [row["text"] for row in rows] == TEXTS
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == id2label[int(p.argmax())]
        assert row["probability"] == pytest.approx(p.max().item(), abs=1e-6)


def _assert_eval_reproduces_training(run: Path) -> None:
    final = _final_eval(run)
    assert evaluate_run(run) == pytest.approx(final, abs=1e-6)
    shown = _table(_invoke("eval", str(run)))
    assert shown.keys() == final.keys()
    assert all(abs(shown[k] - final[k]) <= 5.1e-5 for k in final), (shown, final)  # printed to 4 decimals


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert_dir: Path, sentiment_csv: Path) -> Path:
    folder = tmp_path_factory.mktemp("lora-run")
    recipe = write_recipe(folder, tiny_bert_dir, sentiment_csv, method="lora", config={"r": 4, "alpha": 16},
                          max_steps=6, eval_steps=3, save_steps=6, learning_rate=2e-2)
    _invoke("train", str(recipe))
    return folder / "run"


@pytest.fixture(scope="module")
def reference(lora_run: Path, tiny_bert_dir: Path):
    """The run's adapter and head loaded by hand into a fresh model."""
    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    name = model.load_adapter(lora_run / "adapter", set_active=True)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_bert_dir), name


def test_eval_reproduces_the_final_evaluation_of_training(lora_run: Path) -> None:
    _assert_eval_reproduces_training(lora_run)


def test_predict_is_the_models_own_forward(lora_run: Path, reference) -> None:
    model, tokenizer, name = reference
    probs = _probabilities(model, tokenizer)
    _assert_predictions(_predicted(lora_run), probs, model.heads[name].config.id2label)
    model.set_active_adapters(None)
    try:  # the adapter matters, so a predict without it would show
        assert (_probabilities(model, tokenizer) - probs).abs().max() > 1e-4
    finally:
        model.set_active_adapters(name)


def test_every_export_target_reloads_to_the_same_outputs(lora_run: Path, reference, tiny_bert_dir: Path,
                                                         tmp_path: Path) -> None:
    model, tokenizer, name = reference
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc)
        bare = AutoModel.from_pretrained(tiny_bert_dir).eval()(**enc).last_hidden_state
    assert (bare - expected.hidden_states).abs().max() > 1e-4  # the adapter changes the outputs

    for ours in ("native", "adapterhub"):  # folders our loader (and AdapterHub's) reads, head included
        _invoke("export", str(lora_run), "--to", ours, "--dest", str(tmp_path / ours))
        reloaded = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
        reloaded.load_adapter(tmp_path / ours, set_active=True)
        with torch.no_grad():
            assert torch.allclose(reloaded.eval()(**enc).logits, expected.logits, atol=1e-6), ours

    # merged: a plain transformers model, no adapter code at all
    _invoke("export", str(lora_run), "--to", "merged", "--dest", str(tmp_path / "merged"))
    architecture = json.loads((tmp_path / "merged/config.json").read_text())["architectures"][0]
    merged = getattr(transformers, architecture).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, expected.logits, atol=1e-5)

    # peft: the LoRA on the model class its task_type names, the head as PEFT restores
    # modules_to_save (their saved weights loaded over the task model's own)
    folder = tmp_path / "peft"
    _invoke("export", str(lora_run), "--to", "peft", "--dest", str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    task_model = {None: AutoModel, "SEQ_CLS": transformers.AutoModelForSequenceClassification}[config["task_type"]]
    peft = adaptercli.init(task_model.from_pretrained(tiny_bert_dir, num_labels=2).eval())
    peft.load_adapter(folder, set_active=True, with_head=False)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(folder / "adapter_model.safetensors").items()
             if ".lora_" not in k}
    assert all(any(f".{module}." in f".{k}" for module in config["modules_to_save"] or []) for k in saved)
    # Besides the task model's keys, only the bare backbone's copies of them (for PEFT on the backbone).
    prefix = peft.base_model_prefix + "."
    copies = {k for k in saved if f"{prefix}{k}" in saved}
    assert all(torch.equal(saved[k], saved[prefix + k]) for k in copies)
    assert set(peft.load_state_dict({k: v for k, v in saved.items() if k not in copies},
                                    strict=False).unexpected_keys) == set()
    with torch.no_grad():
        out = peft(**enc)
    if config["task_type"] is None:
        assert torch.allclose(out.last_hidden_state, expected.hidden_states, atol=1e-5)
    else:
        assert torch.allclose(out.logits, expected.logits, atol=1e-5)


def test_a_run_on_a_frozen_stack_runs_the_lower_adapter(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path,
                                                         perturb) -> None:
    lower = adaptercli.init(AutoModel.from_pretrained(tiny_bert_dir))
    lower.add_adapter("lower", "seq_bn")
    perturb(lower, "lower", scale=0.5)
    lower.save_adapter(tmp_path / "lower", "lower")
    recipe = write_recipe(tmp_path / "upper", tiny_bert_dir, sentiment_csv, name="task", max_steps=4, eval_steps=2,
                          save_steps=4, learning_rate=1e-2,
                          composition={"type": "stack", "adapters": [str(tmp_path / "lower")]})
    _invoke("train", str(recipe))
    run = tmp_path / "upper/run"

    # eval runs the stack as training did: a run that left `lower` out of either differs
    _assert_eval_reproduces_training(run)

    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    model.load_adapter(tmp_path / "lower", with_head=False)
    model.load_adapter(run / "adapter")
    model.set_active_adapters(adaptercli.Stack("lower", "task"))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    stacked = _probabilities(model, tokenizer)
    _assert_predictions(_predicted(run), stacked, model.heads["task"].config.id2label)
    model.set_active_adapters("task")
    assert (_probabilities(model, tokenizer) - stacked).abs().max() > 1e-3
