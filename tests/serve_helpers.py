"""Tiny trained runs for the `adapter serve` tests: one per method, on one tiny BERT."""

from __future__ import annotations

from pathlib import Path

from conftest import write_recipe
from rich.console import Console

from adaptercli.recipe import load_recipe
from adaptercli.train import train

# Mixed families: all but prompt tuning share batches (prompt tuning runs in batches of its own).
METHODS = {"lora": {"r": 4, "alpha": 16}, "seq_bn": {}, "prefix_tuning": {"prefix_length": 4, "bottleneck_size": 16},
           "ia3": {}, "mam": {}, "dora": {"r": 4}, "prompt_tuning": {"prompt_length": 3}, "loreft": {}}


def train_runs(root: Path, model: Path, train_file: Path, methods: dict[str, dict] = METHODS) -> dict[str, Path]:
    """Train each method for two steps (enough to move every adapter off its start)."""
    runs = {}
    for method, config in methods.items():
        folder = root / method
        recipe = write_recipe(folder, model, train_file, method=method, config=config, name=f"{method}_run",
                              max_steps=2, eval_steps=2, save_steps=2, learning_rate=5e-2)
        train(load_recipe(recipe), console=Console(quiet=True))
        runs[method] = folder / "run"
    return runs
