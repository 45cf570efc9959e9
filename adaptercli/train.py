"""Training a recipe's adapter — one readable loop, the steps in order.

``train(recipe)`` builds the model (backbone frozen, adapter + head trainable; a seq2seq run keeps
the encoder-decoder's own LM head, frozen), walks the data in a seeded order, and every ``save_steps`` writes a checkpoint atomically (adapter and head weights,
optimizer, scheduler, RNG and data position). ``train(recipe, resume=True)`` continues from the
latest checkpoint and ends with the same adapter as an uninterrupted run.

Run folder: ``adapter/`` (final adapter + head, native format; the best one when
``train.metric_for_best`` is set), ``checkpoints/``, ``recipe.yaml``, ``metrics.jsonl``,
``curves.png`` (and ``trackers/`` for ``train.report_to: [tensorboard]``).

The same loop runs under ``accelerate launch`` (DDP, FSDP2, DeepSpeed): every process takes its
share of every batch and only the main process writes (see `adaptercli.distributed`).

What the loop uses lives beside it: the model built from the recipe in `adaptercli.runs`,
checkpoints in `adaptercli.checkpoints`, evaluation in `adaptercli.evaluation`, the curves and
fusion reports in `adaptercli.reports`; the commands on a finished run (eval, predict, generate)
are `adaptercli.inference`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import get_scheduler

from .checkpoints import (
    RunState,
    prune_checkpoints,
    restore_training_state,
    restore_weights,
    save_checkpoint,
)
from .checks import preflight
from .data import LoadedData, make_collator, tokenize_dataset
from .distributed import full_weights, main_process_lock, make_accelerator, share, tracker_config
from .errors import AdapterCliError
from .evaluation import TextGeneration, collate, evaluate, loss_units, text_generation
from .recipe import Recipe, recipe_to_yaml
from .reports import fusion_attention_report, fusion_table, plot_curves
from .runs import prepare_model, save_trained, with_absolute_paths

_CRASH_ENV = "ADAPTERCLI_TEST_KILL_AT_STEP"  # tests: SIGKILL the run right after this step


def train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict[str, float]:
    """Train the recipe's adapter; returns the final evaluation metrics. Under ``accelerate launch``
    every process runs this, each on its share of every batch; only the main one writes and prints."""
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    if resume and not (ckpt_dir / "latest.json").exists():
        raise AdapterCliError(f"--resume: no checkpoint in {ckpt_dir} (train without --resume to start)")
    if not resume and (ckpt_dir / "latest.json").exists():
        raise AdapterCliError(f"{out} already holds a run; use --resume to continue it or choose another output_dir")
    data = preflight(recipe).data  # the recipe's files, model folder and metric, before anything loads
    accelerator = make_accelerator(recipe)
    console = console or Console()
    if not accelerator.is_main_process:
        console = Console(quiet=True)
    with main_process_lock(accelerator, out):
        run, progress = _set_up(recipe, data, resume, accelerator)
        _train_loop(run, progress, console)
        final = _finish(run, progress, console)
        if accelerator.is_main_process and recipe.composition is not None and recipe.composition.type == "fuse":
            console.print(fusion_table(fusion_attention_report(out)))
            console.print(f"fusion attention written to {out / 'fusion_attention.png'} and fusion_attention.json")
    return final


@dataclass
class Training:
    """A run in training: what `_set_up` builds once, handed to the loop and its helpers. Only
    ``collator`` changes on the way: an mlm run masks each step with a collator seeded by the step
    (so a resumed run masks the same tokens), and evaluates with the latest one."""

    recipe: Recipe
    data: LoadedData
    accelerator: Accelerator
    model: Any  # prepared by Accelerate (wrapped under several processes, compiled with train.compile)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    trainable: list[torch.Tensor]  # the parameters that train (FSDP2's sharded ones under FSDP2)
    train_split: Any
    eval_split: Any
    collator: Callable
    generation: TextGeneration | None  # how a seq2seq run writes its texts when evaluated
    total_steps: int
    eval_every: int
    fused: bool  # AdapterFusion with a regularization loss

    @property
    def out(self) -> Path:
        return Path(self.recipe.output_dir)


def _set_up(recipe: Recipe, data: LoadedData, resume: bool, accelerator: Accelerator) -> tuple[Training, RunState]:
    """The model, optimizer and scheduler, prepared by Accelerate (a resumed run's weights restored
    first); then a fresh run folder, or the state of the latest checkpoint."""
    cfg = recipe.train
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    main, processes = accelerator.is_main_process, accelerator.num_processes

    # 1. model, optimizer (the data was loaded by the checks); a resumed run's weights
    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(recipe, data)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    tokenized = tokenize_dataset(data.splits, tokenizer, data.task, cfg.max_seq_length, cfg.max_target_length)
    train_split, eval_split = tokenized["train"], tokenized["validation"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    steps_per_epoch = max(batches_per_epoch // cfg.gradient_accumulation_steps, 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if resume:  # whole weights go in before FSDP or DeepSpeed cut them into shards
        checkpoint, saved = restore_weights(ckpt_dir, model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # it needs a batch size and does the clipping
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=math.ceil(cfg.batch_size / processes), gradient_clipping=cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces them by sharded ones

    # 2. a fresh run folder, or the state of the latest checkpoint
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe_to_yaml(with_absolute_paths(recipe)))
    progress = restore_training_state(ckpt_dir, checkpoint, saved, optimizer, scheduler) if resume else RunState()
    if main:
        with open(out / "metrics.jsonl", "w") as log:  # rewritten from the checkpoint's history on resume
            for entry in progress.history:
                log.write(json.dumps(entry) + "\n")
    if cfg.report_to:
        accelerator.init_trackers(recipe.adapter.name, config=tracker_config(recipe))
    collator = make_collator(tokenizer, data.task, seed=cfg.seed)
    generation = text_generation(recipe, tokenizer)
    fused = recipe.composition is not None and recipe.composition.type == "fuse" and \
        accelerator.unwrap_model(model).get_fusion_regularization_loss() is not None
    run = Training(recipe, data, accelerator, model, tokenizer, optimizer, scheduler, trainable, train_split,
                   eval_split, collator, generation, total_steps, eval_every=cfg.eval_steps or steps_per_epoch,
                   fused=fused)
    return run, progress


def _train_loop(run: Training, progress: RunState, console: Console) -> None:
    """Train until ``total_steps`` (or early stopping), one optimizer step at a time: the step's
    batches (each process its share of each), forward, loss, backward, optimizer step; then, when
    due, log, evaluate and save a checkpoint. ``progress`` (data position, best evaluation, history)
    goes on in place; every checkpoint saves it."""
    cfg, accelerator, model = run.recipe.train, run.accelerator, run.model
    processes, device = accelerator.num_processes, accelerator.device
    kill_at = int(os.environ.get(_CRASH_ENV, "0"))
    model.train()
    train_seconds, seen, running = 0.0, 0, []  # samples/s counts training steps only, not evals
    with _progress_bar(console) as bar:
        task_id = bar.add_task("train", total=run.total_steps, completed=progress.step, info="")
        batches = _batches(len(run.train_split), cfg.batch_size, cfg.seed, progress.epoch)
        stop = progress.step >= run.total_steps
        while not stop:
            while progress.batch_in_epoch >= len(batches):  # the epoch is used up: the next one, in its own order
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                batches = _batches(len(run.train_split), cfg.batch_size, cfg.seed, progress.epoch)
            # 1. batch: the step's batches (gradient accumulation), each process its share of each
            group = batches[progress.batch_in_epoch : progress.batch_in_epoch + cfg.gradient_accumulation_steps]
            step_started = time.perf_counter()
            if run.data.task == "mlm":  # masking seeded by step, so a resumed run masks the same tokens
                run.collator = make_collator(run.tokenizer, run.data.task, seed=cfg.seed + progress.step)
            step_loss = torch.zeros((), device=device)
            for i, indices in enumerate(group):
                whole = collate(run.collator, run.train_split, indices)  # the global batch; this process's share:
                rows, real = share(len(indices), accelerator)
                batch = {k: v[rows].to(device) for k, v in whole.items()}
                last = i == len(group) - 1  # processes exchange gradients once per step
                with accelerator.no_sync(model) if processes > 1 and not last else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss = model(**batch).loss  # 2. forward
                        loss = _loss_to_backpropagate(run, loss, batch["labels"], whole["labels"], real)  # 3. loss
                        loss = loss / len(group)
                    accelerator.backward(loss)  # 4. backward
                step_loss += loss.detach()
                seen += len(indices)
            # 5. optimizer step
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters() if accelerator.is_fsdp2 else run.trainable, cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            progress.batch_in_epoch += len(group)
            progress.step += 1
            # 6. log
            running.append((accelerator.reduce(step_loss, "mean") if processes > 1 else step_loss).item())
            train_seconds += time.perf_counter() - step_started
            rate = seen / train_seconds
            lr = run.scheduler.get_last_lr()[0]
            bar.update(task_id, completed=progress.step, info=f"loss {running[-1]:.4f}  lr {lr:.2e}  {rate:.1f} samples/s")
            stop = progress.step >= run.total_steps
            if progress.step % cfg.logging_steps == 0 or stop:
                _log(run, progress, {"step": progress.step, "epoch": progress.epoch, "loss": float(np.mean(running)),
                                     "lr": lr, "samples_per_s": rate})
                running = []
            # 7. evaluate (the best weights kept in best/); stop early when they stopped improving
            if progress.step % run.eval_every == 0 and not stop:
                _evaluate(run, progress)
                if cfg.early_stopping_patience and progress.evals_without_improvement >= cfg.early_stopping_patience:
                    console.print(f"early stopping: no improvement in {cfg.early_stopping_patience} evaluations")
                    stop = True
            # 8. save a checkpoint
            if progress.step % cfg.save_steps == 0 or stop:
                _write_checkpoint(run, progress)
            if kill_at and progress.step == kill_at:
                os.kill(os.getpid(), 9)


def _progress_bar(console: Console) -> Progress:
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    return Progress(*columns, console=console)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the
    same batches without saving the sampler."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of example indices, in the epoch's order."""
    order = _epoch_order(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _loss_to_backpropagate(run: Training, loss: torch.Tensor, labels: torch.Tensor, whole_labels: torch.Tensor,
                           real: bool) -> torch.Tensor:
    """The loss this process backpropagates for its share of a batch: under several processes, its
    share's part of the batch's mean (DDP averages the shares), weighted by its part of the batch's
    loss units (0 for a process without rows); plus, for AdapterFusion, the regularization that
    keeps its value matrices near the identity."""
    processes = run.accelerator.num_processes
    if processes > 1:
        units = loss_units(labels, run.data.task) if real else 0
        loss = loss * (processes * units / max(loss_units(whole_labels, run.data.task), 1))
    if run.fused:
        loss = loss + run.accelerator.unwrap_model(run.model).get_fusion_regularization_loss()
    return loss


def _log(run: Training, progress: RunState, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the run's history, to metrics.jsonl (main process) and to the trackers."""
    progress.history.append(entry)
    if run.accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")
    kind = "eval" if entry.get("eval") else "train"
    run.accelerator.log({f"{kind}/{k}": v for k, v in entry.items() if k not in ("step", "eval")}, step=entry["step"])


def _evaluate(run: Training, progress: RunState) -> dict[str, float]:
    """Evaluate on the validation split and log it; save the weights to ``best/`` when they are the
    best yet (by ``train.metric_for_best``, else the loss)."""
    cfg = run.recipe.train
    metrics = evaluate(run.model, run.eval_split, run.collator, run.data.task, run.data.label_names,
                       cfg.eval_batch_size or cfg.batch_size, run.accelerator.device, run.accelerator, run.generation)
    _log(run, progress, {"step": progress.step, "eval": True, **metrics})
    key = cfg.metric_for_best or "loss"
    value = metrics.get(key)
    if value is None:
        raise AdapterCliError(f"train.metric_for_best: '{key}' is not a metric of this task (have: {', '.join(metrics)})")
    better = cfg.greater_is_better if cfg.metric_for_best else False
    if progress.best_metric is None or (value > progress.best_metric if better else value < progress.best_metric):
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
        _save_weights(run, run.out / "best")
    else:
        progress.evals_without_improvement += 1
    return metrics


def _save_weights(run: Training, folder: Path) -> None:
    """Write what the run trains to ``folder``: every process gathers the weights, the main one writes them."""
    with full_weights(run.accelerator, run.model) as whole:
        if run.accelerator.is_main_process:
            save_trained(whole, folder, run.recipe)


def _write_checkpoint(run: Training, progress: RunState) -> None:
    """``checkpoints/step-N`` (every process gathers, the main one writes), the oldest pruned."""
    ckpt_dir = run.out / "checkpoints"
    main = run.accelerator.is_main_process
    with full_weights(run.accelerator, run.model) as whole_model:
        save_checkpoint(ckpt_dir, whole_model, run.optimizer, run.scheduler, progress, run.recipe.adapter.name, write=main)
    if main:
        prune_checkpoints(ckpt_dir, run.recipe.train.save_total_limit)


def _finish(run: Training, progress: RunState, console: Console) -> dict[str, float]:
    """The final evaluation, the adapter folder (the best evaluation's weights when
    ``train.metric_for_best`` is set), the curves and the final table; returns the final metrics."""
    cfg, accelerator, out = run.recipe.train, run.accelerator, run.out
    final = _evaluate(run, progress)
    adapter_dir = out / "adapter"
    if cfg.metric_for_best and progress.best_step is not None:  # the best evaluation's weights, saved in best/
        if accelerator.is_main_process:
            shutil.rmtree(adapter_dir, ignore_errors=True)
            shutil.copytree(out / "best", adapter_dir)
    else:
        _save_weights(run, adapter_dir)
    for tracker in accelerator.trackers:  # only the main process has them
        tracker.finish()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    plot_curves(progress.history, out / "curves.png", cfg.metric_for_best)
    console.print(_final_table(run, progress, final))
    fused = run.recipe.composition is not None and run.recipe.composition.type == "fuse"
    what = "fusion and head" if fused else "adapter"
    processes = accelerator.num_processes
    console.print(f"{what} written to {adapter_dir}" + (f" ({processes} processes)" if processes > 1 else ""))
    return final


def _final_table(run: Training, progress: RunState, final: dict[str, float]) -> Table:
    cfg = run.recipe.train
    table = Table(title=f"{run.recipe.adapter.name}: final evaluation ({len(run.eval_split)} examples, step {progress.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        table.add_row(key, f"{value:.4f}")
    if cfg.metric_for_best:
        table.add_row(f"best {cfg.metric_for_best} (step {progress.best_step})", f"{progress.best_metric:.4f}")
    return table
