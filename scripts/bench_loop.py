"""The training loop's own cost: ``adaptercli.train.train()`` against the bare step of the same model.

What a user runs is ``adapter train``: besides the step itself (forward, backward, AdamW), the loop
picks and pads each batch, clips the gradients, steps the learning-rate schedule, reads the loss,
moves the progress bar and writes the log. This runs the real ``train()`` on a recipe whose every
batch has the same length (texts longer than ``max_seq_length``, so every row is cut to it) and,
in the same process on the same model and optimizer, the bare step of ``scripts/bench.py``
(forward, backward, ``optimizer.step``, ``zero_grad`` on one fixed batch). The loop's time per
step is the time between two optimizer steps, less any evaluation or checkpoint in
between: those two are timed on their own and reported as their own rows.

``interleaved`` (CPU): one bare step runs right after each of the loop's optimizer steps, so drift
in the machine's speed hits both alike; ``sequential``: all bare steps first, then the loop.

Used by ``scripts/bench.py --loop METHODS`` (the model shape is ``--model``'s, a BERT one: the
recipe uses MiniLM's tokenizer and a classification head).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModel

import adaptercli.train as loop
from adaptercli.assets import resolve_model_path
from adaptercli.evaluation import collate
from adaptercli.recipe import load_recipe

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge every box of "
         "frozen liquor and many other things that people say in long reviews of films").split()


def write_model(config, folder: Path, seed: int) -> None:
    """A randomly initialised backbone of ``config``'s shape with MiniLM's tokenizer (30,522 word pieces)."""
    if config.model_type != "bert":
        raise SystemExit(f"--loop: the loop benchmark runs BERT shapes (MiniLM's tokenizer); not {config.model_type}")
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    minilm = Path(resolve_model_path("minilm"))
    for name in TOKENIZER_FILES:
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)


def write_data(path: Path, rows: int, words: int) -> None:
    """``rows`` texts of ``words`` words (more tokens than max_seq_length: every row is cut to it)."""
    with open(path, "w") as out:
        for i in range(rows):
            text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            out.write(json.dumps({"text": text, "label": i % 2}) + "\n")


class Clock:
    """The loop's time from one optimizer step to the next, evaluation and checkpoint time taken
    out, and the bare step's times (on CUDA each bare step ends in a sync, as the loop's steps end
    in reading the loss)."""

    def __init__(self, args, interleaved: bool):
        self.args, self.interleaved = args, interleaved
        self.loop_s: list[float] = []  # between two optimizer steps, less evaluation and checkpoint
        self.bare_s: list[float] = []
        self.eval_s: list[float] = []
        self.checkpoint_s: list[float] = []
        self.mark = 0.0
        self.excluded = 0.0  # evaluation and checkpoint time since the last mark
        self.batch: dict[str, torch.Tensor] | None = None
        self.optimizer_step: Callable = lambda: None  # the optimizer's own step, for the bare step

    def timed(self, into: list[float], function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                into.append(took)
                self.excluded += took

        return wrapper

    def bare_step(self, run) -> float:
        """bench.py's step on the loop's own model and optimizer: forward, backward, step, zero_grad."""
        run.optimizer.zero_grad(set_to_none=True)  # the loop's step is done with its gradients
        start = time.perf_counter()
        with run.accelerator.autocast():
            loss = run.model(**self.batch).loss
        run.accelerator.backward(loss)
        self.optimizer_step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def set_up(self, original: Callable) -> Callable:
        """``_set_up``, then: a fixed batch for the bare step, the bare steps (sequential), and the
        optimizer's step timed (interleaved: followed by one bare step). The optimizer, not the
        schedule, is wrapped: a checkpoint writes the schedule's attributes as JSON."""

        def wrapper(*args: Any, **kwargs: Any):
            run, progress = original(*args, **kwargs)
            indices = list(range(run.recipe.train.batch_size))
            whole = collate(run.collator, run.train_split, indices)
            self.batch = {k: v.to(run.accelerator.device) for k, v in whole.items()}
            run.model.train()
            self.optimizer_step = run.optimizer.step
            if not self.interleaved:
                for _ in range(self.args.warmup):
                    self.bare_step(run)
                self.bare_s = [self.bare_step(run) for _ in range(self.args.steps)]

            def timed_step(*a: Any, **k: Any) -> Any:
                out = self.optimizer_step(*a, **k)
                now = time.perf_counter()
                self.loop_s.append(now - self.mark - self.excluded)
                if self.interleaved:
                    self.bare_s.append(self.bare_step(run))
                self.mark, self.excluded = time.perf_counter(), 0.0
                return out

            run.optimizer.step = timed_step
            self.mark = time.perf_counter()
            return run, progress

        return wrapper


