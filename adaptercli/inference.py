"""The run-folder commands, on a finished run: evaluate its adapter on a split (`evaluate_run`),
label texts (`predict`), and continue prompts or write a seq2seq run's texts (`generate`)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from .data import chat_text, load_data, make_collator, tokenize_dataset
from .errors import AdapterCliError
from .evaluation import TextGeneration, evaluate, text_generation, write_texts
from .model import next_tokens
from .runs import load_run


def evaluate_run(run_dir: str | Path, split: str = "validation") -> dict[str, float]:
    """Loss and task metrics of a finished run's adapter on ``split`` of its data, evaluated as in training."""
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
    if kind not in PREDICT_HEADS:
        raise AdapterCliError(f"predict supports classification, regression and tagging heads; this run's head is '{kind}'")
    id2label = head.config.id2label or {}
    if kind == "tagging":
        words = [text.split() for text in texts]
        enc = tokenizer(words, is_split_into_words=True, padding=True, truncation=True,
                        max_length=recipe.train.max_seq_length, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        return [{"text": text, **tag_words(id2label, row_words, enc.word_ids(i), logits[i])}
                for i, (text, row_words) in enumerate(zip(texts, words, strict=True))]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=recipe.train.max_seq_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.float()
    return [{"text": text, **prediction(kind, id2label, row)} for text, row in zip(texts, logits, strict=True)]


# The heads `predict` (and `adapter serve`) label texts with: one prediction per text, and tagging
# (one tag per word: a text is split into words at white space, as the tagging data holds them).
SEQUENCE_HEADS = ("classification", "multilabel_classification", "regression")
PREDICT_HEADS = (*SEQUENCE_HEADS, "tagging")


def tag_words(id2label: dict[int, str], words: list[str], word_ids: list[int | None],
              logits: torch.Tensor) -> dict[str, Any]:
    """A tagging head's prediction for one text: each word with its tag and the tag's probability,
    read at the word's first sub-token (where training puts a word's label). ``word_ids``: the
    word of each position of ``logits`` (None: a special or padding token); words cut off by the
    length limit are left out. Positions ``logits`` has beyond ``word_ids`` are a prompt-tuning
    prompt's, in front of the input (or after its first, special token)."""
    tokens, seen = [], set()
    extra = logits.shape[0] - len(word_ids)
    for position, word in enumerate(word_ids):
        if word is None or word in seen:
            continue
        seen.add(word)
        probs = torch.softmax(logits[position + extra].float(), -1)
        best = int(probs.argmax())
        tokens.append({"token": words[word], "tag": id2label.get(best, str(best)), "probability": probs[best].item()})
    return {"tokens": tokens}


def prediction(kind: str, id2label: dict[int, str], logits: torch.Tensor) -> dict[str, Any]:
    """One text's prediction from its head's logits: the label and its probability, the labels
    over 0.5 with every probability (multi-label), or the value (regression)."""
    logits = logits.float()
    if kind == "regression":
        return {"value": logits.item()}
    if kind == "multilabel_classification":
        probs = torch.sigmoid(logits)
        return {"labels": [id2label.get(i, str(i)) for i in range(len(probs)) if probs[i] > 0.5],
                "probabilities": {id2label.get(i, str(i)): round(p.item(), 4) for i, p in enumerate(probs)}}
    probs = torch.softmax(logits, -1)
    best = int(probs.argmax())
    return {"label": id2label.get(best, str(best)), "probability": probs[best].item()}


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
    stop = stop_tokens(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    return [answer(model, tokenizer, prompt, chat, stop, max_new_tokens, temperature, generator) for prompt in prompts]


def stop_tokens(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: end-of-sequence and the usual end-of-turn markers."""
    stop = {tokenizer.eos_token_id, *_as_list(getattr(model.config, "eos_token_id", None))} - {None}
    return stop | {i for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
                   if (i := tokenizer.convert_tokens_to_ids(t)) not in (None, tokenizer.unk_token_id)}


def answer(model: Any, tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool, stop: set[int],
           max_new_tokens: int, temperature: float, generator: torch.Generator) -> str:
    """One prompt continued (``chat``: answered as a user turn; a list: chat messages answered) by
    the active setup, token by token."""
    return answer_rows(model, tokenizer, [Continuation(prompt, chat, max_new_tokens, temperature, generator)], stop)[0]


@dataclasses.dataclass
class Continuation:
    """One prompt of :func:`answer_rows`: how to read it, how far and how to sample, and the
    setup its row runs (an adapter's composition block; None: the active setup)."""

    prompt: str | list[dict[str, str]]
    chat: bool
    max_new_tokens: int
    temperature: float
    generator: torch.Generator
    setup: Any = None


def answer_rows(model: Any, tokenizer: Any, rows: list[Continuation], stop: set[int], cache: bool = True) -> list[str]:
    """Several prompts continued together, one forward pass per token for all rows: left-padded
    (positions count real tokens), each row through its own setup (different adapters mixed in
    one batch), sampled with its own temperature and generator, until each has written its
    ``max_new_tokens`` or a stop token (rows that ended ride along unread). Each row's answer is
    the one :func:`answer` gives it alone. With a KV cache where every row's setup allows one
    (``model.next_tokens``: LoRA and its variants, bottleneck adapters, prefix tuning, their unions,
    fusions and stacks of them, without gates); otherwise (ReFT, gated adapters; ``cache=False``:
    always) every step reads each row's whole text again, as training does."""
    ids = [_prompt_ids(tokenizer, row.prompt, row.chat) for row in rows]
    new: list[list[int]] = [[] for _ in rows]
    live = [i for i, row in enumerate(rows) if row.max_new_tokens > 0]
    if not live:
        return ["" for _ in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(ids[i]) for i in live)
    input_ids = torch.tensor([[pad] * (longest - len(ids[i])) + ids[i] for i in live], device=model.device)
    mask = None  # no padding: the one-row path training takes
    if any(len(ids[i]) < longest for i in live):
        mask = torch.tensor([[0] * (longest - len(ids[i])) + [1] * len(ids[i]) for i in live], device=model.device)
    setups = [rows[i].setup for i in live]
    one = len({repr(setup) for setup in setups}) == 1  # one setup for all: run it, no per-row grouping
    running = model.running(setups[0]) if one and setups[0] is not None else contextlib.nullcontext()
    with torch.no_grad(), running:
        steps = next_tokens(model, input_ids, mask, None if one else setups, cache)
        logits, going = next(steps), set(live)
        while True:
            going = {i for j, i in enumerate(live) if i in going and _write(rows[i], new[i], logits[j], stop)}
            if not going:
                break
            logits = steps.send(torch.tensor([new[i][-1] if i in going else pad for i in live], device=model.device))
        steps.close()
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]


def _write(row: Continuation, written: list[int], logits: torch.Tensor, stop: set[int]) -> bool:
    """Sample the row's next token from ``logits`` into ``written``; whether the row goes on."""
    token = _next_token(logits, row.temperature, row.generator)
    if token in stop:
        return False
    written.append(token)
    return len(written) < row.max_new_tokens


def _prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = chat_text(tokenizer, messages, add_generation_prompt=True) if chat else prompt
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    logits = logits.float()
    if temperature > 0:
        return int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
    return int(logits.argmax())


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]
