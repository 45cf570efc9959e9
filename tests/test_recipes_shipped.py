"""Every recipe in recipes/ as a user runs it: it validates, and a 2-step smoke run of each offline
one trains through the CLI and writes a small adapter and its task's metric. The GLUE MRPC recipe
needs the Hub, so it runs on a local copy in the Hub layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_glue_copy
from typer.testing import CliRunner

from adaptercli.assets import OFFLINE_DATASETS
from adaptercli.cli import app
from adaptercli.errors import RecipeError
from adaptercli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
SMOKE = ["train.max_steps=2", "train.batch_size=4", "data.max_train_samples=64", "data.max_eval_samples=32"]

# The metric each task reports (a recipe's metric_for_best, when set, must be reported too).
TASK_METRIC = {"classification": "accuracy", "multilabel": "f1_micro", "regression": "pearson", "tagging": "f1",
               "mlm": "accuracy", "causal_lm": "accuracy"}
# Smoke-trained on the real MiniLM (as is the quickstart, in test_cli.py); the other MiniLM recipes
# run on a tiny BERT with MiniLM's tokenizer, which tests the same plumbing a hundred times faster.
ON_REAL_MINILM = {"trec_par_bn"}


def _smoke_recipes() -> list[str]:
    """The recipes on offline data and MiniLM; one that does not load is kept, to fail in its test."""
    names = []
    for name in RECIPES:
        try:
            recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        except RecipeError:
            names.append(name)
            continue
        if recipe.data.source in OFFLINE_DATASETS and recipe.model.name_or_path == "minilm":
            names.append(name)
    return names


@pytest.fixture(scope="module")
def glue_copy(tmp_path_factory) -> Path:
    """A small copy of nyu-mll/glue's mrpc config in the Hub layout."""
    pairs = [("The cat sat on the mat.", "A cat was sitting on the mat.", 1),
             ("Stocks fell sharply today.", "Shares dropped a lot today.", 1),
             ("A dog ran in the park.", "The sun set over the sea.", 0),
             ("It rained all day.", "Snow fell in the mountains.", 0)]
    rows = [(f"{a} ({i})", b, label) for i in range(6) for a, b, label in pairs]
    frame = pd.DataFrame(rows, columns=["sentence1", "sentence2", "label"]).assign(idx=range(len(rows)))
    return write_glue_copy(tmp_path_factory.mktemp("glue"), frame, frame.iloc[:8])


@pytest.fixture(scope="module")
def tiny_members(tmp_path_factory, tiny_bert_dir: Path) -> list[str]:
    """Two seq_bn runs on the tiny BERT: composition members for the fusion recipes, whose real
    members (`make fusion-demo`) take minutes to train."""
    root = tmp_path_factory.mktemp("members")
    runs = []
    for name, source in (("first", "sms_spam"), ("second", "trec")):
        result = runner.invoke(app, ["train", "fusion_source_seq_bn", f"model.name_or_path={tiny_bert_dir}",
                                     f"data.source={source}", f"adapter.name={name}", f"output_dir={root / name}",
                                     *SMOKE], env=ENV)
        assert result.exit_code == 0, result.output
        runs.append(str(root / name))
    return runs


def _local_members(name: str, tiny_bert_dir: Path, tiny_members: list[str]) -> list[str]:
    """Overrides that point a recipe's local composition members (run folders that `make
    fusion-demo` creates) at tiny trained ones; none for recipes without them."""
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    if recipe.composition is None or not any(m.startswith("runs/") for m in recipe.composition.adapters):
        return []
    members = [tiny_members[i % len(tiny_members)] for i in range(len(recipe.composition.adapters))]
    return [f"composition.adapters=[{','.join(members)}]", f"model.name_or_path={tiny_bert_dir}"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_validates(name: str, tiny_bert_dir: Path, tiny_members: list[str]) -> None:
    result = runner.invoke(app, ["validate", name, *_local_members(name, tiny_bert_dir, tiny_members)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "recipe is valid" in result.output
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) > 20  # `adapter recipes list` prints it
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.output_dir == f"runs/{name}"
    assert recipe.train.max_steps > 0 or recipe.data.source not in OFFLINE_DATASETS  # offline: minutes, not epochs


def test_recipes_list_describes_every_recipe() -> None:
    listed = runner.invoke(app, ["recipes", "list"], env=ENV).output
    for name in RECIPES:
        assert any(line.startswith(name + " ") and len(line) > len(name) + 20 for line in listed.splitlines()), name


def _smoke_train(name: str, out: Path, extra: list[str]) -> list[dict]:
    """Train `name` for 2 steps through the CLI; check the run folder; return metrics.jsonl."""
    result = runner.invoke(app, ["train", name, f"output_dir={out}", *SMOKE, *extra], env=ENV)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (out / "adapter").iterdir())
    assert {"adapter.safetensors", "adapter_fusion.safetensors"} & set(files) and "head_config.json" in files
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [entry for entry in history if entry.get("eval")]
    assert evals and evals[-1]["step"] == 2
    return evals


@pytest.mark.parametrize("name", _smoke_recipes())
def test_offline_recipe_smoke_trains(name: str, tmp_path: Path, tiny_bert_dir: Path, tiny_members: list[str]) -> None:
    model = [] if name in ON_REAL_MINILM else [f"model.name_or_path={tiny_bert_dir}"]
    evals = _smoke_train(name, tmp_path / "run", model + _local_members(name, tiny_bert_dir, tiny_members))
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    for key in {TASK_METRIC[recipe.data.task], recipe.train.metric_for_best or "loss"}:
        assert isinstance(evals[-1][key], float), (key, evals[-1])


def test_glue_mrpc_recipe_trains_on_a_local_copy_in_hub_layout(glue_copy: Path, tmp_path: Path,
                                                                tiny_bert_dir: Path) -> None:
    local = [f"data.name={glue_copy}", f"model.name_or_path={tiny_bert_dir}"]
    result = runner.invoke(app, ["validate", "glue_mrpc", *local], env=ENV)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(ROOT / "recipes/glue_mrpc.yaml")
    assert (recipe.model.name_or_path, recipe.data.name, recipe.data.subset) == ("bert-base-uncased", "nyu-mll/glue",
                                                                                 "mrpc")
    assert (recipe.adapter.method, recipe.train.learning_rate, recipe.train.batch_size) == ("seq_bn", 1e-4, 32)
    assert (recipe.train.num_epochs, recipe.train.max_seq_length, recipe.train.eval_steps) == (10, 128, None)

    evals = _smoke_train("glue_mrpc", tmp_path / "run", local)
    assert isinstance(evals[-1]["f1"], float) and isinstance(evals[-1]["accuracy"], float)
    head = json.loads((tmp_path / "run/adapter/head_config.json").read_text())
    assert head["config"]["label2id"] == {"not_equivalent": 0, "equivalent": 1}  # names from the card
