"""Evaluation: a model's loss and task metrics on a tokenized split (every process its share of
every batch, the results gathered), how many terms a batch's mean loss averages (`loss_units`),
and how a seq2seq run writes its texts (`TextGeneration`, `write_texts`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .distributed import share
from .metrics import IGNORE_INDEX, compute_metrics
from .model import AdapterModel
from .recipe import Recipe

TOKEN_TASKS = ("tagging", "mlm", "causal_lm", "instruct", "seq2seq")  # a label per token; the others, one per example


def collate(collator: Callable, split, indices: list[int]) -> dict[str, torch.Tensor]:
    """The examples at ``indices`` of a tokenized split, made one batch by ``collator``."""
    return collator([split[i] for i in indices])


@dataclass
class TextGeneration:
    """How a seq2seq model writes its text: greedy (``num_beams`` 1) or beam search, sampled
    instead when ``temperature`` > 0; at most ``max_new_tokens`` tokens, decoded without special
    tokens. Evaluation scores what it writes against the targets; `adapter predict` and `adapter
    generate` print it."""

    tokenizer: Any
    max_new_tokens: int
    num_beams: int = 1
    temperature: float = 0.0

    def __call__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 synced: bool = False) -> list[str]:
        """The texts written for a batch of sources. ``synced``: every process runs the same number
        of forward passes, also after its own texts ended (FSDP2 gathers weights in each pass)."""
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                             num_beams=self.num_beams, synced_gpus=synced, **sampling)
        return self.decode(ids)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids (label padding -100 allowed) as texts."""
        ids = ids.masked_fill(ids == IGNORE_INDEX, self.tokenizer.pad_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def text_generation(recipe: Recipe, tokenizer: Any) -> TextGeneration | None:
    """How a seq2seq run's evaluation generates; None for the other tasks, scored from the logits."""
    if recipe.data.task != "seq2seq":
        return None
    return TextGeneration(tokenizer, recipe.train.max_target_length, recipe.train.generation_num_beams)


def evaluate(model: AdapterModel, split, collator: Callable, task: str, label_names: list[str] | None,
             batch_size: int, device: torch.device, accelerator: Accelerator | None = None,
             generation: TextGeneration | None = None) -> dict[str, float]:
    """Loss and task metrics of ``model`` on a tokenized split. A seq2seq model (``generation``
    given, see `text_generation`) is scored on the texts it writes for the sources, compared with
    the targets. Under several processes each takes its share of every batch and the results are
    gathered, so every process returns the metrics a single process computes (every process must
    call it)."""
    world = accelerator.num_processes if accelerator is not None else 1
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    model.eval()
    results = []  # per batch: (rows, loss, loss units, predictions, labels) of this process's share
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            full = collate(collator, split, list(range(start, min(start + batch_size, len(split)))))
            rows, real = share(len(full["input_ids"]), accelerator)
            batch = {k: v[rows].to(device) for k, v in full.items()}
            out = model(**batch)
            written = None if generation is None else \
                generation(unwrapped, batch["input_ids"], batch["attention_mask"], synced=world > 1)
            if not real:
                continue  # ran only to keep the processes' collective operations in step
            if written is not None:
                predicted, gold = written, generation.decode(batch["labels"])
            else:
                logits = out.logits.float()
                if task in TOKEN_TASKS:
                    logits = logits.argmax(-1)  # keep ids only: full-vocabulary logits would not fit
                    extra = logits.shape[1] - batch["labels"].shape[1]
                    logits = logits[:, extra:] if extra > 0 else logits  # a prompt's positions, in front
                predicted, gold = logits.cpu().numpy(), batch["labels"].cpu().numpy()
            results.append((start, len(full["input_ids"]), out.loss.item(), loss_units(batch["labels"], task),
                            predicted, gold))
    model.train()
    if world > 1:  # every process gets every share; within a batch, shares are in process order
        results = sorted(gather_object(results), key=lambda r: r[0])
    shares: dict[int, tuple[int, list[tuple[float, int]]]] = {}  # batch start -> (rows, [(loss, units)])
    predictions, labels = [], []
    for start, rows, loss, units, predicted, gold in results:
        shares.setdefault(start, (rows, []))[1].append((loss, units))
        predictions.append(predicted)
        labels.append(gold)
    if generation is not None:  # lists of texts
        metrics = compute_metrics(task, [t for b in predictions for t in b], [t for b in labels for t in b])
    else:
        if task in TOKEN_TASKS:  # pad token-level batches to one length
            width = max(p.shape[1] for p in predictions)
            predictions = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-100) for p in predictions]
            labels = [np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=-100) for y in labels]
        metrics = compute_metrics(task, np.concatenate(predictions), np.concatenate(labels), label_names)
    # the mean over examples of each batch's loss (a token-level batch's: over its scored tokens)
    metrics["loss"] = float(sum(rows * _batch_loss(parts) for rows, parts in shares.values()) / len(split))
    return metrics


def _batch_loss(shares: list[tuple[float, int]]) -> float:
    """A batch's loss from its processes' shares: their losses weighted by their loss units."""
    if len(shares) == 1:
        return shares[0][0]
    return sum(loss * units for loss, units in shares) / max(sum(units for _, units in shares), 1)


def loss_units(labels: torch.Tensor, task: str) -> int:
    """How many terms a batch's mean loss averages: its scored tokens for token-level tasks (a
    causal LM scores each position's next token), else its examples."""
    if task not in TOKEN_TASKS:
        return labels.shape[0]
    if task in ("causal_lm", "instruct"):
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def write_texts(recipe: Recipe, model: Any, generation: TextGeneration, sources: list[str]) -> list[str]:
    """What a seq2seq run writes for each source text (``data.source_prefix`` put before it, as in
    training), in batches of ``train.eval_batch_size``."""
    size = recipe.train.eval_batch_size or recipe.train.batch_size
    written: list[str] = []
    for start in range(0, len(sources), size):
        batch = [recipe.data.source_prefix + source for source in sources[start : start + size]]
        enc = generation.tokenizer(batch, padding=True, truncation=True, max_length=recipe.train.max_seq_length,
                                   return_tensors="pt").to(model.device)
        with torch.no_grad():
            written += generation(model, enc["input_ids"], enc["attention_mask"])
    return written
