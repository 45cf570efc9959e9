"""The AdapterFusion study (`make fusion-study`): does fusing what other tasks taught beat the best
single source adapter on targets with little data, over seeds, in the layout of Table 1 of
Pfeiffer et al. (2021)?

1. **Data.** Every offline data set gets a source adapter (seq_bn on all-MiniLM-L6-v2, trained on its
   whole training split). Three targets get little data: movie-sentence sentiment
   (``vader_movies_binary``, SST-2-like), Rotten Tomatoes and TREC (6 question types). Each target's
   rows are split once (seed 0) into the **reported** split (its held-out validation rows, 600; TREC has 539),
   a **development** split (500 training rows, used for every choice below) and a pool; seed ``s``
   draws its 500 training rows from the pool. Rows of any target's reported or development split are
   removed from every source's training data, so no source has seen them.
2. **Contenders per target** (the sources are every data set except the target itself; the movie
   ratings ``vader_movies`` count as the movie-sentence target): full fine-tuning; a new seq_bn
   adapter; a new head on each frozen source adapter; a head on the sources' ``Average``; a head on
   the best merge (TIES, DARE, magnitude pruning, ...); AdapterFusion of the frozen sources (its
   own layer and head trained). All train 60 steps of 16 examples (about 2 epochs), evaluated once,
   at the end: no checkpoint is picked on the reported split.
3. **Development phase** (seed 0 rows, scored on the development split): the learning rate of full
   fine-tuning and of the fusion, dynamic or static fusion, which single source is best and which
   merge is best: each target's choices are then fixed.
4. **Reported phase**: each contender, with the choices of step 3, on seeds 0-4, scored on the
   reported split; mean ± sd per target, and the paired difference fusion − best single source
   (the dev-chosen one, and also the best of all sources on each seed, an oracle that favours the
   baseline) with a 95% t confidence interval over seeds, per target and over all (target, seed) pairs.

Runs are made in this process with the library (`adaptercli.train.train`), one at a time; finished
runs are reused, so the study can be stopped and started again.

    .venv/bin/python scripts/fusion_study.py                    # everything, into runs/fusion_study
    .venv/bin/python scripts/fusion_study.py --publish docs     # also copy the tables there
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_RECIPE = ROOT / "recipes" / "vader_movies_fusion.yaml"
SOURCE_RECIPE = ROOT / "recipes" / "fusion_source_seq_bn.yaml"
SOURCES = ["vader_amazon", "vader_tweets", "vader_nyt", "vader_movies", "rotten_tomatoes", "sms_spam", "trec",
           "ner_tweets"]
TARGETS = {"vader_movies_binary": {"vader_movies"}, "rotten_tomatoes": {"rotten_tomatoes"}, "trec": {"trec"}}
TRAIN_ROWS, DEV_ROWS, REPORTED_ROWS = 500, 500, 600
SEEDS = [0, 1, 2, 3, 4]
STEPS = 60
# The development grid. Merges: (strategy, density, weights): "mean" weights each source 1/n (an
# average), "unit" gives each weight 1 without normalising (TIES' disjoint mean, as in its paper).
FULL_LR = [5e-5, 2e-4]
FUSION = [("dynamic", 1e-3), ("static", 1e-3)]
ADAPTER_LR, HEAD_LR = 1e-3, 1e-3
MERGES = [("ties", 0.5, "unit"), ("dare_ties", 0.5, "unit"), ("dare_linear", 0.5, "mean"), ("magnitude_prune", 0.5, "mean")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
    return path


def offline_rows(name: str) -> tuple[list[dict], list[dict], list[str] | None, str]:
    """The train and validation rows (text, label name or value) of an offline data set, split by seed 0."""
    from adaptercli.data import load_data
    from adaptercli.recipe import load_recipe

    data = load_data(load_recipe(SOURCE_RECIPE, [f"data.source={name}", "data.max_eval_samples=null"]).data, seed=0)

    def rows(split) -> list[dict]:
        names = data.label_names
        return [{"text": r["text"], "label": names[r["label"]] if names else r["label"]} for r in split]

    return rows(data.splits["train"]), rows(data.splits["validation"]), data.label_names, data.task


def prepare_data(root: Path) -> dict:
    """Write every split the study reads; returns {target: {labels}, source: {task, labels}}."""
    manifest = root / "data" / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    import random

    info: dict = {"targets": {}, "sources": {}}
    held_out: set[str] = set()
    for target in TARGETS:
        train, validation, labels, _ = offline_rows(target)
        random.Random(0).shuffle(train)
        random.Random(0).shuffle(validation)
        folder = root / "data" / "targets" / target
        reported = validation[:REPORTED_ROWS]
        write_jsonl(folder / "reported.jsonl", reported)
        seen = {row["text"] for row in reported}
        dev = [row for row in train if row["text"] not in seen][:DEV_ROWS]
        write_jsonl(folder / "dev.jsonl", dev)
        seen |= {row["text"] for row in dev}  # the sets repeat some sentences: no copy of one may be drawn
        pool = [row for row in train if row["text"] not in seen]
        for seed in SEEDS:
            write_jsonl(folder / f"train_seed{seed}.jsonl", random.Random(seed).sample(pool, TRAIN_ROWS))
        held_out |= seen
        info["targets"][target] = {"labels": labels, "pool": len(pool)}
    for source in SOURCES:
        if source == "ner_tweets":  # tagging rows are word lists: trained from the offline set directly
            info["sources"][source] = {"task": "tagging", "labels": None, "removed": 0}
            continue
        train, validation, labels, task = offline_rows(source)
        kept = [row for row in train if row["text"] not in held_out]
        checks = [row for row in validation if row["text"] not in held_out][:500]
        if len(checks) < 100:  # a target's own validation rows are its reported split: check on training rows
            kept, checks = kept[:-300], kept[-300:]
        folder = root / "data" / "sources" / source
        write_jsonl(folder / "train.jsonl", kept)
        write_jsonl(folder / "validation.jsonl", checks)
        info["sources"][source] = {"task": task, "labels": labels, "removed": len(train) - len(kept)}
    manifest.write_text(json.dumps(info, indent=2) + "\n")
    return info


def run(overrides: list[str], out: Path, recipe: Path = BASE_RECIPE) -> float:
    """Train one run in this process (reused when finished); returns the accuracy of its last evaluation."""
    if not (out / "adapter").is_dir() and not (out / "model").is_dir():
        from rich.console import Console

        from adaptercli.cli import _quiet_libraries
        from adaptercli.recipe import load_recipe
        from adaptercli.train import train

        _quiet_libraries()
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        print(f"  {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ...", end="", flush=True)
        train(load_recipe(recipe, [*overrides, f"output_dir={out}"]), console=Console(file=io.StringIO()))
        print(f" {time.perf_counter() - started:.0f} s", flush=True)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return evals[-1].get("accuracy", float("nan"))


def listing(values: list) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def train_sources(root: Path, info: dict) -> None:
    print("source adapters", flush=True)
    for source in SOURCES:
        meta = info["sources"][source]
        data = [f"data.source={source}"] if source == "ner_tweets" else [
            "data.source=jsonl", f"data.train_file={root}/data/sources/{source}/train.jsonl",
            f"data.validation_file={root}/data/sources/{source}/validation.jsonl", f"data.task={meta['task']}",
            *([f"data.labels={listing(meta['labels'])}"] if meta["labels"] else [])]
        run([*data, f"adapter.name={source}", "data.max_eval_samples=300"], root / "sources" / source,
            recipe=SOURCE_RECIPE)


def target_overrides(root: Path, info: dict, target: str, seed: int, scored_on: str) -> list[str]:
    folder = root / "data" / "targets" / target
    return ["composition=null", "data.source=jsonl", f"data.train_file={folder}/train_seed{seed}.jsonl",
            f"data.validation_file={folder}/{scored_on}.jsonl", "data.task=classification",
            f"data.labels={listing(info['targets'][target]['labels'])}", "data.max_train_samples=null",
            "data.max_eval_samples=null", f"train.seed={seed}", f"train.max_steps={STEPS}",
            f"train.eval_steps={STEPS}", f"train.save_steps={STEPS}", "train.metric_for_best=null",
            f"adapter.name={target}"]


def sources_of(root: Path, target: str) -> list[str]:
    return [str(root / "sources" / s) for s in source_names(target)]


def merged_folder(root: Path, target: str, merge: tuple) -> Path:
    """The sources of `target` merged by `merge` (written once; DARE's masks seeded by 0)."""
    from adaptercli.combine import merge_sources

    strategy, density, weighting = merge
    dest = root / "merges" / target / ("average" if strategy == "linear" else f"{strategy}_{density}_{weighting}")
    if not (dest / "adapter_config.json").exists():
        sources = [f"{s}/adapter" for s in sources_of(root, target)]
        weights = [1.0] * len(sources)
        merge_sources(sources, dest, strategy=strategy, weights=weights, normalize_weights=weighting != "unit",
                      density=density, seed=0, name="merged", force=True)
    return dest


def contender_overrides(root: Path, target: str, kind: str, choice) -> list[str]:
    """Overrides of one contender: kind is full, adapter, probe (choice: source), merge (choice: merge
    tuple) or fusion (choice: (config, lr))."""
    if kind == "full":
        return ["adapter.method=full", f"train.learning_rate={choice}"]
    if kind == "adapter":
        return ["adapter.method=seq_bn", f"train.learning_rate={ADAPTER_LR}"]
    if kind == "probe":
        return [f"adapter.load={root}/sources/{choice}/adapter", "adapter.freeze=true", f"train.learning_rate={HEAD_LR}"]
    if kind == "merge":
        return [f"adapter.load={merged_folder(root, target, choice)}", "adapter.freeze=true",
                f"train.learning_rate={HEAD_LR}"]
    config, lr = choice
    return ["composition.type=fuse", f"composition.adapters={listing(sources_of(root, target))}",
            f"composition.kwargs.config={config}", f"train.learning_rate={lr}"]


def label(kind: str, choice) -> str:
    if kind in ("full",):
        return f"full_lr{choice:g}"
    if kind == "merge":
        strategy, density, weighting = choice
        return "average" if strategy == "linear" else f"merge_{strategy}_{density}_{weighting}"
    if kind == "fusion":
        return f"fusion_{choice[0]}_lr{choice[1]:g}"
    return kind if choice is None else f"{kind}_{choice}"


def score(root: Path, info: dict, target: str, seed: int, scored_on: str, kind: str, choice) -> float:
    phase = "dev" if scored_on == "dev" else f"seed{seed}"
    out = root / "runs" / target / phase / label(kind, choice)
    return run([*target_overrides(root, info, target, seed, scored_on), *contender_overrides(root, target, kind, choice)],
               out)


def development(root: Path, info: dict, target: str) -> dict:
    """Scores every option of the grid on the development split; returns the choices."""
    print(f"development phase: {target}", flush=True)
    dev = {}
    grid = [("full", lr) for lr in FULL_LR] + [("fusion", f) for f in FUSION]
    grid += [("probe", s) for s in source_names(target)]
    grid += [("merge", m) for m in [("linear", None, "mean"), *MERGES]]
    for kind, choice in grid:
        dev[label(kind, choice)] = (kind, choice, score(root, info, target, 0, "dev", kind, choice))

    def best(kind: str, among=None):
        options = [(v[2], v[1]) for v in dev.values() if v[0] == kind and (among is None or among(v[1]))]
        return max(options, key=lambda o: o[0])[1]

    return {"full": best("full"), "fusion": best("fusion"), "probe": best("probe"),
            "merge": best("merge", lambda m: m[0] != "linear"),
            "dev_scores": {k: v[2] for k, v in dev.items()}}


def columns(choices: dict, target: str, oracle: bool) -> dict:
    """The reported contenders of a target: {column: (kind, choice)} (with ``oracle``, every source's head)."""
    chosen = {"full": ("full", choices["full"]), "adapter": ("adapter", None), "probe": ("probe", choices["probe"]),
              "average": ("merge", ("linear", None, "mean")), "merge": ("merge", choices["merge"]),
              "fusion": ("fusion", choices["fusion"])}
    if oracle:
        chosen |= {f"probe_{s}": ("probe", s) for s in source_names(target) if s != choices["probe"]}
    return chosen


def reported(root: Path, info: dict, choices: dict, seeds: list[int], oracle: bool) -> dict:
    """Each contender's accuracy on the reported split: seed by seed over all targets, so a study cut
    short still has every target on its finished seeds."""
    results = {t: {name: [] for name in columns(c, t, oracle)} for t, c in choices.items()}
    for seed in seeds:
        print(f"reported phase: seed {seed}", flush=True)
        for target, chosen in choices.items():
            for name, (kind, choice) in columns(chosen, target, oracle).items():
                results[target][name].append(score(root, info, target, seed, "reported", kind, choice))
    if oracle:
        for target_results in results.values():
            probes = [v for n, v in target_results.items() if n.startswith("probe")]
            target_results["probe_oracle"] = [max(p[i] for p in probes) for i in range(len(seeds))]
    return results


def source_names(target: str) -> list[str]:
    return [s for s in SOURCES if s not in TARGETS[target] and s != target]


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b and its 95% t confidence interval."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


COLUMNS = [("full", "Full FT"), ("adapter", "new adapter"), ("probe", "head on best source (dev)"),
           ("average", "Average"), ("merge", "best merge (dev)"), ("fusion", "Fusion")]


def mean_sd(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def signed(interval: tuple[float, float, float]) -> str:
    mean, low, high = (100 * v for v in interval)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def describe(choice) -> str:
    if isinstance(choice, float):
        return f"lr {choice:g}"
    if isinstance(choice, (list, tuple)) and len(choice) == 3:
        strategy, density, weighting = choice
        return strategy if density is None else f"{strategy} {density:g} ({weighting} weights)"
    if isinstance(choice, (list, tuple)):
        return f"{choice[0]}, lr {choice[1]:g}"
    return str(choice)


def report(study: dict, seeds: list[int], seconds: float) -> tuple[str, dict]:
    """The Table-1-like markdown and the JSON payload of a finished study."""
    oracle = all("probe_oracle" in s["results"] for s in study.values())
    head = ["target (500 training rows)", *(name for _, name in COLUMNS)] + (["best source (oracle)"] if oracle else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    keys = [key for key, _ in COLUMNS] + (["probe_oracle"] if oracle else [])
    for target, s in study.items():
        lines.append(f"| {target} | " + " | ".join(mean_sd(s["results"][k]) for k in keys) + " |")
    means = {k: [statistics.fmean(s["results"][k][i] for s in study.values()) for i in range(len(seeds))] for k in keys}
    lines.append("| **mean** | " + " | ".join(f"**{mean_sd(means[k])}**" for k in keys) + " |")
    diffs = ["", "| paired difference, 95% CI (points) | fusion − best source (dev) | fusion − Average | fusion − new adapter |"
             + (" fusion − best source (oracle) |" if oracle else ""), "|---|---:|---:|---:|" + ("---:|" if oracle else "")]
    payload_diffs = {}
    pooled = {k: [v for s in study.values() for v in s["results"][k]] for k in keys}
    for target, results in [*((t, s["results"]) for t, s in study.items()), ("all (target, seed) pairs", pooled)]:
        compare = ["probe", "average", "adapter"] + (["probe_oracle"] if oracle else [])
        intervals = [paired(results["fusion"], results[k]) for k in compare]
        payload_diffs[target] = dict(zip(compare, intervals, strict=True))
        diffs.append(f"| {target} | " + " | ".join(signed(i) for i in intervals) + " |")
    choices = ["", "| target | choices made on the development split |", "|---|---|"]
    for target, s in study.items():
        c = s["choices"]
        choices.append(f"| {target} | full FT {describe(c['full'])}; fusion {describe(c['fusion'])}; best source "
                       f"{c['probe']}; best merge {describe(c['merge'])} |")
    choices += ["", "| target | accuracy on the development split (seed-0 training rows), each option |", "|---|---|"]
    for target, s in study.items():
        scores = sorted(s["choices"]["dev_scores"].items(), key=lambda kv: -kv[1])
        choices.append(f"| {target} | " + ", ".join(f"{name} {100 * value:.1f}" for name, value in scores) + " |")
    footer = (f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), accuracy on 600 held-out rows per "
              f"target (TREC 539), mean ± sd over seeds; {STEPS} steps of 16 for every contender. `make fusion-study` "
              f"({date.today().isoformat()}, {os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}; "
              f"this invocation trained for {seconds / 60:.0f} min, finished runs are reused).")
    payload = {"seeds": seeds, "steps": STEPS, "study": study, "paired": payload_diffs}
    return "\n".join(lines + diffs + choices) + "\n" + footer + "\n", payload


def attention_means(root: Path, study: dict) -> str:
    """The mean fusion attention of each target's seed-0 fusion (which sources it reads)."""
    rows = ["", "| target | mean fusion attention per source (seed 0, reported run) |", "|---|---|"]
    for target, s in study.items():
        run_dir = root / "runs" / target / "seed0" / label("fusion", s["choices"]["fusion"])
        found = run_dir / "fusion_attention.json"
        if found.exists():
            mean = json.loads(found.read_text())["mean"]
            rows.append(f"| {target} | " + ", ".join(f"{Path(m).name} {w:.2f}" for m, w in
                                                    sorted(mean.items(), key=lambda kv: -kv[1])) + " |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/fusion_study", help="where data, runs and results go")
    parser.add_argument("--publish", default=None, help="copy fusion_study.md and fusion_study.json here")
    parser.add_argument("--oracle", action="store_true", help="also train every source's head on every seed "
                        "(the best single source picked on the reported split; 6 more runs per seed and target)")
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=SEEDS,
                        help="comma-separated seeds to report (default 0,1,2,3,4)")
    args = parser.parse_args()
    root = (ROOT / args.root).resolve()
    started = time.perf_counter()
    info = prepare_data(root)
    train_sources(root, info)
    choices = {target: development(root, info, target) for target in TARGETS}
    results = reported(root, info, choices, args.seeds, args.oracle)
    study = {target: {"choices": choices[target], "results": results[target]} for target in TARGETS}
    markdown, payload = report(study, args.seeds, time.perf_counter() - started)
    markdown += attention_means(root, study)
    print("\n" + markdown)
    (root / "fusion_study.md").write_text(markdown)
    (root / "fusion_study.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.publish:
        publish = ROOT / args.publish
        publish.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "fusion_study.md", publish / "fusion_study.md")
        shutil.copy(root / "fusion_study.json", publish / "fusion_study.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
