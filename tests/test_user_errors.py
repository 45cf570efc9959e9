"""Bad input never reaches a traceback: method configs checked like recipes, `validate` catches what
training would hit, damaged files and folders give one line and exit code 1, runs are locked,
exports never overwrite, and checkpoints hold every random generator."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import adaptercli
from adaptercli.cli import app
from adaptercli.methods import ConfigError
from adaptercli.recipe import load_recipe
from tests.conftest import tiny_model

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
CLI = [sys.executable, "-m", "adaptercli"]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.csv"
    rows = ["text,label"] + [f"{w} film {i},{lab}" for i in range(40) for w, lab in (("great", "pos"), ("awful", "neg"))]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_recipe(folder: Path, model: Path, data: Path, extra: str = "", method: str = "seq_bn",
                 config: str = "{reduction_factor: 4}", **train: object) -> Path:
    settings = {"max_steps": 6, "save_steps": 2, "batch_size": 8, "logging_steps": 2, "max_seq_length": 16, **train}
    lines = "\n".join(f"  {k}: {v}" for k, v in settings.items())
    path = folder / "recipe.yaml"
    path.write_text(f"model:\n  name_or_path: {model}\nadapter:\n  name: tiny\n  method: {method}\n  config: {config}\n"
                    f"data:\n  train_file: {data}\n  label_column: label\ntrain:\n{lines}\n{extra}output_dir: {folder / 'run'}\n")
    return path


def errors_of(result) -> list[str]:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]


# -- 1. method configs are checked like the rest of the recipe ------------------------------------

@pytest.mark.parametrize("override,message", [
    ("adapter.config.alpha=x", "adapter.config.alpha: expected a number, got 'x'"),
    ("adapter.config.dropout=-1", "adapter.config.dropout: must be >= 0 and < 1, got -1"),
    ("adapter.config.dropout=1.5", "adapter.config.dropout: must be >= 0 and < 1, got 1.5"),
    ("adapter.config.r=eight", "adapter.config.r: expected an integer, got 'eight'"),
    ("adapter.config.rr=4", "adapter.config.rr: unknown field for method 'lora', did you mean 'r'?"),
    ("adapter.config.attn_matrices=[q,x]", "adapter.config.attn_matrices[1]: expected one of q, k, v, o, got 'x'"),
    ("adapter.method=lorra", "adapter.method: unknown adapter method 'lorra', did you mean 'lora'?"),
])
def test_lora_config_fields_are_checked_with_their_path(override: str, message: str) -> None:
    problems = errors_of(runner.invoke(app, ["validate", "rotten_tomatoes_lora", override], env=ENV))
    assert any(p.startswith(message) for p in problems), problems


@pytest.mark.parametrize("override,message", [
    ("adapter.config.reduction_factor=0", "adapter.config.reduction_factor: must be > 0, got 0"),
    ("adapter.config.reduction_factor=abc", "adapter.config.reduction_factor: expected a number or a mapping, got 'abc'"),
    ("adapter.config.non_linearity=foo", "adapter.config.non_linearity: expected one of"),
    ("adapter.config.scaling=learnd", "adapter.config.scaling: expected one of learned, channel, got 'learnd', did you mean learned?"),
])
def test_bottleneck_config_fields_are_checked_with_their_path(override: str, message: str) -> None:
    result = runner.invoke(app, ["validate", "rotten_tomatoes_lora", "adapter.method=seq_bn", override], env=ENV)
    assert any(p.startswith(message) for p in errors_of(result))


def test_all_method_config_problems_are_reported_at_once() -> None:
    result = runner.invoke(app, ["validate", "rotten_tomatoes_lora", "adapter.config.alpha=x",
                                 "adapter.config.dropout=-1", "adapter.config.r=eight"], env=ENV)
    assert len(errors_of(result)) == 3


def test_python_api_raises_the_same_messages() -> None:
    model = adaptercli.init(tiny_model("bert"))
    with pytest.raises(ConfigError) as caught:
        model.add_adapter("x", "lora[r=eight,dropout=-1]")
    assert caught.value.problems == ["r: expected an integer, got 'eight'", "dropout: must be >= 0 and < 1, got -1"]
    with pytest.raises(ConfigError, match="prefix_length: must be >= 1, got 0"):
        model.add_adapter("y", {"method": "prefix_tuning", "prefix_length": 0})
    assert "x" not in model.adapter_summary()[0]["name"]


# -- 2. validate checks what the recipe points at ---------------------------------------------------

def test_validate_catches_a_misspelt_metric_before_training(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv, metric_for_best="acuracy")
    problems = errors_of(runner.invoke(app, ["validate", str(recipe)], env=ENV))
    assert problems == ["train.metric_for_best: 'acuracy' is not a metric of task classification "
                        "(it reports: accuracy, f1, f1_macro, mcc, loss)"]
    started = time.perf_counter()
    assert errors_of(runner.invoke(app, ["train", str(recipe)], env=ENV)) == problems
    assert time.perf_counter() - started < 30  # refused before any model loads or step runs
    assert not (tmp_path / "run").exists()


def test_validate_checks_model_folder_data_columns_and_output(tmp_path: Path, data_csv: Path) -> None:
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = write_recipe(tmp_path, empty_model, data_csv, extra="")
    result = runner.invoke(app, ["validate", str(recipe), "data.label_column=sentiment", f"output_dir={blocker}/run"], env=ENV)
    problems = errors_of(result)
    assert any(p.startswith("model.name_or_path:") and "holds no weights" in p for p in problems)
    assert "data.label_column: no column 'sentiment'; the data has text, label" in problems
    assert any(p.startswith("output_dir:") and "is a file" in p for p in problems)
    result = runner.invoke(app, ["validate", str(recipe), f"model.name_or_path={tmp_path}/missing/model"], env=ENV)
    assert any(p.startswith("model.name_or_path: folder not found") for p in errors_of(result))


def test_binary_data_file_gives_one_line(tmp_path: Path, tiny_bert_dir: Path) -> None:
    binary = tmp_path / "train.csv"
    binary.write_bytes(bytes(range(256)) * 20)
    recipe = write_recipe(tmp_path, tiny_bert_dir, binary)
    for command in ("validate", "train"):
        problems = errors_of(runner.invoke(app, [command, str(recipe)], env=ENV))
        assert len(problems) == 1 and problems[0].startswith(f"data: cannot read {binary} as csv")


def test_composition_members_must_exist_and_fit_the_base_model(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    wide = adaptercli.init(tiny_model("bert"))  # hidden 32, like tiny_bert_dir
    wide.add_adapter("member", "seq_bn")
    wide.save_adapter(tmp_path / "fits", "member")
    other = adaptercli.init(tiny_model("gpt2"))
    other.add_adapter("member", "seq_bn")
    other.save_adapter(tmp_path / "other_arch", "member")
    extra = (f"composition:\n  type: stack\n  adapters: [{tmp_path / 'fits'}, {tmp_path / 'nowhere'}, "
             f"{tmp_path / 'other_arch'}]\n")
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv, extra=extra)
    problems = errors_of(runner.invoke(app, ["validate", str(recipe)], env=ENV))
    assert len(problems) == 2, problems
    assert problems[0].startswith("composition.adapters[1]:") and "not found" in problems[0]
    assert problems[1].startswith("composition.adapters[2]:") and "gpt2" in problems[1]


# -- 3. damaged files, unwritable folders, interruptions -------------------------------------------

def test_corrupt_adapter_and_checkpoint_give_one_line(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv)
    assert runner.invoke(app, ["train", str(recipe)], env=ENV).exit_code == 0
    run = tmp_path / "run"
    weights = run / "adapter/adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    problems = errors_of(runner.invoke(app, ["eval", str(run)], env=ENV))
    assert len(problems) == 1 and "adapter.safetensors: cannot read weights" in problems[0]

    checkpoint = run / "checkpoints" / json.loads((run / "checkpoints/latest.json").read_text())["checkpoint"]
    (checkpoint / "trainable.safetensors").write_bytes(b"garbage")
    problems = errors_of(runner.invoke(app, ["train", str(recipe), "train.max_steps=8", "--resume"], env=ENV))
    assert len(problems) == 1 and problems[0].startswith("--resume: cannot restore the checkpoint")


def test_model_folder_without_weights_fails_in_train_too(tmp_path: Path, data_csv: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        if (tiny_bert_dir / name).exists():
            (folder / name).write_bytes((tiny_bert_dir / name).read_bytes())
    problems = errors_of(runner.invoke(app, ["train", str(write_recipe(tmp_path, folder, data_csv))], env=ENV))
    assert problems == [f"model.name_or_path: {folder} holds no weights (model.safetensors or pytorch_model.bin)"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--debug", "validate", "rotten_tomatoes_lora", "adapter.config.r=eight"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RecipeError: adapter.config.r" in result.stderr


def test_ctrl_c_says_how_to_resume(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv, max_steps=100000, save_steps=1)
    # Ctrl-C's default action, whatever this test inherited: a non-interactive shell starts background
    # jobs (a CI runner's `bash .ci/run &`) with SIGINT ignored, and Python then installs no handler.
    process = subprocess.Popen([*CLI, "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV, cwd=tmp_path,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = tmp_path / "run/checkpoints/latest.json"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # never leave a training run behind
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"interrupted; the latest checkpoint is kept, continue with: adapter train {recipe} --resume" in stderr
    assert not (tmp_path / "run/.lock").exists()


# -- 4. YAML's boolean words ---------------------------------------------------------------------

def test_yaml_boolean_words(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv, mixed_precision="no")
    assert load_recipe(recipe).train.mixed_precision == "no"
    assert load_recipe(recipe, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    problems = errors_of(runner.invoke(app, ["validate", str(recipe), "model.attn_implementation=off"], env=ENV))
    assert problems == ["model.attn_implementation: expected a string, but YAML reads an unquoted no/false/off as "
                        "the boolean false; put the word in quotes"]


def test_unreachable_hub_fails_within_seconds(tmp_path: Path, data_csv: Path, tiny_bert_dir: Path) -> None:
    # No HF_HUB_OFFLINE: an endpoint that refuses connections, as a machine without network sees it.
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv)
    started = time.perf_counter()
    result = subprocess.run([*CLI, "train", str(recipe), "data.source=hub", "data.name=someone/no-such-data",
                             "data.train_file=null"], capture_output=True, text=True, env=env, cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not reach dataset someone/no-such-data" in result.stderr
    assert elapsed < 25, f"took {elapsed:.0f} s (the libraries' own retries take ~30 s)"


# -- 5. nothing overwrites what it should not -------------------------------------------------------

def test_export_never_overwrites(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv)
    assert runner.invoke(app, ["train", str(recipe)], env=ENV).exit_code == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
    for dest in (run / "adapter", run / "checkpoints" / "x", run):
        problems = errors_of(runner.invoke(app, ["export", str(run), "--to", "peft", "--dest", str(dest)], env=ENV))
        assert len(problems) == 1 and problems[0].startswith("--dest:")
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir()} == before
    assert runner.invoke(app, ["eval", str(run)], env=ENV).exit_code == 0

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    problems = errors_of(runner.invoke(app, ["export", str(run), "--to", "native", "--dest", str(busy)], env=ENV))
    assert problems == [f"--dest: {busy} already holds files; choose an empty folder or pass --force"]
    result = runner.invoke(app, ["export", str(run), "--to", "native", "--dest", str(busy), "--force"], env=ENV)
    assert result.exit_code == 0 and (busy / "adapter.safetensors").exists() and (busy / "notes.txt").exists()


def test_adapter_summary_as_table_is_text() -> None:
    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("sentiment", "lora")
    model.set_active_adapters("sentiment")
    table = model.adapter_summary(as_table=True)
    assert isinstance(table, str)
    line = next(row for row in table.splitlines() if row.startswith("sentiment"))
    params = model.adapter_summary()[0]["params"]
    assert line.split()[:3] == ["sentiment", "lora", f"{params:,}"] and line.split()[-2:] == ["yes", "yes"]


# -- 6. one training per output folder ------------------------------------------------------------------

def test_a_running_training_holds_its_output_folder(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run/.lock").write_text(f"{holder.pid}\n")
        problems = errors_of(runner.invoke(app, ["train", str(recipe)], env=ENV))
        assert problems == [f"{tmp_path / 'run'} is in use by a running training (pid {holder.pid}); wait for it to "
                            "end or choose another output_dir"]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its stale lock is taken over, and released at the end.
    assert runner.invoke(app, ["train", str(recipe)], env=ENV).exit_code == 0
    assert not (tmp_path / "run/.lock").exists()


# -- 7. checkpoints hold every random generator ---------------------------------------------------------

def test_checkpoint_restores_python_numpy_and_torch_rngs(tmp_path: Path) -> None:
    from adaptercli.checkpoints import RunState, load_checkpoint, save_checkpoint

    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path, model, optimizer, scheduler, RunState(step=5), "a")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert load_checkpoint(tmp_path, model, optimizer, scheduler).step == 5
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- 8. python -m adaptercli ------------------------------------------------------------------------------

def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "recipes", "list"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 0 and "rotten_tomatoes_lora" in result.stdout


def test_a_full_disk_during_training_gives_one_line(tmp_path: Path, tiny_bert_dir: Path, data_csv: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import adaptercli.checkpoints as checkpoints

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "write_weights", full_disk)
    recipe = write_recipe(tmp_path, tiny_bert_dir, data_csv)
    problems = errors_of(runner.invoke(app, ["train", str(recipe)], env=ENV))
    assert len(problems) == 1 and problems[0].endswith("trainable.safetensors: No space left on device")
    assert not (tmp_path / "run/.lock").exists()
    assert not (tmp_path / "run/checkpoints/latest.json").exists()  # no half-written checkpoint is pointed at