def run_loop(method: str, config, args, stat: Callable[[list[float]], float]) -> dict[str, Any]:
    """Train ``method`` with ``train()`` for ``--warmup`` + ``--steps`` steps, evaluating and saving a
    checkpoint halfway, and return the loop's and the bare step's time per step (the warmup steps
    left out), the overhead in % and the evaluation and checkpoint times."""
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_model(config, folder / "model", args.seed)
        write_data(folder / "train.jsonl", rows=args.batch * total, words=2 * args.seq)
        write_data(folder / "validation.jsonl", rows=args.loop_eval_samples, words=2 * args.seq)
        every = max(1, total // 2)
        overrides = [f"model.name_or_path={folder / 'model'}", f"adapter.method={method}", "adapter.name=bench",
                     f"data.train_file={folder / 'train.jsonl'}", f"data.validation_file={folder / 'validation.jsonl'}",
                     "data.text_column=text", "data.label_column=label", f"train.batch_size={args.batch}",
                     f"train.max_steps={total}", f"train.max_seq_length={args.seq}", f"train.eval_steps={every}",
                     f"train.save_steps={every}", "train.learning_rate=1e-5", f"train.seed={args.seed}",
                     f"train.mixed_precision={'bf16' if args.bf16 else 'no'}", f"output_dir={folder / 'run'}"]
        recipe_file = folder / "recipe.yaml"
        recipe_file.write_text("adapter: {}\n")
        recipe = load_recipe(recipe_file, overrides)
        clock = Clock(args, interleaved=args.schedule == "interleaved")
        saved = {name: getattr(loop, name) for name in ("_set_up", "_evaluate", "_write_checkpoint")}
        loop._set_up = clock.set_up(saved["_set_up"])
        loop._evaluate = clock.timed(clock.eval_s, saved["_evaluate"])
        loop._write_checkpoint = clock.timed(clock.checkpoint_s, saved["_write_checkpoint"])
        try:
            loop.train(recipe, console=Console(file=sys.stderr))
        finally:
            for name, function in saved.items():
                setattr(loop, name, function)
    # loop_s[i] is step i + 1: from just after step i's optimizer step (and bare step) to step i + 1's.
    timed_loop = clock.loop_s[args.warmup:]
    timed_bare = clock.bare_s[args.warmup:] if clock.interleaved else clock.bare_s
    loop_step, bare_step = stat(timed_loop), stat(timed_bare)
    return {"method": method, "loop_step_ms": 1000 * loop_step, "bare_step_ms": 1000 * bare_step,
            "overhead_pct": 100 * (loop_step / bare_step - 1), "loop_steps_ms": [round(1000 * s, 2) for s in timed_loop],
            "bare_steps_ms": [round(1000 * s, 2) for s in timed_bare],
            "evaluation_ms": [round(1000 * s, 1) for s in clock.eval_s], "eval_samples": args.loop_eval_samples,
            "checkpoint_ms": [round(1000 * s, 1) for s in clock.checkpoint_s]}


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| loop (train()) against the bare step | ms | overhead |", "|---|---:|---:|"]
    for method, r in rows.items():
        if "error" in r:
            lines.append(f"| {method} | error: {r['error'][:80]} | |")
            continue
        lines.append(f"| {method}: bare step | {r['bare_step_ms']:.1f} | |")
        lines.append(f"| {method}: loop step (no evaluation, no checkpoint) | {r['loop_step_ms']:.1f} | "
                     f"{r['overhead_pct']:+.1f}% (target ≤ +3%) |")
        for what, key in (("evaluation", "evaluation_ms"), ("checkpoint", "checkpoint_ms")):
            times = r[key]
            size = f" of {r['eval_samples']} samples" if what == "evaluation" else ""
            value = f"{statistics.median(times):.1f}" if times else "—"
            lines.append(f"| {method}: one {what}{size} (median of {len(times)}) | {value} | |")
    return "\n".join(lines)
