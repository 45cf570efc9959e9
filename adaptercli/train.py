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
from .data import LoadedData, chat_text, load_data, make_collator, tokenize_dataset
from .distributed import full_weights, main_process_lock, make_accelerator, share, tracker_config
from .errors import AdapterCliError
from .evaluation import TextGeneration, collate, evaluate, loss_units, text_generation, write_texts
from .recipe import Recipe, recipe_to_yaml
from .reports import fusion_attention_report, fusion_table, plot_curves
from .runs import load_run, prepare_model, save_trained, with_absolute_paths

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


def evaluate_run(run_dir: str | Path, split: str = "validation") -> dict[str, float]:
    recipe, model, tokenizer, _ = load_run(run_dir)
    data = load_data(recipe.data, seed=recipe.train.seed)
    if split not in data.splits:
        raise AdapterCliError(f"the data has no '{split}' split (has: {', '.join(data.splits)})")
    tokenized = tokenize_dataset(data.splits, tokenizer, data.task, recipe.train.max_seq_length,
                                 recipe.train.max_target_length)
    collator = make_collator(tokenizer, data.task, seed=recipe.train.seed)
    return evaluate(model, tokenized[split], collator, data.task, data.label_names,
                    recipe.train.eval_batch_size or recipe.train.batch_size, model.device,
                    generation=text_generation(recipe, tokenizer))


def predict(run_dir: str | Path, texts: list[str]) -> list[dict[str, Any]]:
    """Label and probability (or value) for each text, with a run's adapter; a seq2seq run's
    generated text (as its evaluation generates: greedy or ``train.generation_num_beams``)."""
    recipe, model, tokenizer, name = load_run(run_dir)
    generation = text_generation(recipe, tokenizer)
    if generation is not None:
        written = write_texts(recipe, model, generation, texts)
        return [{"text": text, "generated": output} for text, output in zip(texts, written, strict=True)]
    head = model.heads[name]
    kind = head.config.head_type
    if kind not in ("classification", "multilabel_classification", "regression"):
        raise AdapterCliError(f"predict supports sequence-level heads; this run's head is '{kind}'")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=recipe.train.max_seq_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.float()
    id2label = head.config.id2label or {}
    results = []
    for text, row in zip(texts, logits, strict=True):
        if kind == "regression":
            results.append({"text": text, "value": row.item()})
        elif kind == "multilabel_classification":
            probs = torch.sigmoid(row)
            results.append({"text": text, "labels": [id2label.get(i, str(i)) for i in range(len(probs)) if probs[i] > 0.5],
                            "probabilities": {id2label.get(i, str(i)): round(p.item(), 4) for i, p in enumerate(probs)}})
        else:
            probs = torch.softmax(row, -1)
            best = int(probs.argmax())
            results.append({"text": text, "label": id2label.get(best, str(best)), "probability": probs[best].item()})
    return results


def generate(run_dir: str | Path, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, num_beams: int = 1) -> list[str]:
    """Continue each prompt with a causal-LM run's adapter: an instruction-tuned run (``data.task:
    instruct``) reads the prompt as a user turn of the tokenizer's chat template and answers it;
    a ``causal_lm`` run continues the text. Greedy unless ``temperature`` > 0; stops at the end of
    the answer (the tokenizer's end-of-sequence or end-of-turn token) or after ``max_new_tokens``.
    A seq2seq run reads each prompt as a source text and writes its target (summary, translation),
    with the KV cache; ``num_beams`` > 1 searches with that many beams."""
    recipe, model, tokenizer, name = load_run(run_dir)
    if recipe.data.task == "seq2seq":
        torch.manual_seed(seed)  # `model.generate` samples with torch's global generator
        return write_texts(recipe, model, TextGeneration(tokenizer, max_new_tokens, num_beams, temperature), prompts)
    kind = model.heads[name].config.head_type if name in model.heads else None
    if kind != "causal_lm":
        raise AdapterCliError(f"generate needs a causal-LM run (data.task instruct or causal_lm) or a seq2seq run; "
                              f"this run's head is '{kind}'")
    if num_beams > 1:
        raise AdapterCliError("--num-beams: beam search is for seq2seq runs; a causal-LM run answers greedily or "
                              "sampled (--temperature)")
    chat = recipe.data.task == "instruct"
    stop = {tokenizer.eos_token_id, *_as_list(getattr(model.config, "eos_token_id", None))} - {None}
    stop |= {i for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>") if (i := tokenizer.convert_tokens_to_ids(t))
             not in (None, tokenizer.unk_token_id)}
    generator = torch.Generator().manual_seed(seed)
    answers = []
    for prompt in prompts:
        text = chat_text(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
        ids = tokenizer(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"].to(model.device)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):  # no KV cache: short answers from small models, exactly the trained path
                logits = model(input_ids=ids).logits[0, -1].float()
                if temperature > 0:
                    token = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
                else:
                    token = int(logits.argmax())
                if token in stop:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]
