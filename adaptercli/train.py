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
from .checks import member_folder, preflight
from .composition import Fuse, Stack
from .data import LoadedData, load_data, make_collator, tokenize_dataset
from .errors import AdapterCliError
from .formats.common import read_json, write_json, write_weights
from .heads import HeadConfig
from .hub import hub_access, pinned
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
    if recipe.adapter.load:  # a frozen adapter gets a new head for this task; else its own is trained on
        model.load_adapter(recipe.adapter.load, load_as=name, with_head=not recipe.adapter.freeze)
    else:
        model.add_adapter(name, {"method": recipe.adapter.method, **recipe.adapter.config})
    return name


def load_members(model: AdapterModel, recipe: Recipe) -> list[str]:
    """Load the composition's member adapters (frozen; heads left behind), each under its saved
    name, or that name plus its position when two members share one."""
    from .formats import read_adapter

    names: list[str] = []
    for index, source in enumerate(recipe.composition.adapters if recipe.composition else []):
        folder = member_folder(source)
        saved = read_adapter(Path(folder), with_head=False).saved_name if Path(folder).is_dir() else None
        load_as = f"{saved}_{index}" if saved in names or saved == recipe.adapter.name else None
        names.append(model.load_adapter(folder, load_as=load_as, with_head=False))
    return names


def setup_of(recipe: Recipe, members: list[str]) -> Stack | Fuse:
    """What runs in a forward pass: the fusion of the members (named like the recipe's adapter, whose
    head it feeds), or the members stacked under the recipe's adapter."""
    name = recipe.adapter.name
    if recipe.composition is not None and recipe.composition.type == "fuse":
        return Fuse(*members, name=name)
    return Stack(*members, name)


def prepare_model(recipe: Recipe, data: LoadedData) -> tuple[AdapterModel, Any]:
    """Backbone + what the recipe trains + its head, ready to train: a new or loaded adapter (over
    frozen stacked members), an adapter started from the weighted average of the members, or an
    AdapterFusion layer over frozen members."""
    model, tokenizer = load_model(recipe)
    comp, name = recipe.composition, recipe.adapter.name
    members = load_members(model, recipe) if comp is not None and comp.type in ("stack", "fuse") else []
    if comp is not None and comp.type == "average":
        averaged = load_members(model, recipe)
        model.average_adapter(name, averaged, weights=comp.kwargs.get("weights"),
                              **{k: v for k, v in comp.kwargs.items() if k != "weights"})
        for member in averaged:
            model.delete_adapter(member)
    elif comp is not None and comp.type == "fuse":
        model.add_adapter_fusion(setup_of(recipe, members), comp.kwargs.get("config", "dynamic"))
    else:
        attach_adapter(model, recipe)
    if name not in model.heads:
        head = recipe.head
        kind = _HEAD_TYPES[head.type or data.task]
        labels = data.label_names or []
        num_labels = head.num_labels or (1 if kind == "regression" else len(labels) or 2)
        label2id = {label: i for i, label in enumerate(labels)} if labels else None
        model.add_head(name, HeadConfig(kind, num_labels, head.layers, head.activation, label2id, dropout_prob=head.dropout))
    setup = setup_of(recipe, members)
    if isinstance(setup, Fuse):
        model.train_adapter_fusion(setup)  # the members stay frozen; the fusion layers and the head train
    else:
        model.train_adapter(name)
        model.set_active_adapters(setup)  # run the stacked members too, train only `name`
        if recipe.adapter.freeze:
            for p in model._adapter_state.adapter_parameters(name).values():
                p.requires_grad_(False)
    return model, tokenizer


def save_trained(model: AdapterModel, folder: Path, recipe: Recipe) -> None:
    """Write what a run trained: its adapter and head, or its fusion and head (never the members)."""
    if recipe.composition is not None and recipe.composition.type == "fuse":
        model.save_adapter_fusion(folder, recipe.adapter.name, with_head=True)
    else:
        model.save_adapter(folder, recipe.adapter.name)


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
    ``adapter predict`` work from any directory; adapters downloaded by Hub id pinned to the
    commit they came from (``org/name@<sha>``), so they load the same files again."""
    saved = copy.deepcopy(recipe)
    for section, key in (("data", "train_file"), ("data", "validation_file"), ("data", "test_file"),
                         ("data", "name"), ("model", "name_or_path"), ("adapter", "load")):
        value = getattr(getattr(saved, section), key)
        if value and Path(value).exists():
            setattr(getattr(saved, section), key, str(Path(value).resolve()))
    if saved.adapter.load:
        saved.adapter.load = pinned(saved.adapter.load)
    if saved.composition is not None:
        saved.composition.adapters = [str(Path(a).resolve()) if Path(a).exists() else pinned(a)
                                      for a in saved.composition.adapters]
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
    console = console or Console()
    with run_lock(out):
        final = _train(recipe, data, resume, console)
        if recipe.composition is not None and recipe.composition.type == "fuse":
            console.print(fusion_table(fusion_attention_report(out)))
            console.print(f"fusion attention written to {out / 'fusion_attention.png'} and fusion_attention.json")
    return final


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
    fused = recipe.composition is not None and recipe.composition.type == "fuse" and \
        accelerator.unwrap_model(model).get_fusion_regularization_loss() is not None
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
            save_trained(accelerator.unwrap_model(model), best_dir, recipe)
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
                        loss = model(**batch).loss
                        if fused:  # AdapterFusion keeps its value matrices near the identity
                            loss = loss + accelerator.unwrap_model(model).get_fusion_regularization_loss()
                        loss = loss / len(group)
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
        save_trained(unwrapped, adapter_dir, recipe)
    _plot(progress.history, out / "curves.png", cfg.metric_for_best)
    table = Table(title=f"{name}: final evaluation ({len(eval_split)} examples, step {progress.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        table.add_row(key, f"{value:.4f}")
    if cfg.metric_for_best:
        table.add_row(f"best {cfg.metric_for_best} (step {progress.best_step})", f"{progress.best_metric:.4f}")
    console.print(table)
    fused = recipe.composition is not None and recipe.composition.type == "fuse"
    console.print(f"{'fusion and head' if fused else 'adapter'} written to {adapter_dir}")
    return final


def fusion_attention_report(run_dir: str | Path, split: str = "validation") -> dict[str, Any]:
    """The mean attention each fusion layer of a fusion run gives each member adapter on ``split``;
    written to ``fusion_attention.json`` and drawn as a heatmap in ``fusion_attention.png``."""
    run = Path(run_dir)
    recipe, model, tokenizer, name = load_run(run)
    if not model._adapter_state.fusions:
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


def load_run(run_dir: str | Path) -> tuple[Recipe, AdapterModel, Any, str]:
    """A finished run's recipe, model with its trained adapter active, tokenizer and adapter name."""
    run = Path(run_dir)
    if not (run / "recipe.yaml").exists() or not (run / "adapter").exists():
        raise AdapterCliError(f"{run}: not a finished run folder (needs recipe.yaml and adapter/)")
    recipe = load_recipe(run / "recipe.yaml")
    model, tokenizer = load_model(recipe)
    comp = recipe.composition
    members = load_members(model, recipe) if comp is not None and comp.type in ("stack", "fuse") else []
    if comp is not None and comp.type == "fuse":
        name = model.load_adapter_fusion(run / "adapter", load_as=recipe.adapter.name, with_head=True)
    else:
        name = model.load_adapter(run / "adapter")
    model.set_active_adapters(setup_of(recipe, members))
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
