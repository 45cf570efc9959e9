"""Data sets: loading, normalising columns and labels, tokenizing and batching.

Every source ends in the same shape: a `datasets.DatasetDict` with ``train``, ``validation`` and
optionally ``test``, whose columns are

- ``text``: a string, or for tagging a list of words;
- ``text_pair`` (optional): the second string of sentence-pair tasks;
- ``label`` (absent for mlm/causal_lm): a class id (classification), a float (regression), a
  multi-hot list of 0/1 (multilabel) or a list of tag ids, one per word (tagging).

Instruction tuning (``instruct``) has one column instead, ``messages``: a conversation, a list of
``{"role": "system" | "user" | "assistant", "content": str}``, read from a ``messages`` column or
built from a prompt and a response column. It is rendered with the tokenizer's chat template and
only the assistant turns are scored.

Sequence to sequence (``seq2seq``: summarization, translation) has ``text``, the source text with
the recipe's ``source_prefix`` before it, and ``target``, the text to write (absent from a test
split without targets).

Hub data sets and local files share `normalise_columns`, so a local copy of a Hub data set in the
same layout (a folder with a README that declares its configs, or plain files) loads exactly like
the Hub one.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict
from datasets.exceptions import DatasetNotFoundError
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from adaptercli.assets import OFFLINE_DATASETS, offline_dataset_path
from adaptercli.errors import AdapterCliError
from adaptercli.hub import hub_access
from adaptercli.metrics import IGNORE_INDEX
from adaptercli.recipe import DataSection

LM_TASKS = ("mlm", "causal_lm", "instruct")

# Column names tried, in order, when a recipe names none (GLUE, SuperGLUE, CoNLL and common files).
_PAIR_COLUMNS = [
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("text1", "text2"),
]
_TEXT_COLUMNS = ["text", "sentence", "tokens", "content", "review", "document"]
_LABEL_COLUMNS = ["label", "labels", "ner_tags", "tags", "score", "target"]
_PROMPT_COLUMNS = ["prompt", "instruction", "question", "input", "query"]
_RESPONSE_COLUMNS = ["response", "completion", "answer", "output"]
# Source and target columns of common summarization and text-to-text sets (XSum, CNN/DailyMail,
# SAMSum, BillSum, ...); translation sets (WMT, OPUS) have a `translation` column instead.
_SEQ2SEQ_COLUMNS = [
    ("document", "summary"),
    ("article", "highlights"),
    ("article", "abstract"),
    ("dialogue", "summary"),
    ("text", "summary"),
    ("source", "target"),
    ("src", "tgt"),
    ("input", "output"),
]
_ROLES = ("system", "user", "assistant")
_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# The `datasets` packaged builder (and its options) that reads each file format.
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
}


@dataclass
class LoadedData:
    """The normalised splits of a data set.

    Attributes:
        splits: ``train``, ``validation`` and optionally ``test`` (columns described in the module doc).
        label_names: names of the label ids; None for regression and language modelling.
        task: the task the labels serve.
    """

    splits: DatasetDict
    label_names: list[str] | None
    task: str


def load_data(config: DataSection, seed: int = 42) -> LoadedData:
    """Load the data set a recipe's ``data`` section describes.

    Args:
        config: the ``data`` section (validated by `adaptercli.recipe.load_recipe`).
        seed: seeds the held-out validation split and the ``max_*_samples`` sampling.

    Raises:
        AdapterCliError: the data cannot be reached, or its columns or labels do not fit the task.
    """
    source = config.source
    task = config.task or (OFFLINE_DATASETS[source].task if source in OFFLINE_DATASETS else "classification")
    if source in OFFLINE_DATASETS:
        raw, label_names = _OFFLINE_READERS[source](offline_dataset_path(source))
        if task == "instruct":
            splits, label_names = conversations(DatasetDict(train=raw), config), None
        else:
            splits, label_names = encode_labels(DatasetDict(train=raw), task, label_names)
    else:
        raw = load_hub_dataset(config.name, config.subset) if source == "hub" else load_files(config)
        if task == "instruct":
            splits, label_names = conversations(raw, config), None
        elif task == "seq2seq":
            splits, label_names = source_target_pairs(raw, config), None
        else:
            splits, label_names = normalise_columns(raw, config, task)
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=config.validation_split, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    for name, limit in [
        ("train", config.max_train_samples),
        ("validation", config.max_eval_samples),
        ("test", config.max_eval_samples),
    ]:
        if limit is not None and name in splits and len(splits[name]) > limit:
            splits[name] = splits[name].shuffle(seed=seed).select(range(limit))
    if task == "seq2seq" and config.source_prefix:  # after sampling: only the examples kept are rewritten
        splits = splits.map(lambda batch: {"text": [config.source_prefix + text for text in batch["text"]]},
                            batched=True)
    return LoadedData(splits, label_names, task)


# --- sources ---------------------------------------------------------------------------------


def load_hub_dataset(name: str | None, subset: str | None = None) -> DatasetDict:
    """Load a data set from the Hugging Face Hub (or a local folder laid out like a Hub repo).

    Raises:
        AdapterCliError: the Hub cannot be reached or has no such data set; the message says how
            to train from local files instead.
    """
    offline_hint = (
        "to train without the Hub, download its files and set data.source to csv, json or parquet "
        "with data.train_file (and data.validation_file), or set data.name to a local copy of the "
        "dataset repository"
    )
    label = f"{name}" + (f" ({subset})" if subset else "")
    # `datasets` caches a local folder under its name alone, so edited files would load stale
    # (huggingface/datasets#2956): rebuild it each time, skipping the size checks against the
    # stale copy's record. Local files are cheap to read again.
    rebuild = {"download_mode": "force_redownload", "verification_mode": "no_checks"}
    local = name is not None and Path(name).is_dir()
    try:
        if local:
            return datasets.load_dataset(name, subset, **rebuild)
        with hub_access():  # an unreachable Hub fails in seconds (cached copies still load)
            return datasets.load_dataset(name, subset)
    except ConnectionError as error:
        raise AdapterCliError(
            f"could not reach dataset {label} on the Hugging Face Hub: {error}; {offline_hint}"
        ) from None
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as error:
        # ValueError is how `datasets` reports an unknown subset (config) name.
        raise AdapterCliError(f"could not load dataset {label}: {error}".splitlines()[0]) from None


def load_files(config: DataSection) -> DatasetDict:
    """Load ``train_file``/``validation_file``/``test_file`` in the format ``config.source``.

    Compressed files (``.gz``, ``.bz2``, ...) are read transparently.
    """
    files = {
        split: file
        for split, file in [
            ("train", config.train_file),
            ("validation", config.validation_file),
            ("test", config.test_file),
        ]
        if file is not None
    }
    try:
        if config.source == "conll":
            return DatasetDict({split: read_conll(file) for split, file in files.items()})
        if config.source == "parquet" and any(Path(file).suffix in _OPENERS for file in files.values()):
            return DatasetDict({split: read_parquet(file) for split, file in files.items()})
        builder, options = _BUILDERS[config.source]
        return datasets.load_dataset(builder, data_files=files, **options)
    except Exception as error:  # any parse failure of a user's file is reported the same way
        names = ", ".join(str(f) for f in files.values())
        while error.__cause__ is not None or error.__context__ is not None:  # the root cause says most
            error = error.__cause__ or error.__context__
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise AdapterCliError(
            f"data: cannot read {names} as {config.source} ({detail}); check the file and data.source"
        ) from None


def read_parquet(path: str | Path) -> Dataset:
    """Read a parquet file, also one compressed as a whole (``x.parquet.gz``): parquet compresses
    inside the file, and the `datasets` parquet reader does not undo an outer compression."""
    opener = _OPENERS.get(Path(path).suffix, open)
    with opener(path, "rb") as handle:
        return Dataset.from_pandas(pd.read_parquet(io.BytesIO(handle.read())), preserve_index=False)


def read_conll(path: str | Path) -> Dataset:
    """Read a CoNLL-style file: one ``word ... tag`` line per word, blank lines between sentences.

    The word is the first column and the tag the last, so both two-column BIO files and CoNLL-2003's
    four columns work. Returns columns ``text`` (list of words) and ``label`` (list of tags).
    """
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    word_tags: list[str] = []
    opener = _OPENERS.get(Path(path).suffix, open)
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = [*handle, ""]  # the trailing blank line closes the last sentence
    for line in lines:
        columns = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        if not any(column.strip() for column in columns):
            if words:
                sentences.append(words)
                tags.append(word_tags)
            words, word_tags = [], []
        elif columns[0] != "-DOCSTART-":
            words.append(columns[0])
            word_tags.append(columns[-1].strip())
    return Dataset.from_dict({"text": sentences, "label": tags})


def _read_rotten_tomatoes(path: Path) -> tuple[Dataset, list[str]]:
    names = ["rotten", "fresh"]
    # The corpus also holds movie plot summaries, labelled "plot"; they carry no sentiment.
    frame = pd.read_csv(path).dropna(subset=["text"])
    frame = frame[frame["category"].isin(names)]
    return Dataset.from_dict({"text": frame["text"].tolist(), "label": frame["category"].tolist()}), names


def _read_sms_spam(path: Path) -> tuple[Dataset, list[str]]:
    frame = pd.read_csv(path).dropna(subset=["text"])
    return Dataset.from_dict({"text": frame["text"].tolist(), "label": frame["spam"].astype(int).tolist()}), [
        "ham",
        "spam",
    ]


def _read_trec(path: Path, fine: bool) -> tuple[Dataset, None]:
    # Lines look like "DESC:manner How did serfdom develop ... ?"; the file repeats most of them.
    lines = dict.fromkeys(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    texts, labels = [], []
    for line in lines:
        label, _, text = line.partition(" ")
        texts.append(text)
        labels.append(label if fine else label.split(":")[0])
    return Dataset.from_dict({"text": texts, "label": labels}), None


# TREC's fine question types as the answers an assistant would give (the label definitions that
# ship beside the questions, in plain words).
_TREC_ANSWERS = {
    "ABBR:abb": "an abbreviation", "ABBR:exp": "the expression an abbreviation stands for",
    "DESC:def": "a definition", "DESC:desc": "a description", "DESC:manner": "the manner of an action",
    "DESC:reason": "a reason", "ENTY:animal": "an animal", "ENTY:body": "an organ of the body",
    "ENTY:color": "a color", "ENTY:cremat": "a creative work (an invention, a book, a film)",
    "ENTY:currency": "a currency", "ENTY:dismed": "a disease or medicine", "ENTY:event": "an event",
    "ENTY:food": "a food", "ENTY:instru": "a musical instrument", "ENTY:lang": "a language",
    "ENTY:letter": "a letter", "ENTY:other": "some other entity", "ENTY:plant": "a plant",
    "ENTY:product": "a product", "ENTY:religion": "a religion", "ENTY:sport": "a sport",
    "ENTY:substance": "an element or substance", "ENTY:symbol": "a symbol or sign",
    "ENTY:techmeth": "a technique or method", "ENTY:termeq": "an equivalent term",
    "ENTY:veh": "a vehicle", "ENTY:word": "a word with a special property",
    "HUM:desc": "a description of a person", "HUM:gr": "a group or organization of persons",
    "HUM:ind": "an individual person", "HUM:title": "the title of a person", "LOC:city": "a city",
    "LOC:country": "a country", "LOC:mount": "a mountain", "LOC:other": "some other location",
    "LOC:state": "a state", "NUM:code": "a postcode or other code", "NUM:count": "a count",
    "NUM:date": "a date", "NUM:dist": "a distance", "NUM:money": "a price", "NUM:ord": "a rank",
    "NUM:other": "some other number", "NUM:perc": "a percentage", "NUM:period": "a period of time",
    "NUM:speed": "a speed", "NUM:temp": "a temperature", "NUM:volsize": "a size, area or volume",
    "NUM:weight": "a weight",
}
TREC_INSTRUCTION = "What kind of answer does this question ask for?"


def _read_trec_instruct(path: Path) -> tuple[Dataset, None]:
    """TREC questions as instructions: the prompt asks what kind of answer the question wants, the
    response names it (``Question: Who ...?`` -> ``It asks for an individual person.``)."""
    questions, _ = _read_trec(path, fine=True)
    prompts = [f"{TREC_INSTRUCTION}\nQuestion: {text}" for text in questions["text"]]
    responses = [f"It asks for {_TREC_ANSWERS[label]}." for label in questions["label"]]
    return Dataset.from_dict({"prompt": prompts, "response": responses}), None


def _read_vader(path: Path, binary: bool) -> tuple[Dataset, list[str] | None]:
    frame = pd.read_csv(path).dropna(subset=["text"])
    if not binary:
        return Dataset.from_dict(
            {"text": frame["text"].tolist(), "label": frame["sentiment"].astype(float).tolist()}
        ), None
    # A mean rating of exactly 0 is neither positive nor negative; SST-2 drops neutral sentences too.
    frame = frame[frame["sentiment"] != 0]
    labels = (frame["sentiment"] > 0).astype(int).tolist()
    return Dataset.from_dict({"text": frame["text"].tolist(), "label": labels}), ["negative", "positive"]


def _read_ner_tweets(path: Path) -> tuple[Dataset, None]:
    return read_conll(path), None


_OFFLINE_READERS: dict[str, Callable[[Path], tuple[Dataset, list[str] | None]]] = {
    "rotten_tomatoes": _read_rotten_tomatoes,
    "sms_spam": _read_sms_spam,
    "trec": functools.partial(_read_trec, fine=False),
    "trec_fine": functools.partial(_read_trec, fine=True),
    "trec_instruct": _read_trec_instruct,
    "vader_movies": functools.partial(_read_vader, binary=False),
    "vader_movies_binary": functools.partial(_read_vader, binary=True),
    "vader_amazon": functools.partial(_read_vader, binary=False),
    "vader_tweets": functools.partial(_read_vader, binary=False),
    "vader_nyt": functools.partial(_read_vader, binary=False),
    "ner_tweets": _read_ner_tweets,
}


# --- columns and labels ----------------------------------------------------------------------


def normalise_columns(
    raw: DatasetDict, config: DataSection, task: str
) -> tuple[DatasetDict, list[str] | None]:
    """Rename a data set's splits and columns to the common shape and encode its labels.

    Columns not named in ``config`` are found among common names (``sentence1``/``sentence2``,
    ``text``, ``label``, ...); other columns are dropped.
    """
    splits = DatasetDict({_SPLIT_ALIASES.get(name, name): split for name, split in raw.items()})
    if "train" not in splits:
        raise AdapterCliError(f"data: no train split; the data set has {', '.join(splits) or 'none'}")
    columns = splits["train"].column_names
    text, pair = config.text_column, config.text_pair_column
    if text is None:
        text, pair = next(((a, b) for a, b in _PAIR_COLUMNS if a in columns and b in columns), (None, pair))
        text = text or next((name for name in _TEXT_COLUMNS if name in columns), None)
    label = config.label_column or next((name for name in _LABEL_COLUMNS if name in columns), None)
    wanted = {"text": text, "text_pair": pair, "label": None if task in LM_TASKS else label}
    if text is None:
        raise AdapterCliError(
            f"data.text_column: no text column found among {', '.join(columns)}; set data.text_column"
        )
    if task not in LM_TASKS and label is None:
        raise AdapterCliError(
            f"data.label_column: no label column found among {', '.join(columns)}; set data.label_column"
        )
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise AdapterCliError(
                f"data.{key}_column: no column {column!r}; the data has {', '.join(columns)}"
            )
    renamed = DatasetDict()
    for name, split in splits.items():
        if name not in ("train", "validation", "test"):
            continue
        # A test split may come without labels; everything else must have every named column.
        present = {new: old for new, old in wanted.items() if old is not None and old in split.column_names}
        split = split.select_columns(list(present.values()))
        split = split.rename_columns({old: new for new, old in present.items() if old != new})
        # `datasets` reads a test file without the label column as one full of nulls.
        if (
            name == "test"
            and "label" in split.column_names
            and all(value is None for value in split["label"])
        ):
            split = split.remove_columns("label")
        renamed[name] = split
    return encode_labels(renamed, task, config.labels, config.label_map)


def conversations(raw: DatasetDict, config: DataSection) -> DatasetDict:
    """The splits of an instruction data set as one ``messages`` column of conversations: a
    ``messages`` column as it is (checked), or ``prompt_column`` / ``response_column`` (found
    among common names when not set) as one user turn and one assistant turn."""
    splits = _known_splits(raw)
    columns = splits["train"].column_names
    if "messages" in columns and not (config.prompt_column or config.response_column):
        for name, split in splits.items():
            for row, messages in enumerate(split["messages"]):
                _check_conversation(messages, f"data: {name} row {row}")
        return DatasetDict({name: split.select_columns(["messages"]) for name, split in splits.items()})
    prompt = config.prompt_column or next((c for c in _PROMPT_COLUMNS if c in columns), None)
    response = config.response_column or next((c for c in _RESPONSE_COLUMNS if c in columns), None)
    for key, column, tried in (("prompt_column", prompt, _PROMPT_COLUMNS), ("response_column", response, _RESPONSE_COLUMNS)):
        if column is None:
            raise AdapterCliError(f"data.{key}: instruction data needs a messages column, or prompt and response "
                                  f"columns (tried {', '.join(tried)}); the data has {', '.join(columns)}")
        if column not in columns:
            raise AdapterCliError(f"data.{key}: no column {column!r}; the data has {', '.join(columns)}")

    def as_messages(row: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": str(row[prompt])},
                             {"role": "assistant", "content": str(row[response])}]}

    return DatasetDict({name: split.map(as_messages, remove_columns=split.column_names)
                        for name, split in splits.items()})


def source_target_pairs(raw: DatasetDict, config: DataSection) -> DatasetDict:
    """The splits of a seq2seq data set as ``text`` (the source) and ``target`` columns, taken from
    ``source_column`` and ``target_column`` (found among common pairs when not set), or from a
    ``translation`` column of ``{language: text}`` rows with ``source_lang`` and ``target_lang``.
    A test split may come without targets. Columns are selected and renamed, not rewritten, so a
    large corpus is not copied before ``max_train_samples`` samples it."""
    splits = _known_splits(raw)
    columns = splits["train"].column_names
    if config.source_column is None and config.target_column is None and "translation" in columns:
        languages = [c.removeprefix("translation.") for c in splits["train"].flatten().column_names
                     if c.startswith("translation.")]
        if config.source_lang is None:
            raise AdapterCliError(f"data.source_lang: the data has a translation column ({', '.join(languages)}); "
                                  "set data.source_lang and data.target_lang")
        for key, language in (("source_lang", config.source_lang), ("target_lang", config.target_lang)):
            if language not in languages:
                raise AdapterCliError(f"data.{key}: no language {language!r} in the translation column; it has "
                                      f"{', '.join(languages)}")
        splits = DatasetDict({name: split.flatten() for name, split in splits.items()})
        source, target = f"translation.{config.source_lang}", f"translation.{config.target_lang}"
    elif config.source_lang is not None:
        raise AdapterCliError(f"data.source_lang: goes with a translation column of {{language: text}} rows; the data "
                              f"has {', '.join(columns)} (set data.source_column and data.target_column instead)")
    else:
        source, target = config.source_column, config.target_column
        pair = next(((a, b) for a, b in _SEQ2SEQ_COLUMNS if a in columns and b in columns
                     and source in (None, a) and target in (None, b)), None)
        source = source or (pair[0] if pair else next((a for a, _ in _SEQ2SEQ_COLUMNS if a in columns), None))
        target = target or (pair[1] if pair else next((b for _, b in _SEQ2SEQ_COLUMNS if b in columns), None))
        if source is None or target is None:
            tried = ", ".join(f"{a}/{b}" for a, b in _SEQ2SEQ_COLUMNS)
            key = "source_column" if source is None else "target_column"
            raise AdapterCliError(f"data.{key}: no source and target columns found among {', '.join(columns)} "
                                  f"(tried {tried}, translation); set data.source_column and data.target_column")
    result = DatasetDict()
    for name, split in splits.items():
        wanted = {"source": source, "target": target}
        if name == "test" and target not in split.column_names:
            del wanted["target"]  # a test split may come without targets
        for key, column in wanted.items():
            _check_text_column(split, name, column, f"data.{key}_column")
        split = split.select_columns(list(wanted.values()))
        result[name] = split.rename_columns({old: new for new, old in (("text", source), ("target", target))
                                             if old in split.column_names and old != new})
    return result


def _check_text_column(split: Dataset, split_name: str, column: str, key: str) -> None:
    """`column` is in the split, holds strings and no nulls (read from the Arrow table: no row is
    loaded into Python)."""
    if column not in split.column_names:
        raise AdapterCliError(f"{key}: no column {column!r} in the {split_name} split; it has "
                              f"{', '.join(split.column_names)}")
    feature = split.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise AdapterCliError(f"{key}: {column} holds {getattr(feature, 'dtype', None) or type(feature).__name__}, "
                              "not text")
    missing = split.data.column(column).null_count
    if missing:
        raise AdapterCliError(f"{key}: {missing} rows of the {split_name} split have no {column} (null); remove them")


def _known_splits(raw: DatasetDict) -> DatasetDict:
    """The train, validation (also named dev, valid, val) and test splits; a train split is required."""
    splits = DatasetDict({_SPLIT_ALIASES.get(name, name): split for name, split in raw.items()
                          if _SPLIT_ALIASES.get(name, name) in ("train", "validation", "test")})
    if "train" not in splits:
        raise AdapterCliError(f"data: no train split; the data set has {', '.join(raw) or 'none'}")
    return splits


def _check_conversation(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise AdapterCliError(f"{where}: messages must be a list of {{role, content}} turns, got {messages!r:.80}")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
            raise AdapterCliError(f"{where}: each turn needs a role ({', '.join(_ROLES)}) and a text content, "
                                  f"got {turn!r:.80}")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise AdapterCliError(f"{where}: the conversation has no assistant turn to learn from")


def encode_labels(
    splits: DatasetDict,
    task: str,
    label_names: list[str] | None = None,
    label_map: dict[Any, Any] | None = None,
) -> tuple[DatasetDict, list[str] | None]:
    """Turn the raw ``label`` column into ids for `task` and return the label names.

    Raw values go through `label_map` first, then become ids: by name in `label_names` (or, for an
    integer that names no label, as the id itself). Without `label_names`, names come from a
    `ClassLabel` feature, or else are the sorted distinct values of all splits.
    """
    labelled = {name for name, split in splits.items() if "label" in split.column_names}
    if task in LM_TASKS:
        return DatasetDict(
            {
                name: split.remove_columns("label") if name in labelled else split
                for name, split in splits.items()
            }
        ), None
    if task == "regression":
        as_float = datasets.Value("float64")
        return DatasetDict(
            {
                name: split.cast_column("label", as_float) if name in labelled else split
                for name, split in splits.items()
            }
        ), None
    feature = splits["train"].features["label"]
    class_label = getattr(feature, "feature", feature)  # tagging labels are a list of ClassLabel
    if isinstance(class_label, ClassLabel) and label_names is None and label_map is None:
        return splits, list(class_label.names)

    def mapped(value: Any) -> Any:
        return label_map.get(value, label_map.get(str(value), value)) if label_map else value

    def raw_values(value: Any) -> list[Any]:
        if task == "multilabel" and isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value) if task in ("multilabel", "tagging") else [value]

    if label_names is None:
        found = {mapped(v) for name in labelled for row in splits[name]["label"] for v in raw_values(row)}
        label_names = _ordered_label_names(found, task)
    ids = {name: index for index, name in enumerate(label_names)}

    def label_id(value: Any) -> int:
        value = mapped(value)
        if str(value) in ids:
            return ids[str(value)]
        if isinstance(value, int) and 0 <= value < len(label_names):
            return value
        raise AdapterCliError(
            f"data: label {value!r} is not one of the labels {label_names}; fix data.labels or data.label_map"
        )

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        values = [label_id(v) for v in raw_values(row["label"])]
        if task == "multilabel":
            return {"label": [int(index in values) for index in range(len(label_names))]}
        return {"label": values if task == "tagging" else values[0]}

    label_feature = {
        "classification": ClassLabel(names=label_names),
        "tagging": datasets.List(ClassLabel(names=label_names)),
        "multilabel": datasets.List(datasets.Value("int64")),
    }[task]
    encoded = DatasetDict(splits)
    for name in labelled:
        # Explicit features: left to itself, `map` would keep the raw column's type (strings).
        features = datasets.Features({**splits[name].features, "label": label_feature})
        encoded[name] = splits[name].map(encode, features=features)
    return encoded, label_names


def _ordered_label_names(values: Iterable[Any], task: str) -> list[str]:
    """Label names in a stable order: numeric for numbers; for BIO tags "O" first, B before I per type."""
    values = set(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    names = sorted(str(v) for v in values)
    if task == "tagging":
        return sorted(names, key=lambda tag: (tag != "O", tag.partition("-")[2], tag))
    return names


# --- tokenization and batching ---------------------------------------------------------------


def tokenize_dataset(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, task: str, max_seq_length: int,
    max_target_length: int | None = None,
) -> DatasetDict:
    """Tokenize every split without padding (the collator pads each batch).

    Returns columns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like models)
    and, where the split has labels and the task is not language modelling, ``labels``. Tagging
    labels sit on each word's first sub-token; other sub-tokens and special tokens get -100.
    Seq2seq labels are the target's token ids (the decoder's input is made from them by the
    model), cut to `max_target_length` (default: `max_seq_length`).
    """

    if task == "instruct":
        return DatasetDict({
            name: split.map(lambda row: encode_conversation(tokenizer, row["messages"], max_seq_length),
                            remove_columns=split.column_names).filter(lambda row: row["scored"] > 0)
                       .remove_columns("scored")
            for name, split in splits.items()
        })

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        if task == "tagging":
            encoded = tokenizer(
                batch["text"], is_split_into_words=True, truncation=True, max_length=max_seq_length
            )
            if "label" in batch:
                encoded["labels"] = [
                    align_word_labels(encoded.word_ids(i), tags) for i, tags in enumerate(batch["label"])
                ]
            return encoded
        encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_seq_length)
        if task == "seq2seq":
            if "target" in batch:
                encoded["labels"] = tokenizer(text_target=batch["target"], truncation=True,
                                              max_length=max_target_length or max_seq_length)["input_ids"]
            return encoded
        if "label" in batch and task not in LM_TASKS:
            # BCE needs float targets; tensors built from these lists inherit the type.
            encoded["labels"] = (
                [[float(v) for v in row] for row in batch["label"]]
                if task == "multilabel"
                else batch["label"]
            )
        return encoded

    return DatasetDict(
        {
            name: split.map(encode, batched=True, remove_columns=split.column_names)
            for name, split in splits.items()
        }
    )


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """A conversation rendered with the tokenizer's chat template (the text the model reads)."""
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterCliError(f"data.task: instruct needs a tokenizer with a chat template; "
                              f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none (use an instruct "
                              "model's tokenizer, e.g. model.name_or_path=smollm2)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                        max_length: int) -> dict[str, Any]:
    """Token ids of a conversation and its labels: the assistant turns' tokens (their end-of-turn
    token included) are labelled with themselves, everything else (system, user, the template's
    role headers) with -100, so it adds no loss.

    The text between turns is tokenized piece by piece, each assistant turn on its own after the
    prompt that the chat template renders for it with ``add_generation_prompt=True`` — the same ids
    `adapter generate` feeds the model. Truncated to ``max_length`` tokens; ``scored`` counts the
    labelled tokens left (a conversation with none is dropped by `tokenize_dataset`).
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenized so far

    def add(text: str, scored: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece)
        labels.extend(piece if scored else [IGNORE_INDEX] * len(piece))

    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat_text(tokenizer, messages[:turn], add_generation_prompt=True)
        answered = chat_text(tokenizer, messages[: turn + 1])
        if not prompt.startswith(done) or not answered.startswith(prompt):
            raise AdapterCliError("data.task: instruct cannot split this chat template into prompt and answer "
                                  "(a longer conversation does not start with the text of a shorter one)")
        add(prompt[len(done):], scored=False)
        add(answered[len(prompt):], scored=True)
        done = answered
    full = chat_text(tokenizer, messages)
    add(full[len(done):] if full.startswith(done) else "", scored=False)
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "scored": sum(label != IGNORE_INDEX for label in labels)}


def align_word_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Give each token its word's label on the word's first sub-token, -100 everywhere else."""
    labels = []
    previous = None
    for word_id in word_ids:
        labels.append(IGNORE_INDEX if word_id is None or word_id == previous else word_labels[word_id])
        previous = word_id
    return labels


def make_collator(
    tokenizer: PreTrainedTokenizerBase, task: str, seed: int = 42, mlm_probability: float = 0.15
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The function that pads a list of tokenized examples into a batch of tensors for `task`.

    - classification, regression, multilabel: pad to the longest example; ``labels`` as given.
    - tagging, instruct: also pads ``labels`` with -100.
    - mlm: masks `mlm_probability` of the tokens (80% [MASK], 10% random, 10% kept) with a
      generator seeded by `seed`; ``labels`` are the original ids there and -100 elsewhere.
    - causal_lm: ``labels`` are the ``input_ids`` with padding replaced by -100 (the model shifts
      them). A tokenizer without a pad token gets its end-of-sequence token as one.
    - seq2seq: pads the sources, and the target ids in ``labels`` with -100 (the model builds its
      decoder inputs from them).
    """
    if task == "seq2seq":  # the targets are padded to their own longest, not the sources'
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    if task in ("tagging", "instruct"):  # labels given per token: padded with -100
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
    if task == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    if task == "causal_lm":
        if tokenizer.pad_token is None:
            # Llama-style tokenizers ship without one; padded positions are masked out of the
            # attention and the loss, so which id fills them does not matter.
            tokenizer.pad_token = tokenizer.eos_token
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
