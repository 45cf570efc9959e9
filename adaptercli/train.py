"""Training, evaluation and prediction for a recipe — one readable loop, the steps in order.

``train(recipe)`` builds the model (backbone frozen, adapter + head trainable; a seq2seq run keeps
the encoder-decoder's own LM head, frozen), walks the data in a seeded order, and every ``save_steps`` writes a checkpoint atomically (adapter and head weights,
optimizer, scheduler, RNG and data position). ``train(recipe, resume=True)`` continues from the
latest checkpoint and ends with the same adapter as an uninterrupted run.

Run folder: ``adapter/`` (final adapter + head, native format; the best one when
``train.metric_for_best`` is set), ``checkpoints/``, ``recipe.yaml``, ``metrics.jsonl``,
``curves.png`` (and ``trackers/`` for ``train.report_to: [tensorboard]``).

The same loop runs under ``accelerate launch`` (DDP, FSDP2, DeepSpeed): every process takes its
share of every batch and only the main process writes (see `adaptercli.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
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
from .evaluation import collate, evaluate, loss_units, text_generation
from .recipe import Recipe, recipe_to_yaml
from .reports import fusion_attention_report, fusion_table, plot_curves
from .runs import prepare_model, save_trained, with_absolute_paths

_CRASH_ENV = "ADAPTERCLI_TEST_KILL_AT_STEP"  # tests: SIGKILL the run right after this step


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the
    same batches without saving the sampler."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = _epoch_order(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


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
        final = _train(recipe, data, resume, console, accelerator)
        if accelerator.is_main_process and recipe.composition is not None and recipe.composition.type == "fuse":
            console.print(fusion_table(fusion_attention_report(out)))
            console.print(f"fusion attention written to {out / 'fusion_attention.png'} and fusion_attention.json")
    return final


def _train(recipe: Recipe, data: LoadedData, resume: bool, console: Console, accelerator: Accelerator) -> dict[str, float]:
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
    device = accelerator.device
    name = recipe.adapter.name

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
        accelerator.init_trackers(name, config=tracker_config(recipe))
    collator = make_collator(tokenizer, data.task, seed=cfg.seed)
    generation = text_generation(recipe, tokenizer)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    eval_every = cfg.eval_steps or steps_per_epoch
    kill_at = int(os.environ.get(_CRASH_ENV, "0"))
    fused = recipe.composition is not None and recipe.composition.type == "fuse" and \
        accelerator.unwrap_model(model).get_fusion_regularization_loss() is not None
    best_dir = out / "best"

    def log_entry(entry: dict[str, Any]) -> None:
        progress.history.append(entry)
        if main:
            with open(out / "metrics.jsonl", "a") as log:
                log.write(json.dumps(entry) + "\n")
        kind = "eval" if entry.get("eval") else "train"
        accelerator.log({f"{kind}/{k}": v for k, v in entry.items() if k not in ("step", "eval")}, step=entry["step"])

    def save(folder: Path) -> None:  # every process gathers the weights, the main one writes them
        with full_weights(accelerator, model) as whole:
            if main:
                save_trained(whole, folder, recipe)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, eval_split, collator, data.task, data.label_names, eval_bs, device, accelerator,
                           generation)
        log_entry({"step": progress.step, "eval": True, **metrics})
        key = cfg.metric_for_best or "loss"
        value = metrics.get(key)
        if value is None:
            raise AdapterCliError(f"train.metric_for_best: '{key}' is not a metric of this task (have: {', '.join(metrics)})")
        better = cfg.greater_is_better if cfg.metric_for_best else False
        if progress.best_metric is None or (value > progress.best_metric if better else value < progress.best_metric):
            progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
            save(best_dir)
        else:
            progress.evals_without_improvement += 1
        return metrics

    # 3. the loop: accumulate, clip, step, log, evaluate, checkpoint
    model.train()
    train_seconds, seen, running = 0.0, 0, []  # samples/s counts training steps only, not evals
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task_id = bar.add_task("train", total=total_steps, completed=progress.step, info="")
        stop = progress.step >= total_steps
        while not stop:
            batches = _batches(len(train_split), cfg.batch_size, cfg.seed, progress.epoch)
            while progress.batch_in_epoch < len(batches) and not stop:
                group = batches[progress.batch_in_epoch : progress.batch_in_epoch + cfg.gradient_accumulation_steps]
                step_started = time.perf_counter()
                if data.task == "mlm":  # masking seeded by step, so a resumed run masks the same tokens
                    collator = make_collator(tokenizer, data.task, seed=cfg.seed + progress.step)
                step_loss = torch.zeros((), device=device)
                for i, indices in enumerate(group):
                    whole = collate(collator, train_split, indices)  # the global batch; this process's share:
                    rows, real = share(len(indices), accelerator)
                    batch = {k: v[rows].to(device) for k, v in whole.items()}
                    last = i == len(group) - 1  # processes exchange gradients once per step
                    with accelerator.no_sync(model) if processes > 1 and not last else contextlib.nullcontext():
                        with accelerator.autocast():
                            loss = model(**batch).loss
                            if processes > 1:  # this share's part of the batch's mean (DDP averages shares)
                                units = loss_units(batch["labels"], data.task) if real else 0
                                loss = loss * (processes * units / max(loss_units(whole["labels"], data.task), 1))
                            if fused:  # AdapterFusion keeps its value matrices near the identity
                                loss = loss + accelerator.unwrap_model(model).get_fusion_regularization_loss()
                            loss = loss / len(group)
                        accelerator.backward(loss)
                    step_loss += loss.detach()
                    seen += len(indices)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters() if accelerator.is_fsdp2 else trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.batch_in_epoch += len(group)
                progress.step += 1
                running.append((accelerator.reduce(step_loss, "mean") if processes > 1 else step_loss).item())
                train_seconds += time.perf_counter() - step_started
                rate = seen / train_seconds
                lr = scheduler.get_last_lr()[0]
                bar.update(task_id, completed=progress.step, info=f"loss {running[-1]:.4f}  lr {lr:.2e}  {rate:.1f} samples/s")
                stop = progress.step >= total_steps
                if progress.step % cfg.logging_steps == 0 or stop:
                    log_entry({"step": progress.step, "epoch": progress.epoch, "loss": float(np.mean(running)),
                               "lr": lr, "samples_per_s": rate})
                    running = []
                if progress.step % eval_every == 0 and not stop:
                    run_eval()
                    if cfg.early_stopping_patience and progress.evals_without_improvement >= cfg.early_stopping_patience:
                        console.print(f"early stopping: no improvement in {cfg.early_stopping_patience} evaluations")
                        stop = True
                if progress.step % cfg.save_steps == 0 or stop:
                    with full_weights(accelerator, model) as whole_model:
                        save_checkpoint(ckpt_dir, whole_model, optimizer, scheduler, progress, name, write=main)
                    if main:
                        prune_checkpoints(ckpt_dir, cfg.save_total_limit)
                if kill_at and progress.step == kill_at:
                    os.kill(os.getpid(), 9)
            if not stop:
                progress.epoch += 1
                progress.batch_in_epoch = 0

    # 4. final evaluation, the adapter folder, the curves
    final = run_eval()
    adapter_dir = out / "adapter"
    if cfg.metric_for_best and progress.best_step is not None:  # the best evaluation's weights, saved in best/
        if main:
            shutil.rmtree(adapter_dir, ignore_errors=True)
            shutil.copytree(best_dir, adapter_dir)
    else:
        save(adapter_dir)
    for tracker in accelerator.trackers:  # only the main process has them
        tracker.finish()
    accelerator.wait_for_everyone()
    if not main:
        return final
    plot_curves(progress.history, out / "curves.png", cfg.metric_for_best)
    table = Table(title=f"{name}: final evaluation ({len(eval_split)} examples, step {progress.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        table.add_row(key, f"{value:.4f}")
    if cfg.metric_for_best:
        table.add_row(f"best {cfg.metric_for_best} (step {progress.best_step})", f"{progress.best_metric:.4f}")
    console.print(table)
    fused = recipe.composition is not None and recipe.composition.type == "fuse"
    what = "fusion and head" if fused else "adapter"
    console.print(f"{what} written to {adapter_dir}" + (f" ({processes} processes)" if processes > 1 else ""))
    return final


