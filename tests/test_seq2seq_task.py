"""The ``seq2seq`` recipe task (summarization, translation) on encoder-decoders with their own LM
head: ROUGE-L and chrF agree with `rouge_score` and `sacrebleu`; source and target columns are
found by name (or a ``translation`` column by language) and bad ones give one clear message; a
recipe trains a tiny T5 and a tiny BART through `train()` (the loss falls, only adapter weights
are trained and saved, evaluation generates and scores text), resumes bit-identically, and `adapter
generate`, `predict` and `eval` work on the run. The shipped CNN/DailyMail recipe trains on a
local copy in the Hub layout."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict, Features, Translation
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

from adaptercli.cli import app
from adaptercli.data import load_data, source_target_pairs
from adaptercli.errors import AdapterCliError, RecipeError
from adaptercli.inference import generate
from adaptercli.metrics import METRIC_NAMES, chrf, compute_metrics, rouge_l
from adaptercli.recipe import DataSection, load_recipe
from adaptercli.runs import prepare_model
from adaptercli.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
QUIET = Console(quiet=True)
WORDS = "the a cat dog sat ran on mat park big small red".split()
runner = CliRunner()


# --- metrics ---------------------------------------------------------------------------------------


def _varied_texts(seed: int, n: int) -> list[str]:
    """Texts that exercise both tokenizers: case, punctuation inside and around words, digits,
    accented and non-Latin letters, repeated words, extra whitespace, and empty strings."""
    pieces = ["The", "cat", "sat", "on", "the", "mat", ".", "Dogs", "don't", "bark", "at", "3am", "!", "café",
              "naïve", "Ünïcödé", "—", "hello-world", "e-mail:", "x@y.z", "(hi)", "Straße", "東京", "2024", "  ", "\t"]
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))) for _ in range(n)]
    return [*texts, "", "a", "ab", "the the the"]


def test_rouge_l_matches_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    predictions, references = _varied_texts(0, 300), _varied_texts(1, 300)
    expected = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    for pred, ref, score in zip(predictions, references, expected, strict=True):
        assert rouge_l([pred], [ref]) == pytest.approx(score, abs=1e-6), (pred, ref)
    assert rouge_l(predictions, references) == pytest.approx(np.mean(expected), abs=1e-6)
    assert 0 < np.mean(expected) < 1


def test_chrf_matches_sacrebleu() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    predictions, references = _varied_texts(2, 300), _varied_texts(3, 300)
    for pred, ref in zip(predictions[:100], references[:100], strict=True):
        assert chrf([pred], [ref]) == pytest.approx(sacrebleu.corpus_chrf([pred], [[ref]]).score, abs=1e-6), (pred, ref)
    corpus = sacrebleu.corpus_chrf(predictions, [references]).score  # counts summed over the corpus first
    assert chrf(predictions, references) == pytest.approx(corpus, abs=1e-6)
    assert 0 < corpus < 100


def test_metrics_by_hand() -> None:
    # words: the cat sat | the cat sat down -> LCS 3: precision 1, recall 3/4
    assert rouge_l(["The cat, sat"], ["the cat sat down"]) == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l(["!!!"], ["the cat"]) == 0.0  # no words on one side
    assert chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    # "ab" vs "abc": orders 1 and 2 only (the prediction has no 3-grams); P = (1 + 1) / 2, R = (2/3 + 1/2) / 2
    precision, recall = 1.0, (2 / 3 + 1 / 2) / 2
    assert chrf(["a b"], ["abc"]) == pytest.approx(100 * 5 * precision * recall / (4 * precision + recall))
    assert compute_metrics("seq2seq", ["the cat"], ["the cat"]) == {"rougeL": 1.0, "chrf": pytest.approx(100.0)}
    assert METRIC_NAMES["seq2seq"] == ("rougeL", "chrf")


# --- data ---------------------------------------------------------------------------------------------


def _splits(**columns: list) -> DatasetDict:
    return DatasetDict(train=Dataset.from_dict(columns))


@pytest.mark.parametrize("source, target", [("document", "summary"), ("article", "highlights"), ("text", "summary"),
                                            ("source", "target")])
def test_source_and_target_columns_are_found_by_name(source: str, target: str) -> None:
    raw = _splits(**{"id": [1, 2], source: ["a long text", "another one"], target: ["short", "brief"]})
    splits = source_target_pairs(raw, DataSection(task="seq2seq"))
    assert splits["train"].column_names == ["text", "target"]
    assert splits["train"]["text"] == ["a long text", "another one"] and splits["train"]["target"] == ["short", "brief"]
    raw["test"] = Dataset.from_dict({source: ["no summary yet"]})
    assert source_target_pairs(raw, DataSection(task="seq2seq"))["test"].column_names == ["text"]  # still generated for


def test_translation_column_and_source_prefix(tmp_path: Path) -> None:
    rows = [{"id": i, "translation": {"en": f"the cat {i}", "fr": f"le chat {i}"}} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataSection(source="jsonl", train_file=str(tmp_path / "train.jsonl"), task="seq2seq", source_lang="en",
                        target_lang="fr", source_prefix="translate English to French: ")
    data = load_data(config)
    row = data.splits["train"][0]
    assert set(row) == {"text", "target"} and data.task == "seq2seq" and data.label_names is None
    assert row["text"].startswith("translate English to French: the cat ") and row["target"].startswith("le chat ")
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 20  # 10% held out
    reverse = load_data(DataSection(**{**config.__dict__, "source_lang": "fr", "target_lang": "en", "source_prefix": ""}))
    assert reverse.splits["train"][0]["text"].startswith("le chat ")
    # the Hub's WMT sets declare the column as a `Translation` feature
    wmt = Dataset.from_dict({"translation": [{"de": "die Katze", "en": "the cat"}]},
                            features=Features({"translation": Translation(languages=["de", "en"])}))
    pairs = source_target_pairs(DatasetDict(train=wmt), DataSection(task="seq2seq", source_lang="de", target_lang="en"))
    assert pairs["train"][0] == {"text": "die Katze", "target": "the cat"}


@pytest.mark.parametrize("raw, config, message", [
    (_splits(document=["a"], summary=["b"]), DataSection(task="seq2seq", target_column="headline"),
     "data.target_column: no column 'headline' in the train split; it has document, summary"),
    (_splits(body=["a"], title=["b"]), DataSection(task="seq2seq"),
     "data.source_column: no source and target columns found among body, title (tried document/summary, "),
    (_splits(translation=[{"de": "a", "en": "b"}]), DataSection(task="seq2seq"),
     "data.source_lang: the data has a translation column (de, en); set data.source_lang and data.target_lang"),
    (_splits(translation=[{"de": "a", "en": "b"}]), DataSection(task="seq2seq", source_lang="de", target_lang="fr"),
     "data.target_lang: no language 'fr' in the translation column; it has de, en"),
    (_splits(document=["a"], summary=["b"]), DataSection(task="seq2seq", source_lang="de", target_lang="en"),
     "data.source_lang: goes with a translation column"),
    (_splits(document=["a"], summary=[3]), DataSection(task="seq2seq"), "data.target_column: summary holds int64, not text"),
    (_splits(document=["a", "b"], summary=["c", None]), DataSection(task="seq2seq"),
     "data.target_column: 1 rows of the train split have no summary (null); remove them"),
])
def test_bad_columns_give_one_clear_message(raw: DatasetDict, config: DataSection, message: str) -> None:
    with pytest.raises(AdapterCliError) as caught:
        source_target_pairs(raw, config)
    assert str(caught.value).startswith(message), str(caught.value)


def test_recipe_checks_for_seq2seq(tmp_path: Path, summaries: Path) -> None:
    def problems(**sections: dict) -> list[str]:
        recipe = {"model": {"name_or_path": "t5"}, "data": {"train_file": str(summaries), "task": "seq2seq"},
                  "output_dir": str(tmp_path / "run")}
        for key, values in sections.items():
            recipe[key] = {**recipe.get(key, {}), **values}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        try:
            load_recipe(tmp_path / "r.yaml")
        except RecipeError as error:
            return error.problems
        return []

    assert problems() == []
    assert problems(head={"type": "classification"}) == [
        "head.type: a seq2seq run writes text with the model's own LM head; remove head.type"]
    assert problems(data={"task": "classification", "source_prefix": "summarize: "}) == [
        "data.source_prefix: only for data.task seq2seq (this recipe's task is classification)"]
    assert problems(data={"source_lang": "en"})[0].startswith("data.source_lang: set both")
    assert problems(composition={"type": "fuse", "adapters": ["a", "b"]})[0].startswith(
        "composition.type: fuse trains a fusion with a new head; a seq2seq run keeps")
    assert problems(train={"metric_for_best": "rougeL", "max_target_length": 0}) == [
        "train.max_target_length: must be >= 1, got 0"]


# --- tiny models and a run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> Path:
    """96 jsonl rows: eight random words (document) -> a template naming the first two (summary),
    whose fixed words a tiny model learns in a few steps (and then writes more than an end token)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("summaries") / "train.jsonl"
    with open(path, "w") as handle:
        for _ in range(96):
            words = [rng.choice(WORDS) for _ in range(8)]
            handle.write(json.dumps({"id": rng.random(), "document": " ".join(words), "summary": f"a story of the {words[0]} and the {words[1]}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A saved 2-layer, 32-wide random T5 with a T5 tokenizer (Unigram, ``</s>`` ends each text)
    whose 93 pieces are the data's words and single characters."""
    folder = tmp_path_factory.mktemp("tiny-t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in [*WORDS, "summarize", "story", "of", "and"]]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + ".,:!?'-"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = AutoConfig.for_model("t5", d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=len(tokenizer),
                                  decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bart_dir(tmp_path_factory) -> Path:
    """A saved 2-layer, 32-wide random BART with a byte-level BART tokenizer without merges (one
    token per byte; ``<s>`` and ``</s>`` around each text). Its LM head is not tied to the
    embeddings (as in some BART and mT5 checkpoints): it must stay frozen all the same."""
    folder = tmp_path_factory.mktemp("tiny-bart")
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *bytes_to_unicode().values(), "<mask>"]
    tokenizer = BartTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = AutoConfig.for_model("bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0, init_std=0.2,
                                  tie_word_embeddings=False)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    return folder


# T5 runs LoRA behind the T5 prefix; BART a bottleneck adapter in the decoder's cross-attention too.
# Source and target lengths: T5's pieces are words, BART's bytes.
SETUPS = {"t5": ("lora", {"r": 8, "alpha": 16, "attn_matrices": ["q", "k", "v", "o"]}, "summarize: ", 32, 16),
          "bart": ("seq_bn", {"reduction_factor": 2, "cross_adapter": True}, "", 96, 40)}


def _write_recipe(folder: Path, model_dir: Path, data_file: Path, arch: str, data: dict | None = None,
                  **train: object) -> Path:
    method, config, prefix, source_length, target_length = SETUPS[arch]
    recipe = {"model": {"name_or_path": str(model_dir)}, "adapter": {"name": "summary", "method": method, "config": config},
              "data": {"train_file": str(data_file), "task": "seq2seq", "source_prefix": prefix, **(data or {})},
              "train": {"max_steps": 12, "save_steps": 6, "eval_steps": 6, "save_total_limit": 5, "batch_size": 8,
                        "logging_steps": 2, "learning_rate": 1e-2, "max_seq_length": source_length, "max_target_length": target_length,
                        "metric_for_best": "rougeL", **train},
              "output_dir": str(folder / "run")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_t5_dir: Path, tiny_bart_dir: Path, summaries: Path):
    """``trained(arch)``: the run folder of the recipe trained on the tiny model (once per module)."""
    runs: dict[str, Path] = {}

    def run(arch: str) -> Path:
        if arch not in runs:
            folder = tmp_path_factory.mktemp(f"run-{arch}")
            model_dir = {"t5": tiny_t5_dir, "bart": tiny_bart_dir}[arch]
            train(load_recipe(_write_recipe(folder, model_dir, summaries, arch)), console=QUIET)
            runs[arch] = folder / "run"
        return runs[arch]

    return run


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_recipe_trains_the_adapter_through_the_models_own_lm_head(arch: str, trained) -> None:
    run = trained(arch)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in history if not entry.get("eval")]
    evals = [entry for entry in history if entry.get("eval")]
    assert losses[-1] < 0.85 * losses[0], losses  # the model's own cross-entropy on the target tokens
    assert [e["step"] for e in evals] == [6, 12] and all(set(e) == {"step", "eval", "rougeL", "chrf", "loss"} for e in evals)
    assert all(0 <= e["rougeL"] <= 1 and 0 <= e["chrf"] <= 100 for e in evals)

    # only the adapter is saved: no head (the LM head is the base model's), nothing of the backbone
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    saved = load_file(run / "adapter/adapter.safetensors")
    marker = {"t5": ".loras.summary.", "bart": ".adapters.summary."}[arch]
    assert saved and all(marker in key for key in saved), list(saved)[:3]
    recipe = load_recipe(run / "recipe.yaml")
    model, _ = prepare_model(recipe, load_data(recipe.data))
    trainable = {k.removeprefix("model.") for k, p in model.named_parameters() if p.requires_grad}  # BART's backbone
    assert trainable == set(saved), sorted(trainable ^ set(saved))[:3]
    assert not any(p.requires_grad for p in model.get_output_embeddings().parameters())
    # with metric_for_best, adapter/ is the best evaluation's
    assert (run / "adapter/adapter.safetensors").read_bytes() == (run / "best/adapter.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_generate_predict_and_eval_on_a_seq2seq_run(arch: str, trained) -> None:
    run = trained(arch)
    answers = generate(run, ["the cat sat on the mat", "a dog ran"], max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers) and any(answers), answers
    result = runner.invoke(app, ["generate", str(run), "the cat sat on the mat", "a dog ran", "--max-new-tokens", "6"],
                           env=ENV)
    assert result.exit_code == 0, result.output
    assert "> the cat sat on the mat" in result.output and "> a dog ran" in result.output
    assert [a for a in answers if a] == [line for line in result.output.splitlines()[1:] if line and line[0] != ">"]
    beams = runner.invoke(app, ["generate", str(run), "the cat sat", "--num-beams", "3", "--max-new-tokens", "6"], env=ENV)
    assert beams.exit_code == 0 and beams.output.strip(), beams.output

    result = runner.invoke(app, ["predict", str(run), "the cat sat on the mat", "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["text"] == "the cat sat on the mat" and isinstance(row["generated"], str)

    result = runner.invoke(app, ["eval", str(run)], env=ENV)
    assert result.exit_code == 0, result.output
    # the reloaded adapter writes what the best evaluation of the training scored (the first of equals)
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e.get("eval")]
    best = next(e for e in evals if e["rougeL"] == max(x["rougeL"] for x in evals))
    for key in ("rougeL", "chrf", "loss"):
        assert re.search(rf"{key}\s+│\s+{best[key]:.4f}", result.output), (key, best, result.output)


def test_resume_ends_like_an_uninterrupted_run(trained, tmp_path: Path) -> None:
    """A copy of the finished T5 run as a run killed between steps 6 and 12 leaves it: resumed, it
    ends with the same adapter, bit for bit, and the same metrics.jsonl."""
    straight = trained("t5")
    shutil.copytree(straight, tmp_path / "run")
    for leftover in ("adapter", "checkpoints/step-12"):
        shutil.rmtree(tmp_path / "run" / leftover)
    (tmp_path / "run/checkpoints/latest.json").write_text(json.dumps({"checkpoint": "step-6", "step": 6}))
    recipe = load_recipe(straight / "recipe.yaml", [f"output_dir={tmp_path / 'run'}"])
    train(recipe, resume=True, console=QUIET)
    expected, resumed = load_file(straight / "adapter/adapter.safetensors"), load_file(tmp_path / "run/adapter/adapter.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    def history(run: Path) -> list[dict]:  # without the timings
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert history(tmp_path / "run") == history(straight)


def test_wrong_target_column_fails_with_one_clear_message(tmp_path: Path, tiny_t5_dir: Path, summaries: Path,
                                                          tiny_bert_dir: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_t5_dir, summaries, "t5", data={"target_column": "headline"})
    result = runner.invoke(app, ["train", str(recipe)], env=ENV)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: data.target_column: no column 'headline' in the train split; it has id, document, summary"]
    assert not (tmp_path / "run").exists()  # refused before anything loads
    recipe = _write_recipe(tmp_path, tiny_bert_dir, summaries, "t5")
    result = runner.invoke(app, ["validate", str(recipe)], env=ENV)
    assert result.exit_code == 1 and "data.task seq2seq needs an encoder-decoder model (T5, BART" in result.output


# --- the shipped recipe ---------------------------------------------------------------------------------

# The layout of abisee/cnn_dailymail's 3.0.0 config on the Hub: parquet files per split, declared in the card.
CNN_DAILYMAIL_CARD = """---
configs:
- config_name: 3.0.0
  data_files:
  - split: train
    path: 3.0.0/train-*
  - split: validation
    path: 3.0.0/validation-*
  - split: test
    path: 3.0.0/test-*
---
"""


def test_cnn_dailymail_recipe_trains_on_a_local_copy_in_hub_layout(tmp_path: Path, tiny_t5_dir: Path) -> None:
    copy = tmp_path / "cnn_dailymail"
    (copy / "3.0.0").mkdir(parents=True)
    (copy / "README.md").write_text(CNN_DAILYMAIL_CARD)
    rng = random.Random(0)
    for split, rows in (("train", 24), ("validation", 8), ("test", 8)):
        articles = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(rows)]
        frame = {"article": articles, "highlights": [" ".join(a.split()[:3]) for a in articles],
                 "id": [f"{split}{i}" for i in range(rows)]}
        Dataset.from_dict(frame).to_parquet(copy / f"3.0.0/{split}-00000-of-00001.parquet")
    recipe = load_recipe(ROOT / "recipes/cnn_dailymail_t5_lora.yaml")
    assert (recipe.model.name_or_path, recipe.data.name, recipe.data.subset, recipe.data.source_prefix) == (
        "google-t5/t5-small", "abisee/cnn_dailymail", "3.0.0", "summarize: ")
    local = [f"data.name={copy}", f"model.name_or_path={tiny_t5_dir}", f"output_dir={tmp_path / 'run'}",
             "train.max_steps=2", "train.eval_steps=2", "train.batch_size=4", "train.max_seq_length=64",
             "train.max_target_length=8"]
    result = runner.invoke(app, ["train", "cnn_dailymail_t5_lora", *local], env=ENV)
    assert result.exit_code == 0, result.output
    evals = [e for e in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()) if e.get("eval")]
    assert evals[-1]["step"] == 2 and {"rougeL", "chrf", "loss"} <= set(evals[-1])
    data = load_data(load_recipe(tmp_path / "run/recipe.yaml").data)
    assert data.splits["validation"][0]["text"].startswith("summarize: ") and len(data.splits["test"]) == 8
