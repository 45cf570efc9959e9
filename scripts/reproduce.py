"""Reproduction jobs: train every method (and full fine-tuning) on the offline tasks and check each
metric against its band.

Each task is a recipe in ``recipes/reproduce/`` with its bands beside it (``<task>.bands.yaml``):
the lowest metric a method may reach in the ``quick`` and in the ``full`` run, set from runs over
several seeds so that noise alone does not fail. A job is the task's recipe with ``adapter.method``
(and that method's learning rate) set; it trains through the library's own `train`, exactly as
`adapter train` does. For every job the metric (best validation score), trainable parameters,
adapter size on disk and wall time are recorded; a metric below its band fails the run, with the
numbers.

    .venv/bin/python scripts/reproduce.py --quick          # CI: one task, subsampled, ~4 min on 2 idle cores
    .venv/bin/python scripts/reproduce.py                  # the table: every task x every method
    .venv/bin/python scripts/reproduce.py --write-docs     # ... and put it in docs/reproduction.md
    .venv/bin/python scripts/reproduce.py --quick --seeds 1,2,3 --no-check --out runs/bands.json   # set bands

``--quick`` is real training on less data: 800 training and 400 validation examples, 60 steps.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "reproduce"
TASKS = ["rotten_tomatoes", "sms_spam", "trec", "vader_movies"]
QUICK_TASKS = ["sms_spam"]  # learns in a few dozen steps: F1 of spam is 0 for "always ham"
# The columns, in AdapterHub's Table 1 order (full fine-tuning first), with each one's learning rate:
# the core seven (the default, and what CI's quick run checks) ...
CORE = {"full": 5e-5, "seq_bn": 1e-3, "double_seq_bn": 1e-3, "par_bn": 1e-3, "seq_bn_inv": 1e-3,
        "lora": 1e-3, "ia3": 3e-3, "prefix_tuning": 1e-3}
# ... and the rest of AdapterHub's methods (`--methods breadth`). Prompt tuning (a few input
# positions), ReFT (rank-1 edits of three positions) and flat prefixes (no reparametrisation) take
# larger steps. VeRA's and DVoRA's stay at LoRA's: AdapterHub trains their b and d as full square
# matrices (started as diagonals), and 1e-2 on a 384 x 384 matrix per layer made the quick run
# collapse to the majority class.
BREADTH = {"scaled_par_bn": 1e-3, "double_seq_bn_inv": 1e-3, "compacter": 3e-3, "compacter++": 3e-3,
           "dora": 1e-3, "vera": 1e-3, "dvora": 1e-3, "prefix_tuning_flat": 5e-3, "prompt_tuning": 3e-2,
           "loreft": 5e-3, "noreft": 5e-3, "direft": 5e-3, "mam": 1e-3, "unipelt": 1e-3}
METHODS = {**CORE, **BREADTH}
GROUPS = {"core": list(CORE), "breadth": list(BREADTH), "all": list(METHODS)}
QUICK = ["data.max_train_samples=800", "data.max_eval_samples=400", "train.max_steps=60", "train.eval_steps=30",
         "train.save_steps=1000", "train.batch_size=16"]


def run_job(task: str, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    """Train one (task, method) job in this process; returns its record."""
    from adaptercli.cli import _quiet_libraries
    from adaptercli.recipe import load_recipe
    from adaptercli.train import train

    _quiet_libraries()  # the libraries' own progress bars; ours stays quiet below

    overrides = [f"adapter.method={method}", f"train.learning_rate={METHODS[method]}", f"train.seed={seed}",
                 f"output_dir={out}", *extra]
    recipe = load_recipe(RECIPES / f"{task}.yaml", overrides)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    train(recipe, console=Console(file=io.StringIO()))  # the progress bar and tables stay quiet
    seconds = time.perf_counter() - started
    key = recipe.train.metric_for_best
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    checkpoint = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    with safe_open(checkpoint / "trainable.safetensors", "pt") as weights:
        trainable = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    adapter_bytes = sum(p.stat().st_size for p in (out / "adapter").glob("adapter*.safetensors"))
    return {"task": task, "method": method, "seed": seed, "metric": key, "value": max(e[key] for e in evals),
            "trainable_params": trainable, "adapter_bytes": adapter_bytes, "seconds": round(seconds, 1)}


def bands_of(task: str) -> dict:
    path = RECIPES / f"{task}.bands.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def check(records: list[dict], mode: str, bands_file: Path | None) -> list[str]:
    """Each record's metric against the lowest value its band allows; returns the failures. A job
    with no band yet (none set from runs) is reported, not failed."""
    failures = []
    for r in records:
        bands = yaml.safe_load(bands_file.read_text()) if bands_file else bands_of(r["task"])
        low = (bands.get(mode) or {}).get(r["method"])
        if low is None:
            print(f"note: {r['task']} / {r['method']}: no {mode} band yet in {r['task']}.bands.yaml (unchecked)",
                  file=sys.stderr)
        elif r["value"] < low:
            failures.append(f"{r['task']} / {r['method']}: {r['metric']} {r['value']:.4f} is below its band "
                            f"(>= {low:.4f}, {mode} run)")
    return failures


def write_bands(records: list[dict], mode: str, stamp: str) -> None:
    """Bands from several seeds: a job fails only when it lands clearly below every seed seen."""
    for task in sorted({r["task"] for r in records}):
        path = RECIPES / f"{task}.bands.yaml"
        bands = bands_of(task)
        for method in sorted({r["method"] for r in records if r["task"] == task}):
            values = [r["value"] for r in records if r["task"] == task and r["method"] == method]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            bands.setdefault(mode, {})[method] = round(max(min(values) - max(0.05, 3 * spread), 0.0), 4)
        bands.setdefault("set_by", {})[mode] = stamp
        path.write_text(f"# Lowest {task} metric each method may reach (scripts/reproduce.py --write-bands).\n"
                        + yaml.safe_dump(bands, sort_keys=False))


def table(records: list[dict], tasks: list[str], methods: list[str]) -> str:
    """AdapterHub Table 1 layout: one row per task, one column per method (mean over seeds)."""
    lines = ["| task (metric) | " + " | ".join("full FT" if m == "full" else m for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for task in tasks:
        cells = []
        metric = yaml.safe_load((RECIPES / f"{task}.yaml").read_text())["train"]["metric_for_best"]
        for method in methods:
            values = [r["value"] for r in records if r["task"] == task and r["method"] == method]
            cells.append(f"{100 * statistics.mean(values):.1f}" if values else "—")
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    params = {m: next((r["trainable_params"] for r in records if r["method"] == m and r["task"] == tasks[0]), None)
              for m in methods}
    lines.append("| trainable params (first task) | " + " | ".join(f"{p:,}" if p else "—" for p in params.values()) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subsampled data, 60 steps, the quick tasks (CI)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated (default: {','.join(TASKS)}; quick: "
                                                      f"{','.join(QUICK_TASKS)})")
    parser.add_argument("--methods", default="core", help="comma-separated columns, or a group: core (full FT and "
                                                           "the seven core methods), breadth, all")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds")
    parser.add_argument("--out", default="runs/reproduce", help="run folders and results.json go here")
    parser.add_argument("--bands", type=Path, default=None, help="one bands file for every task (tests)")
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every job")
    parser.add_argument("--no-check", action="store_true", help="record only (to set bands)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the jobs an earlier, stopped run with the same --out finished (jobs-*.jsonl)")
    parser.add_argument("--write-docs", action="store_true", help="replace the quality table in docs/reproduction.md")
    parser.add_argument("--docs-section", default="reproduce",
                        help="with --write-docs: the table goes between <!-- NAME:start --> and <!-- NAME:end -->")
    parser.add_argument("--results", type=Path, default=None,
                        help="no training: table, docs page and check from a results-*.json an earlier run wrote")
    parser.add_argument("--write-bands", action="store_true",
                        help="set each job's band from this run's seeds (lowest value minus max(0.05, 3 std))")
    args = parser.parse_args(argv)

    mode = "quick" if args.quick else "full"
    tasks = args.tasks.split(",") if args.tasks else (QUICK_TASKS if args.quick else TASKS)
    methods = [m for part in args.methods.split(",") for m in GROUPS.get(part, [part])]
    unknown = [m for m in methods if m not in METHODS] + [t for t in tasks if not (RECIPES / f"{t}.yaml").exists()]
    if unknown:
        parser.error(f"unknown task or method: {', '.join(unknown)}")
    out = Path(args.out)
    extra = (QUICK if args.quick else []) + args.override
    records = []
    started = time.perf_counter()
    jobs = [] if args.results else [(t, m, s) for t in tasks for m in methods for s in map(int, args.seeds.split(","))]
    if args.results:
        saved = json.loads(args.results.read_text())
        records = [r for r in saved["records"] if r["task"] in tasks and r["method"] in methods]
    done_file = out / f"jobs-{mode}.jsonl"  # one line per finished job: a long run can be stopped and resumed
    done = {}
    if args.resume and done_file.exists():
        done = {(r["task"], r["method"], r["seed"]): r for r in map(json.loads, done_file.read_text().splitlines())}
    elif jobs:
        out.mkdir(parents=True, exist_ok=True)
        done_file.write_text("")  # a fresh run forgets the jobs of the last one
    for task, method, seed in jobs:
        record = done.get((task, method, seed))
        if record is None:
            record = run_job(task, method, seed, out / mode / task / f"{method}-seed{seed}", extra)
            with open(done_file, "a") as log:
                log.write(json.dumps(record) + "\n")
        records.append(record)
        print(f"{task:<16} {method:<18} seed {seed:<3} {record['metric']} {record['value']:.4f}  "
              f"{record['trainable_params']:>11,} params  {record['adapter_bytes'] / 1e3:>8.0f} kB  "
              f"{record['seconds']:>6.1f} s", flush=True)
    report = table(records, tasks, methods)
    command = "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = f"{datetime.date.today()}, {machine()}, `{command.strip()}`, {time.perf_counter() - started:.0f} s"
    if args.results:
        stamp = saved["stamp"]
    print(f"\n{report}\n\n{stamp}")
    if not args.results:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"results-{mode}.json").write_text(json.dumps({"records": records, "stamp": stamp}, indent=2) + "\n")
    if args.write_docs:
        start, end = f"<!-- {args.docs_section}:start -->", f"<!-- {args.docs_section}:end -->"
        page = ROOT / "docs" / "reproduction.md"
        text = page.read_text()
        if start not in text or end not in text:
            parser.error(f"docs/reproduction.md has no {start} ... {end} section")
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        page.write_text(f"{head}{start}\n{report}\n\n({stamp})\n{end}{tail}")
    if args.write_bands:
        write_bands(records, mode, stamp)
    failures = [] if args.no_check or args.write_bands else check(records, mode, args.bands)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
