"""The benchmark scripts run and report what they claim: ``scripts/bench_gpu.sh --dry-run`` (the GPU
run's script on CPU, tiny shapes) writes a row per contender with real numbers; ``bench.py --loop``
times the real train() loop against the bare step, evaluation and checkpoints apart; ``--peft``
pairs each method with PEFT's twin and flags parameter counts or first losses that differ."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["ideal", "full", "lora", "seq_bn", "prefix_tuning"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # bench.py imports bench_loop from beside it
    import bench

    return bench


def test_bench_gpu_dry_run_writes_one_json_and_a_table_with_every_contender(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    joined = json.loads((tmp_path / "bench_gpu.json").read_text())
    table = (tmp_path / "bench_gpu.md").read_text()
    contenders = CONTENDERS + (["peft_lora"] if importlib.util.find_spec("peft") else [])
    assert list(joined["runs"]) == ["tiny-bert-shape", "tiny-llama-shape"]
    for model, run in joined["runs"].items():
        assert run["args"]["bf16"] and run["args"]["schedule"] == "sequential"
        rows = run["rows"]
        assert list(rows) == contenders, rows
        for setting, row in rows.items():
            assert "error" not in row, (model, setting, row)
            assert row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["trainable_params"] > 0
            assert f"| {setting} | {row['trainable_params']:,} | {row['samples_per_s']:.1f} |" in table
        assert rows["full"]["trainable_params"] > 10 * rows["lora"]["trainable_params"]
        assert rows["lora"]["speedup"] == pytest.approx(rows["lora"]["samples_per_s"] / rows["full"]["samples_per_s"])
        if "peft_lora" in rows:  # the same adapter: the same trainable parameters, the ratio in the table
            assert rows["peft_lora"]["trainable_params"] == rows["lora"]["trainable_params"]
            assert rows["lora"]["vs_peft_lora"] > 0
        assert f"**{model}**, batch 2 × 16" in table


def test_loop_benchmark_times_train_against_the_bare_step_with_evaluation_and_checkpoints_apart(
        bench, tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    code = bench.main(["--model", "tiny-bert-shape", "--batch", "4", "--seq", "32", "--warmup", "1", "--steps", "3",
                       "--skip", "train,infer", "--loop", "lora", "--threads", "1", "--loop-eval-samples", "8",
                       "--out", str(out)])
    assert code == 0
    row = json.loads(out.read_text())["loop"]["lora"]
    assert "error" not in row, row
    assert len(row["loop_steps_ms"]) == 3 and len(row["bare_steps_ms"]) == 3  # the warmup step left out
    assert all(t > 0 for t in row["loop_steps_ms"] + row["bare_steps_ms"])
    assert row["loop_step_ms"] == pytest.approx(min(row["loop_steps_ms"]), abs=0.01)
    assert row["overhead_pct"] == pytest.approx(100 * (row["loop_step_ms"] / row["bare_step_ms"] - 1))
    # 4 steps, evaluated and saved every 2: one evaluation in the loop and the final one; checkpoints at 2 and 4
    assert len(row["evaluation_ms"]) == 2 and len(row["checkpoint_ms"]) == 2
    assert all(t > 0 for t in row["evaluation_ms"] + row["checkpoint_ms"])


def test_twins_report_the_ratio_and_flag_differing_parameter_counts_and_first_losses(bench, capsys) -> None:
    training = {
        "lora": {"samples_per_s": 12.0, "trainable_params": 100, "init_loss": 0.70},
        "peft_lora": {"samples_per_s": 10.0, "trainable_params": 100, "init_loss": 0.70},
        "vera": {"samples_per_s": 10.0, "trainable_params": 5000, "init_loss": 0.70},
        "peft_vera": {"samples_per_s": 10.0, "trainable_params": 50, "init_loss": 0.70},
        "ia3": {"samples_per_s": 10.0, "trainable_params": 30, "init_loss": 0.70},
        "peft_ia3": {"samples_per_s": 10.0, "trainable_params": 30, "init_loss": 0.75},
        "prompt_tuning": {"samples_per_s": 10.0, "trainable_params": 40, "init_loss": 0.70},
        "peft_prompt_tuning": {"samples_per_s": 10.0, "trainable_params": 40, "init_loss": 0.75},
    }
    bench.compare_twins(training, ["lora", "vera", "ia3", "prompt_tuning"], tolerance=1e-4)
    lora, vera, ia3, prompt = (training[f"peft_{m}"] for m in ("lora", "vera", "ia3", "prompt_tuning"))
    assert lora["ours_vs_peft"] == pytest.approx(1.2) and lora["params_match"] and lora["same_start"]
    assert not vera["params_match"] and "vera_B" in vera["params_mismatch_why"]
    assert ia3["params_match"] and ia3["same_start"] is False  # an identity at start: the losses must agree
    assert "same_start" not in prompt  # random prompts on both sides: no agreement to expect
    err = capsys.readouterr().err
    assert "vera: 5,000 trainable parameters, PEFT's 50" in err and "ia3: first loss" in err
    for row in training.values():
        row.update(step_ms=1.0, peak_gib=None)
    table = bench.markdown({"args": {"model": "m", "batch": 1, "seq": 1, "bf16": False, "warmup": 1, "steps": 1,
                                     "schedule": "interleaved", "stat": "min"},
                            "machine": {"device_name": "cpu", "torch_threads": 1, "torch": "t", "transformers": "t"},
                            "training": training, "inference": {}, "files": {}})
    assert "| lora | 100 / 100 ✓ | 0.7000 / 0.7000 ✓ same | 1.20 ✓ (1.00) |" in table
    assert "| vera | 5,000 / 50 ✗ differ |" in table and "vera: parameter counts differ: ours is AdapterHub's" in table
    assert "| ia3 | 30 / 30 ✓ | 0.7000 / 0.7500 ✗ differ | 1.00 ✓ (1.00) |" in table


def test_peft_twins_have_our_parameter_counts_and_start_where_ours_do(bench, tmp_path: Path) -> None:
    pytest.importorskip("peft")  # not a dependency: runs in the benchmark's throw-away venv (scripts/README.md)
    out = tmp_path / "twins.json"
    methods = "lora,dora,ia3,vera,prefix_tuning,prompt_tuning"
    code = bench.main(["--model", "tiny-bert-shape", "--batch", "2", "--seq", "16", "--warmup", "0", "--steps", "1",
                       "--methods", methods, "--peft", "--skip", "infer", "--threads", "1", "--out", str(out)])
    assert code == 0
    training = json.loads(out.read_text())["training"]
    for method in methods.split(","):
        twin = training[f"peft_{method}"]
        if "error" in twin:  # PEFT's prefix tuning needs a transformers whose BERT takes past_key_values
            assert method == "prefix_tuning" and "past key values" in twin["error"], twin
            continue
        assert twin["params_match"] == (method != "vera"), (method, twin)
        if method in bench.SAME_START:
            assert twin["same_start"], (method, twin)


# Our weight name -> PEFT's, for the twins whose weights correspond one to one.
PEFT_NAMES = {"lora": {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"},
              "ia3": {"lora_B": "ia3_l.default"}}
PEFT_NAMES["dora"] = {**PEFT_NAMES["lora"], "m.weight": "lora_magnitude_vector.default.weight"}


@pytest.mark.parametrize("method", list(PEFT_NAMES))
def test_peft_twin_computes_our_function_given_our_weights(bench, method: str) -> None:
    """The twin times the same computation: our adapter's weights, moved off the identity and copied
    into PEFT's, give PEFT's model our outputs (same targets, same scaling, same DoRA norm)."""
    pytest.importorskip("peft")
    import copy

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import adaptercli

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(bench.SHAPES["tiny-bert-shape"]()).eval()
    ours = copy.deepcopy(base)
    adaptercli.init(ours)
    ours.add_adapter("x", method)
    ours.set_active_adapters("x")
    theirs = get_peft_model(copy.deepcopy(base), bench.peft_config(base, method)).eval()
    peft_weights = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in ours.adapter_state.adapter_parameters("x").items():
            weight.add_(0.3 * torch.randn(weight.shape, generator=g))
            module, kind = name.split(".loras.x.")
            twin = peft_weights[f"base_model.model.bert.{module}.{PEFT_NAMES[method][kind]}"]
            twin.copy_(weight.reshape(twin.shape))
    ids = torch.randint(1, 1000, (2, 12), generator=g)
    def last_hidden(model):
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    expected, got = last_hidden(ours), last_hidden(theirs)
    assert (expected - last_hidden(base)).abs().max() > 1e-3  # the adapters do something (100x the tolerance)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
