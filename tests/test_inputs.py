"""Every local input format the docs list (docs/recipes.md: csv, tsv, json, jsonl, parquet, conll), plain and
compressed (.gz, .bz2, .xz), reads back to the same examples — with the format named in the recipe
and with the format inferred from the file name."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adaptercli.data import load_data
from adaptercli.recipe import DataSection, load_recipe

TEXTS = ["a fine, warm film", "dull", 'the "best" one', "utterly bad\tand long", "ok"]
LABELS = ["pos", "neg", "pos", "neg", "pos"]
SENTENCES = [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"], ["ok"]]
TAGS = [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"], ["O"]]
COMPRESS = {"": None, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def _write(path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "json":  # one JSON array of records, not JSON lines
        path.write_text(json.dumps(frame.to_dict("records")))
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:  # conll: a word and its tag per line, a blank line between sentences
        path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(s, ts, strict=True))
                                    for s, ts in zip(SENTENCES, TAGS, strict=True)) + "\n")


def _input_file(folder: Path, fmt: str, compression: str) -> Path:
    plain = folder / f"train.{fmt}"
    _write(plain, fmt)
    if not compression:
        return plain
    packed = folder / f"train.{fmt}{compression}"
    packed.write_bytes(COMPRESS[compression](plain.read_bytes()))
    plain.unlink()
    return packed


def _assert_examples(loaded, fmt: str) -> None:
    train = loaded.splits["train"]
    if fmt == "conll":
        assert train["text"] == SENTENCES
        assert [[loaded.label_names[i] for i in row] for row in train["label"]] == TAGS
    else:
        assert train["text"] == TEXTS
        assert [loaded.label_names[i] for i in train["label"]] == LABELS


FORMATS = ["csv", "tsv", "json", "jsonl", "parquet", "conll"]


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_compression_reads(fmt: str, compression: str, tmp_path: Path) -> None:
    path = _input_file(tmp_path, fmt, compression)
    task = "tagging" if fmt == "conll" else "classification"
    _assert_examples(load_data(DataSection(source=fmt, train_file=str(path), validation_file=str(path), task=task)), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipe_infers_the_format_from_the_file_name(fmt: str, tmp_path: Path) -> None:
    path = _input_file(tmp_path, fmt, ".xz" if fmt in ("csv", "conll") else ".gz")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": "minilm"},
        "data": {"train_file": str(path), "validation_file": str(path),
                 "task": "tagging" if fmt == "conll" else "classification"},
        "output_dir": str(tmp_path / "run"),
    }))
    loaded = load_recipe(recipe)
    assert loaded.data.source == fmt
    _assert_examples(load_data(loaded.data), fmt)
