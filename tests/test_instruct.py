"""Instruction tuning (``data.task: instruct``): conversations from a ``messages`` column or from
prompt and response columns, rendered with the tokenizer's chat template; only the answers carry
labels, so prompt tokens provably add no loss; `adapter generate` answers with the trained adapter.
The slow test trains the shipped recipe on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer
from typer.testing import CliRunner

from adaptercli.cli import app
from adaptercli.data import encode_conversation, load_data, make_collator, tokenize_dataset
from adaptercli.errors import AdapterCliError
from adaptercli.evaluation import evaluate
from adaptercli.heads import HeadConfig
from adaptercli.model import AutoAdapterModel
from adaptercli.recipe import DataSection, load_recipe
from adaptercli.runs import prepare_model
from adaptercli.train import train
from tests.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    """The same 40 one-turn conversations as jsonl `messages` and as csv question/answer columns."""
    folder = tmp_path_factory.mktemp("instruct")
    pairs = [(f"what is {a} plus {b}", f"it is {a + b}") for a in range(8) for b in range(5)]
    with open(folder / "train.jsonl", "w") as handle:
        for prompt, answer in pairs:
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    (folder / "train.csv").write_text("question,answer\n" + "".join(f"{p},{a}\n" for p, a in pairs))
    return {"jsonl": folder / "train.jsonl", "csv": folder / "train.csv"}


def test_both_formats_give_the_same_conversations(chat_files: dict[str, Path]) -> None:
    loaded = {kind: load_data(DataSection(source=kind, train_file=str(path), task="instruct"))
              for kind, path in chat_files.items()}
    for data in loaded.values():
        assert data.splits["train"].column_names == ["messages"] and data.label_names is None
    assert loaded["jsonl"].splits["train"]["messages"] == loaded["csv"].splits["train"]["messages"]
    assert loaded["csv"].splits["train"][0]["messages"][1]["role"] == "assistant"


def test_bad_conversations_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(AdapterCliError, match="data: train row 0: the conversation has no assistant turn"):
        load_data(DataSection(source="jsonl", train_file=str(path), task="instruct"))
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(AdapterCliError, match="data.prompt_column: instruction data needs a messages column"):
        load_data(DataSection(source="jsonl", train_file=str(path), task="instruct"))


def test_only_the_answers_are_labelled(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    encoded = encode_conversation(tokenizer, CHAT, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    scored = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    assert all(label in (-100, i) for i, label in zip(ids, labels, strict=True))
    expected = tokenizer("Paris.<|im_end|>\n", add_special_tokens=False)["input_ids"] + \
        tokenizer("Rome.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert scored == expected  # both answers and their end-of-turn markers; no system, user or role header
    assert encoded["scored"] == len(expected)
    cut = encode_conversation(tokenizer, CHAT, max_length=10)  # truncated inside the prompt: nothing to learn
    assert len(cut["input_ids"]) == 10 and cut["scored"] == 0


def test_masked_prompt_tokens_contribute_no_loss(tiny_llama_dir: Path, chat_files: dict[str, Path]) -> None:
    """The gradient of the loss reaches no logit that predicts a prompt token, and the loss is the
    mean cross-entropy over the answer tokens alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = load_data(DataSection(source="jsonl", train_file=str(chat_files["jsonl"]), task="instruct"))
    split = tokenize_dataset(data.splits, tokenizer, "instruct", 64)["train"]
    batch = make_collator(tokenizer, "instruct")([split[i] for i in range(4)])
    model = AutoAdapterModel.from_pretrained(tiny_llama_dir)
    model.add_head("lm", HeadConfig("causal_lm", 0, 1, None, bias=False))
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    logits = model.heads["lm"](hidden).detach().requires_grad_(True)
    loss = model.heads["lm"].loss(logits, batch["labels"])
    loss.backward()
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
    assert (logits.grad[~predicts_answer] == 0).all()  # prompt (and padding) positions: no gradient at all
    assert (logits.grad[predicts_answer].abs().sum(-1) > 0).all()
    answers = batch["labels"][:, 1:][predicts_answer[:, :-1]]
    by_hand = torch.nn.functional.cross_entropy(logits[predicts_answer].detach(), answers)
    torch.testing.assert_close(loss.detach(), by_hand)


def test_instruct_run_then_generate(tmp_path: Path, tiny_llama_dir: Path, chat_files: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir, chat_files["jsonl"], method="lora",
                          data={"task": "instruct", "label_column": None}, max_steps=3, eval_steps=3, save_steps=3,
                          max_seq_length=64)
    final = train(load_recipe(recipe), console=Console(quiet=True))
    assert set(final) == {"accuracy", "loss"}  # of the answer tokens
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "run"), "what is 2 plus 2", "--max-new-tokens", "4"],
                                env=ENV)
    assert result.exit_code == 0, result.output
    assert result.output.strip()  # four tokens of a random model, decoded
    classifier = write_recipe(tmp_path / "cls", tiny_llama_dir, chat_files["csv"], method="lora",
                              data={"label_column": "answer", "text_column": "question"}, max_steps=1, eval_steps=1)
    train(load_recipe(classifier), console=Console(quiet=True))
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "cls/run"), "hi"], env=ENV)
    assert result.exit_code == 1 and "generate needs a causal-LM run" in result.output


@pytest.mark.slow
def test_trec_instruct_recipe_lowers_answer_loss_on_held_out_prompts(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct with LoRA, 30 steps of the shipped recipe: the loss on the answers of
    held-out questions falls well below the untrained model's."""
    overrides = [f"output_dir={tmp_path / 'run'}", "train.max_steps=30", "train.eval_steps=30",
                 "train.save_steps=30", "data.max_eval_samples=64"]
    recipe = load_recipe(ROOT / "recipes/trec_instruct_smollm2.yaml", overrides)
    from adaptercli.checks import preflight

    data = preflight(recipe).data
    model, tokenizer = prepare_model(recipe, data)  # LoRA starts at zero: the base model's answers
    held_out = tokenize_dataset(data.splits, tokenizer, "instruct", recipe.train.max_seq_length)["validation"]
    before = evaluate(model, held_out, make_collator(tokenizer, "instruct"), "instruct", None, 16, model.device)
    after = train(recipe, console=Console(quiet=True))
    print(f"answer-token loss / accuracy on {len(held_out)} held-out prompts: before {before}, after {after}")
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["accuracy"] > before["accuracy"]
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "run"),
                                      "What kind of answer does this question ask for?\nQuestion: When was Mozart born ?"],
                                env=ENV)
    answer = result.output.strip().splitlines()[-1]  # after the GGUF loader's progress bar
    assert result.exit_code == 0 and answer.startswith("It asks for"), result.output
