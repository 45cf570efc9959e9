"""What a run shows of itself: its training curves (``curves.png``) and, for a fusion run, the mean
attention each fusion layer gives each member adapter (``fusion_attention.json``, a heatmap in
``fusion_attention.png``, and a table)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from .data import load_data, make_collator, tokenize_dataset
from .errors import AdapterCliError
from .evaluation import evaluate
from .formats.common import write_json
from .runs import load_run


def plot_curves(history: list[dict[str, Any]], path: Path, metric: str | None) -> None:
    """Training and evaluation loss, and the evaluation ``metric`` (else the task's usual one), by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval" not in h]
    evals = [h for h in history if h.get("eval")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        axes[0].plot(*zip(*train, strict=True), marker="." if len(train) < 20 else None, label="train loss")
    if evals:
        axes[0].plot([h["step"] for h in evals], [h["loss"] for h in evals], "o-", label="eval loss")
        key = metric or next((k for k in ("accuracy", "f1", "pearson", "f1_micro", "rougeL") if k in evals[0]), None)
        if key:
            axes[1].plot([h["step"] for h in evals], [h[key] for h in evals], "o-", color="tab:green")
            axes[1].set_title(f"eval {key}")
    axes[0].set_title("loss")
    axes[0].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def fusion_table(report: dict[str, Any]) -> Table:
    """`fusion_attention_report` as a table: one row per fusion layer, one column per member."""
    table = Table(title=f"fusion '{report['fusion']}': mean attention per member ({report['split']}, "
                        f"{report['examples']} examples)")
    table.add_column("layer")
    for member in report["members"]:
        table.add_column(member, justify="right")
    for place in report["places"]:
        cells = ["—" if math.isnan(place["weights"][m]) else f"{place['weights'][m]:.3f}" for m in report["members"]]
        table.add_row(f"{place['layer']} {place['site']}", *cells)
    table.add_row("mean", *[f"{report['mean'][m]:.3f}" for m in report["members"]], style="bold")
    return table


def fusion_attention_report(run_dir: str | Path, split: str = "validation") -> dict[str, Any]:
    """The mean attention each fusion layer of a fusion run gives each member adapter on ``split``;
    written to ``fusion_attention.json`` and drawn as a heatmap in ``fusion_attention.png``."""
    run = Path(run_dir)
    recipe, model, tokenizer, name = load_run(run)
    if not model.adapter_state.fusions:
        raise AdapterCliError(f"{run}: not a fusion run (its recipe has no composition of type fuse)")
    data = load_data(recipe.data, seed=recipe.train.seed)
    tokenized = tokenize_dataset(data.splits, tokenizer, data.task, recipe.train.max_seq_length)
    collator = make_collator(tokenizer, data.task, seed=recipe.train.seed)
    with model.record_fusion_attention() as recorder:
        evaluate(model, tokenized[split], collator, data.task, data.label_names,
                 recipe.train.eval_batch_size or recipe.train.batch_size, model.device)
    attention = recorder.result()[name]
    report = {**attention.as_dict(), "split": split, "examples": len(tokenized[split]),
              "mean": dict(zip(attention.members, torch.nanmean(attention.weights, 0).tolist(), strict=True))}
    write_json(run / "fusion_attention.json", report)
    _plot_fusion(report, run / "fusion_attention.png")
    return report


def _plot_fusion(report: dict[str, Any], path: Path) -> None:
    """Heatmap: one row per fusion layer, one column per member adapter, the mean attention in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = report["members"]
    rows = [[place["weights"][m] for m in members] for place in report["places"]]
    labels = [f"layer {p['layer']}" + (f" {p['site']}" if p["site"] != "output" else "") for p in report["places"]]
    weights = np.array(rows + [[report["mean"][m] for m in members]])
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(members), 1.2 + 0.42 * len(weights)))
    image = ax.imshow(weights, cmap="viridis", vmin=0, vmax=max(float(np.nanmax(weights)), 1e-6), aspect="auto")
    ax.set_xticks(range(len(members)), members, rotation=30, ha="right")
    ax.set_yticks(range(len(weights)), [*labels, "mean"])
    ax.axhline(len(rows) - 0.5, color="white", linewidth=2)
    for (i, j), value in np.ndenumerate(weights):
        ax.text(j, i, "—" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 * np.nanmax(weights) else "white")
    ax.set_title(f"AdapterFusion '{report['fusion']}': mean attention per member\n"
                 f"({report['split']}, {report['examples']} examples, {report['tokens']:,} tokens)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
