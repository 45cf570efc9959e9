"""Training, evaluation and prediction for a recipe — one readable loop, the steps in order.

``train(recipe)`` builds the model (backbone frozen, adapter + head trainable), walks the data in a
seeded order, and every ``save_steps`` writes a checkpoint atomically (adapter and head weights,
optimizer, scheduler, RNG and data position). ``train(recipe, resume=True)`` continues from the
latest checkpoint and ends with the same adapter as an uninterrupted run.

Run folder: ``adapter/`` (final adapter + head, native format; the best one when
``train.metric_for_best`` is set), ``checkpoints/``, ``recipe.yaml``, ``metrics.jsonl``,
``curves.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, get_scheduler

from .assets import resolve_model_path
from .checks import preflight
from .composition import Stack
from .data import LoadedData, load_data, make_collator, tokenize_dataset
from .errors import AdapterCliError
from .formats.common import read_json, write_json, write_weights
from .heads import HeadConfig
from .hub import hub_access
from .metrics import compute_metrics
from .model import AdapterModel, AutoAdapterModel
from .recipe import Recipe, load_recipe, recipe_to_yaml

# recipe head types -> AdapterHub head types
_HEAD_TYPES = {"classification": "classification", "multilabel": "multilabel_classification",
               "regression": "regression", "tagging": "tagging", "qa": "question_answering",
               "mlm": "masked_lm", "causal_lm": "causal_lm"}
_CRASH_ENV = "ADAPTERCLI_TEST_KILL_AT_STEP"  # tests: SIGKILL the run right after this step


def load_model(recipe: Recipe) -> tuple[AdapterModel, Any]:
    """The recipe's backbone (frozen later by ``train_adapter``) and tokenizer."""
    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    kwargs: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    try:
        with hub_access():  # a Hub id with the Hub unreachable fails in seconds
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            if m.attn_implementation:
                kwargs["attn_implementation"] = m.attn_implementation
            if m.dtype:
                kwargs["dtype"] = m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)
            model = AutoAdapterModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        local = Path(path).exists()
        hint = "" if local else (" — it is not a local folder and the Hugging Face Hub could not be reached; "
                                 "set model.name_or_path to a downloaded model folder (or `minilm`, installed offline)")
        raise AdapterCliError(f"model.name_or_path: cannot load '{m.name_or_path}'{hint} ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_adapter(model: AdapterModel, recipe: Recipe) -> str:
    """Add the recipe's new adapter, or load its pretrained one; returns the adapter's name."""
    name = recipe.adapter.name
    if recipe.adapter.load:
        model.load_adapter(recipe.adapter.load, load_as=name)
    else:
        model.add_adapter(name, {"method": recipe.adapter.method, **recipe.adapter.config})
    return name


def frozen_below(model: AdapterModel, recipe: Recipe) -> list[str]:
    """Load the pretrained adapters a ``composition: {type: stack}`` puts below the trained one
    (e.g. a language adapter under a task adapter); they stay frozen."""
    comp = recipe.composition
    if comp is None:
        return []
    if comp.type != "stack":
        raise AdapterCliError(f"composition.type: '{comp.type}' training is not supported yet (only stack)")
    names = []
    for path in comp.adapters:
        name = model.load_adapter(path, with_head=False)
        if name == recipe.adapter.name:
            raise AdapterCliError(f"composition.adapters: '{path}' is named '{name}' like the adapter being trained")
        names.append(name)
    return names


def prepare_model(recipe: Recipe, data: LoadedData) -> tuple[AdapterModel, Any]:
    """Backbone + the recipe's adapter (new or loaded) + its head, ready to train."""
    model, tokenizer = load_model(recipe)
    below = frozen_below(model, recipe)
    name = attach_adapter(model, recipe)
    if name not in model.heads:
        head = recipe.head
        kind = _HEAD_TYPES[head.type or data.task]
        labels = data.label_names or []
        num_labels = head.num_labels or (1 if kind == "regression" else len(labels) or 2)
        label2id = {label: i for i, label in enumerate(labels)} if labels else None
        model.add_head(name, HeadConfig(kind, num_labels, head.layers, head.activation, label2id, dropout_prob=head.dropout))
    model.train_adapter(name)
    if below:
        model.set_active_adapters(Stack(*below, name))  # run them all, train only `name`
    return model, tokenizer


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe as saved in the run folder: local paths made absolute, so ``adapter eval`` and
    ``adapter predict`` work from any directory."""
    saved = copy.deepcopy(recipe)
    for section, key in (("data", "train_file"), ("data", "validation_file"), ("data", "test_file"),
                         ("data", "name"), ("model", "name_or_path"), ("adapter", "load")):
        value = getattr(getattr(saved, section), key)
        if value and Path(value).exists():
            setattr(getattr(saved, section), key, str(Path(value).resolve()))
    if saved.composition is not None:
        saved.composition.adapters = [str(Path(a).resolve()) if Path(a).exists() else a for a in saved.composition.adapters]
    return saved


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the
    same batches without saving the sampler."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = _epoch_order(n, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _collate(collator: Callable, split, indices: list[int]) -> dict[str, torch.Tensor]:
    return collator([split[i] for i in indices])


def evaluate(model: AdapterModel, split, collator: Callable, task: str, label_names: list[str] | None,
             batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss and task metrics of ``model`` on a tokenized split."""
    model.eval()
    losses, predictions, labels = [], [], []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            batch = {k: v.to(device) for k, v in _collate(collator, split, list(range(start, min(start + batch_size, len(split))))).items()}
            out = model(**batch)
            losses.append(out.loss.item() * len(batch["input_ids"]))
            logits = out.logits.float()
            if task in ("tagging", "mlm", "causal_lm"):
                logits = logits.argmax(-1)  # keep ids only: full-vocabulary logits would not fit
            predictions.append(logits.cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    model.train()
    if task in ("tagging", "mlm", "causal_lm"):  # pad token-level batches to one length
        width = max(p.shape[1] for p in predictions)
        predictions = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-100) for p in predictions]
        labels = [np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=-100) for y in labels]
    metrics = compute_metrics(task, np.concatenate(predictions), np.concatenate(labels), label_names)
    metrics["loss"] = float(sum(losses) / len(split))
    return metrics


