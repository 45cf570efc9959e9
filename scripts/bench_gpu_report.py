"""Join the per-model JSON files of ``scripts/bench_gpu.sh`` into one JSON and one markdown table.

    python scripts/bench_gpu_report.py OUT.json OUT.md bert-base-shape.json llama-1b-shape.json

Per model and setting: samples/s, step time, peak GPU memory, speedup over full fine-tuning, share
of ``ideal``, and for our LoRA its throughput and peak memory against PEFT's LoRA in the same run,
with issue 21's targets (>= 1.15x PEFT's LoRA, no more memory than it; >= 1.5x full fine-tuning on
the Llama shape, >= 1.3x on BERT-base).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = ("ideal", "full", "lora", "seq_bn", "prefix_tuning", "peft_lora")
PEFT_SPEED_TARGET = 1.15


def summarise(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of one model's run, in ``ORDER``, with our LoRA against PEFT's added."""
    training = report["training"]
    rows = {s: dict(training[s]) for s in ORDER if s in training}
    ours, theirs = rows.get("lora", {}), rows.get("peft_lora", {})
    if "samples_per_s" in ours and "samples_per_s" in theirs:
        ours["vs_peft_lora"] = ours["samples_per_s"] / theirs["samples_per_s"]
        if ours.get("peak_gib") and theirs.get("peak_gib"):
            ours["memory_vs_peft_lora"] = ours["peak_gib"] / theirs["peak_gib"]
    return rows


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _check(value: float | None, target: float | None, at_most: bool = False) -> str:
    if value is None or target is None:
        return ""
    met = value <= target if at_most else value >= target
    return f" {'✓' if met else '✗'}"


def markdown(joined: dict[str, Any]) -> str:
    lines = []
    for model, run in joined["runs"].items():
        args, machine = run["args"], run["machine"]
        lines += [f"**{model}**, batch {args['batch']} × {args['seq']}, {machine['device_name']}, "
                  f"{'bf16 autocast' if args['bf16'] else 'fp32'}, {args['warmup']} warmup + {args['steps']} timed "
                  f"steps per setting ({args['schedule']}); torch {machine['torch']}, transformers "
                  f"{machine['transformers']}, peft {machine.get('peft', 'not installed')}", "",
                  "| setting | trainable params | samples/s | step ms | peak GiB | × full FT (target) | % of ideal "
                  "| × PEFT LoRA (≥ 1.15) | memory / PEFT LoRA (≤ 1) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for setting, r in run["rows"].items():
            if "error" in r:
                lines.append(f"| {setting} | error: {r['error'][:100]} | | | | | | | |")
                continue
            speedup = r.get("speedup")
            target = r.get("target")
            speed = "—" if speedup is None else (f"{speedup:.2f}{_check(speedup, target)}"
                                                 + (f" ({target})" if target else ""))
            of_ideal = _num(None if r.get("of_ideal") is None else 100 * r["of_ideal"], ".1f")
            vs_peft = r.get("vs_peft_lora")
            memory = r.get("memory_vs_peft_lora")
            lines.append(f"| {setting} | {r['trainable_params']:,} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                         f"{_num(r.get('peak_gib'), '.2f')} | {speed} | {of_ideal} | "
                         f"{_num(vs_peft, '.2f')}{_check(vs_peft, PEFT_SPEED_TARGET)} | "
                         f"{_num(memory, '.2f')}{_check(memory, 1.0, at_most=True)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_json, out_md, parts = Path(argv[0]), Path(argv[1]), [Path(p) for p in argv[2:]]
    runs = {}
    for part in parts:
        report = json.loads(part.read_text())
        runs[report["args"]["model"]] = {"args": report["args"], "machine": report["machine"],
                                         "seconds": report["seconds"], "rows": summarise(report)}
    joined = {"runs": runs}
    out_json.write_text(json.dumps(joined, indent=2) + "\n")
    out_md.write_text(markdown(joined))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
