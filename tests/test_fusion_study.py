"""scripts/fusion_study.py: the splits it writes keep every reported and development row away from
the sources and from the training draws, and its paired intervals follow the t formula."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("fusion_study", ROOT / "scripts" / "fusion_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_paired_interval_is_the_t_interval_of_the_differences(study):
    fusion, single = [0.80, 0.82, 0.79, 0.85, 0.81], [0.78, 0.80, 0.80, 0.81, 0.80]
    diffs = [0.02, 0.02, -0.01, 0.04, 0.01]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    got = study.paired(fusion, single)
    assert got == pytest.approx((mean, mean - half, mean + half), abs=1e-7)


def test_reported_and_development_rows_never_reach_training(study, tmp_path):
    info = study.prepare_data(tmp_path)
    held_out: set[str] = set()
    for target in study.TARGETS:
        folder = tmp_path / "data" / "targets" / target
        reported, dev = rows(folder / "reported.jsonl"), rows(folder / "dev.jsonl")
        assert 500 <= len(reported) <= study.REPORTED_ROWS and len(dev) == study.DEV_ROWS  # TREC holds out 539
        labels = set(info["targets"][target]["labels"])
        own = {r["text"] for r in reported} | {r["text"] for r in dev}
        draws = [rows(folder / f"train_seed{seed}.jsonl") for seed in study.SEEDS]
        for draw in draws:
            assert len(draw) == study.TRAIN_ROWS and {r["label"] for r in draw} <= labels
            assert not own & {r["text"] for r in draw}
        assert draws[0] != draws[1]  # each seed draws its own rows
        held_out |= own
    for source, meta in info["sources"].items():
        if meta["task"] == "tagging":
            continue
        trained = {r["text"] for r in rows(tmp_path / "data" / "sources" / source / "train.jsonl")}
        checked = {r["text"] for r in rows(tmp_path / "data" / "sources" / source / "validation.jsonl")}
        assert trained and not trained & held_out, source
        assert len(checked) >= 100 and not checked & held_out, source  # TREC's own validation rows are held out
    # Rotten Tomatoes and the VADER movie sentences share sentences: some had to be removed
    assert info["sources"]["rotten_tomatoes"]["removed"] > study.DEV_ROWS