def _save_checkpoint(folder: Path, model: AdapterModel, optimizer, scheduler, progress: RunState, name: str) -> None:
    """Write ``checkpoints/step-N`` via a temporary folder and a rename, then point ``latest`` at
    it: a run killed at any moment leaves the previous checkpoint intact."""
    final = folder / f"step-{progress.step}"
    if final.exists():  # the same step saved before (a resumed run ending where it was cut): same state
        write_json(folder / "latest.json", {"checkpoint": final.name, "step": progress.step})
        return
    tmp = folder / f".tmp-step-{progress.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    write_weights(tmp / "trainable.safetensors", trainable)
    state = optimizer.state_dict()
    tensors = {f"{i}.{key}": value for i, s in state["state"].items() for key, value in s.items() if torch.is_tensor(value)}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    write_weights(tmp / "optimizer.safetensors", tensors)
    numpy_rng = np.random.get_state()
    write_json(tmp / "state.json", {
        "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(), "progress": progress.__dict__,
        "trainable": list(trainable), "adapter": name,
        "rng": {"python": random.getstate(), "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]},
    })
    os.replace(tmp, final)
    write_json(folder / "latest.json", {"checkpoint": final.name, "step": progress.step})


def _load_checkpoint(folder: Path, model: AdapterModel, optimizer, scheduler) -> RunState:
    """Restore the latest checkpoint; a damaged one is reported (and how to go on), not a traceback."""
    path = folder
    try:
        path = folder / read_json(folder / "latest.json")["checkpoint"]
        meta = read_json(path / "state.json")
        weights = load_file(path / "trainable.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
        params = dict(model.named_parameters())
        missing = sorted(set(weights) - set(params))
        if missing:
            raise ValueError(f"it holds weights this recipe's model lacks ({missing[0]}, ...)")
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if index != "rng":
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        progress = RunState(**meta["progress"])
    except (AdapterCliError, SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AdapterCliError(f"--resume: cannot restore the checkpoint {path} ({detail}); delete it (and "
                              f"{folder / 'latest.json'}) to resume from an earlier one, or train without --resume") from None
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "rng" in meta:
        version, internal, gauss = meta["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = meta["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return progress


def _prune(folder: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*"))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _plot(history: list[dict[str, Any]], path: Path, metric: str | None) -> None:
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
        key = metric or next((k for k in ("accuracy", "f1", "pearson", "f1_micro") if k in evals[0]), None)
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


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (our pid) while training, so a second `adapter train` into the same
    folder is refused; a lock left by a run that died (kill -9) is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise AdapterCliError(f"{out} is in use by a running training (pid {holder}); wait for it to "
                                      "end or choose another output_dir") from None
            lock.unlink(missing_ok=True)  # stale: its run is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    else:
        raise AdapterCliError(f"{out}: cannot take the run lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    """The pid in a lock file if that process is still alive, else None."""
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # unreadable or half-written: treat as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid if pid != os.getpid() else None


def train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict[str, float]:
    """Train the recipe's adapter; returns the final evaluation metrics."""
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"
    if resume and not (ckpt_dir / "latest.json").exists():
        raise AdapterCliError(f"--resume: no checkpoint in {ckpt_dir} (train without --resume to start)")
    if not resume and (ckpt_dir / "latest.json").exists():
        raise AdapterCliError(f"{out} already holds a run; use --resume to continue it or choose another output_dir")
    data = preflight(recipe).data  # the recipe's files, model folder and metric, before anything loads
    with run_lock(out):
        return _train(recipe, data, resume, console or Console())


def _train(recipe: Recipe, data: LoadedData, resume: bool, console: Console) -> dict[str, float]:
    cfg = recipe.train
    out = Path(recipe.output_dir)
    ckpt_dir = out / "checkpoints"

    # 1. model, optimizer (the data was loaded by the checks)
    torch.manual_seed(cfg.seed)
    model, tokenizer = prepare_model(recipe, data)
    tokenized = tokenize_dataset(data.splits, tokenizer, data.task, cfg.max_seq_length)
    train_split, eval_split = tokenized["train"], tokenized["validation"]
    mixed = cfg.mixed_precision if torch.cuda.is_available() or cfg.mixed_precision == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    steps_per_epoch = max(batches_per_epoch // cfg.gradient_accumulation_steps, 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_epochs)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    name = recipe.adapter.name

    # 2. a fresh run folder, or the state of the latest checkpoint
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe_to_yaml(_with_absolute_paths(recipe)))
    progress = _load_checkpoint(ckpt_dir, model, optimizer, scheduler) if resume else RunState()
    with open(out / "metrics.jsonl", "w") as log:  # rewritten from the checkpoint's history on resume
        for entry in progress.history:
            log.write(json.dumps(entry) + "\n")
    collator = make_collator(tokenizer, data.task, seed=cfg.seed)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    eval_every = cfg.eval_steps or steps_per_epoch
    kill_at = int(os.environ.get(_CRASH_ENV, "0"))
    best_dir = out / "best"

    def log_entry(entry: dict[str, Any]) -> None:
        progress.history.append(entry)
        with open(out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, eval_split, collator, data.task, data.label_names, eval_bs, device)
        log_entry({"step": progress.step, "eval": True, **metrics})
        key = cfg.metric_for_best or "loss"
        value = metrics.get(key)
        if value is None:
            raise AdapterCliError(f"train.metric_for_best: '{key}' is not a metric of this task (have: {', '.join(metrics)})")
        better = cfg.greater_is_better if cfg.metric_for_best else False
        if progress.best_metric is None or (value > progress.best_metric if better else value < progress.best_metric):
            progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
            model.save_adapter(best_dir, name)
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
                for indices in group:
                    batch = {k: v.to(device) for k, v in _collate(collator, train_split, indices).items()}
                    with accelerator.autocast():
                        loss = model(**batch).loss / len(group)
                    accelerator.backward(loss)
                    running.append(loss.item() * len(group))
                    seen += len(indices)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.batch_in_epoch += len(group)
                progress.step += 1
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
                    _save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, progress, name)
                    _prune(ckpt_dir, cfg.save_total_limit)
                if kill_at and progress.step == kill_at:
                    os.kill(os.getpid(), 9)
            if not stop:
                progress.epoch += 1
                progress.batch_in_epoch = 0

    # 4. final evaluation, the adapter folder, the curves
    final = run_eval()
    unwrapped = accelerator.unwrap_model(model)
    adapter_dir = out / "adapter"
    if cfg.metric_for_best and best_dir.exists():
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(best_dir, adapter_dir)
    else:
        unwrapped.save_adapter(adapter_dir, name)
    _plot(progress.history, out / "curves.png", cfg.metric_for_best)
    table = Table(title=f"{name}: final evaluation ({len(eval_split)} examples, step {progress.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        table.add_row(key, f"{value:.4f}")
    if cfg.metric_for_best:
        table.add_row(f"best {cfg.metric_for_best} (step {progress.best_step})", f"{progress.best_metric:.4f}")
    console.print(table)
    console.print(f"adapter written to {adapter_dir}")
    return final


def load_run(run_dir: str | Path) -> tuple[Recipe, AdapterModel, Any, str]:
    """A finished run's recipe, model with its trained adapter active, tokenizer and adapter name."""
    run = Path(run_dir)
    if not (run / "recipe.yaml").exists() or not (run / "adapter").exists():
        raise AdapterCliError(f"{run}: not a finished run folder (needs recipe.yaml and adapter/)")
    recipe = load_recipe(run / "recipe.yaml")
    model, tokenizer = load_model(recipe)
    below = frozen_below(model, recipe)
    name = model.load_adapter(run / "adapter")
    model.set_active_adapters(Stack(*below, name))
    model.eval()
    return recipe, model, tokenizer, name


def evaluate_run(run_dir: str | Path, split: str = "validation") -> dict[str, float]:
    recipe, model, tokenizer, _ = load_run(run_dir)
    data = load_data(recipe.data, seed=recipe.train.seed)
    if split not in data.splits:
        raise AdapterCliError(f"the data has no '{split}' split (has: {', '.join(data.splits)})")
    tokenized = tokenize_dataset(data.splits, tokenizer, data.task, recipe.train.max_seq_length)
    collator = make_collator(tokenizer, data.task, seed=recipe.train.seed)
    return evaluate(model, tokenized[split], collator, data.task, data.label_names,
                    recipe.train.eval_batch_size or recipe.train.batch_size, model.device)


def predict(run_dir: str | Path, texts: list[str]) -> list[dict[str, Any]]:
    """Label and probability (or value) for each text, with a run's adapter."""
    recipe, model, tokenizer, name = load_run(run_dir)
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
