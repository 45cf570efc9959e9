"""The reproduction job's check: a metric below its band fails the run (exit code 1, with the
numbers); within its band it passes; the same seed reproduces the same metric."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_a_metric_below_its_band_fails_with_the_numbers(tmp_path: Path, tiny_bert_dir: Path, capsys) -> None:
    tiny = [f"--override=model.name_or_path={tiny_bert_dir}", "--override=train.max_steps=4",
            "--override=data.max_train_samples=64", "--override=data.max_eval_samples=32"]
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(yaml.safe_dump({"quick": {"lora": 1.01}}))  # accuracy cannot exceed 1
    code = reproduce.main(["--quick", "--methods", "lora", "--out", str(tmp_path / "a"), "--bands", str(unreachable),
                           *tiny])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAIL sms_spam / lora: f1" in err and "is below its band (>= 1.0100, quick run)" in err

    results = json.loads((tmp_path / "a" / "results-quick.json").read_text())["records"]
    reachable = tmp_path / "reachable.yaml"
    reachable.write_text(yaml.safe_dump({"quick": {"lora": results[0]["value"] - 0.01}}))
    code = reproduce.main(["--quick", "--methods", "lora", "--out", str(tmp_path / "b"), "--bands", str(reachable),
                           *tiny])
    assert code == 0
    record = json.loads((tmp_path / "b" / "results-quick.json").read_text())["records"][0]
    assert record["value"] == results[0]["value"]  # the same seed reproduces the same metric
    assert record["trainable_params"] > 0 and record["adapter_bytes"] > 0 and record["seconds"] > 0


def test_every_quick_job_has_a_band_set_from_several_seeds() -> None:
    """CI's quick run checks each core column against a band; a missing one would pass unchecked."""
    for task in reproduce.QUICK_TASKS:
        bands = reproduce.bands_of(task)
        assert set(reproduce.CORE) <= set(bands.get("quick", {})), task
        assert all(0 < low < 1 for low in bands["quick"].values())
        assert "--seeds 1,2,3" in bands["set_by"]["quick"]  # noise over seeds, not one run
