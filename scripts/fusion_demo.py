"""The offline AdapterFusion demo: train source adapters, fuse them for a target task with little
data, and compare the fusion with the best single source adapter (`make fusion-demo`).

1. Source adapters (seq_bn on all-MiniLM-L6-v2), one per offline data set, with
   ``recipes/fusion_source_seq_bn.yaml``: Amazon-review, tweet and news-editorial sentiment
   (regression on the VADER ratings).
2. The target, movie-sentence sentiment (``vader_movies_binary``, SST-2-like) from only 500 training
   sentences, with the same budget (steps, learning rate, batch, evaluations) for every contender:
   * ``fusion``: ``recipes/vader_movies_fusion.yaml``, an AdapterFusion over the three frozen sources;
   * ``head on <source>``: each source adapter frozen, a new head trained on the target (a probe of
     what that one adapter knows; the AdapterFusion paper's "single adapter" comparison);
   * ``new adapter``: a fresh seq_bn adapter trained on the 500 sentences alone (the paper's ST-A).
3. Each run's best validation accuracy (held-out sentences) goes into a table, beside the
   fusion's attention heatmap.

Runs already finished are reused, so the script can be stopped and started again. Every run is a
plain `adapter train` / `adapter fuse` command, printed before it starts.

    .venv/bin/python scripts/fusion_demo.py                      # everything, into runs/fusion_demo
    .venv/bin/python scripts/fusion_demo.py --publish docs       # also copy the table and heatmap there
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["vader_amazon", "vader_tweets", "vader_nyt"]
TARGET = "vader_movies_binary"


def adapter(*args: str) -> float:
    """Run one `adapter` command (skipping it when its run folder is finished); returns seconds."""
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    if (out / "adapter").is_dir():
        print(f"[done before] {out}", flush=True)
        return 0.0
    resume = ["--resume"] if (out / "checkpoints/latest.json").exists() else []
    command = [sys.executable, "-m", "adaptercli", *args, *resume]
    print("$ adapter " + " ".join([*args, *resume]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def best_accuracy(run: Path) -> tuple[float, int]:
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    best = max(evals, key=lambda e: e["accuracy"])
    return best["accuracy"], best["step"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/fusion_demo", help="where the runs go (relative to the repository)")
    parser.add_argument("--publish", default=None, help="copy results.md, results.json and the heatmap here")
    args = parser.parse_args()
    root = Path(args.root)
    seconds: dict[str, float] = {}  # of the runs this invocation made (finished ones are reused)

    for source in SOURCES:
        seconds[f"source {source}"] = adapter("train", "recipes/fusion_source_seq_bn.yaml", f"data.source={source}",
                                              f"adapter.name={source}", f"output_dir={root}/sources/{source}")
    members = "[" + ",".join(f"{root}/sources/{s}" for s in SOURCES) + "]"
    runs = {"fusion": root / "fusion"}
    seconds["fusion"] = adapter("fuse", "recipes/vader_movies_fusion.yaml", f"composition.adapters={members}",
                                f"output_dir={runs['fusion']}")
    target = ["recipes/vader_movies_fusion.yaml", "composition=null"]
    for source in SOURCES:
        runs[f"head on {source}"] = root / f"probe_{source}"
        seconds[f"head on {source}"] = adapter(
            "train", *target, f"adapter.load={root}/sources/{source}/adapter", "adapter.freeze=true",
            f"output_dir={runs[f'head on {source}']}")
    runs["new adapter"] = root / "single"
    seconds["new adapter"] = adapter("train", *target, "adapter.method=seq_bn",
                                     f"output_dir={runs['new adapter']}")

    results = {name: dict(zip(("accuracy", "best_step"), best_accuracy(run), strict=True)) for name, run in runs.items()}
    probes = {k: v for k, v in results.items() if k.startswith("head on")}
    best_single = max(probes, key=lambda k: probes[k]["accuracy"])
    margin = results["fusion"]["accuracy"] - probes[best_single]["accuracy"]
    attention = json.loads((runs["fusion"] / "fusion_attention.json").read_text())
    lines = ["| target: movie sentiment, 500 training sentences | best validation accuracy | best step |",
             "|---|---:|---:|"]
    for name, r in sorted(results.items(), key=lambda item: -item[1]["accuracy"]):
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['best_step']} |")
    summary = (f"fusion {results['fusion']['accuracy']:.3f} vs best single source adapter ({best_single}) "
               f"{probes[best_single]['accuracy']:.3f}: {'+' if margin >= 0 else ''}{100 * margin:.1f} points")
    mean = ", ".join(f"{m} {w:.2f}" for m, w in sorted(attention["mean"].items(), key=lambda kv: -kv[1]))
    report = "\n".join([*lines, "", summary, f"mean fusion attention: {mean}"])
    print("\n" + report)
    print("wall time of the runs made now: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if v))
    (root / "results.md").write_text(report + "\n")
    payload = {"results": results, "best_single": best_single, "margin": margin,
               "attention_mean": attention["mean"]}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.publish:
        publish = Path(args.publish)
        publish.mkdir(parents=True, exist_ok=True)
        shutil.copy(runs["fusion"] / "fusion_attention.png", publish / "fusion_attention.png")
        shutil.copy(root / "results.md", publish / "fusion_demo.md")
        shutil.copy(root / "results.json", publish / "fusion_demo.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
