"""Tiny random models of every architecture in the table, built from configs (no downloads), and a
saved tiny BERT with MiniLM's tokenizer for fast CLI runs of real recipes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from adaptercli.assets import resolve_model_path

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)
CONFIGS = {
    "bert": dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
                    max_position_embeddings=66),
    "xlm-roberta": dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
                        max_position_embeddings=66),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=64,
                       dropout=0.0, attention_dropout=0.0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=100, n_positions=64, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(TINY, num_key_value_heads=2),
    "mistral": dict(TINY, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(TINY, num_key_value_heads=2),
}


def tiny_model(model_type: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def batch(seed: int = 1, length: int = 9):
    """Two sequences; the second has its last three tokens padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask


@pytest.fixture
def perturb():
    def apply(model, name: str, scale: float = 0.05, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.adapter_state.adapter_parameters(name).values():
                p.add_(scale * torch.randn(p.shape, generator=g))

    return apply


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved 2-layer, 32-wide random BERT with MiniLM's real tokenizer (30,522 word pieces).

    Recipes written for MiniLM run on it unchanged (``model.name_or_path=<this folder>``), a
    hundred times faster: for CLI smoke runs that test the plumbing, not the quality.
    """
    folder = tmp_path_factory.mktemp("tiny-bert-minilm-tokenizer")
    minilm = Path(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    return folder


# ChatML, the chat template of SmolLM2 and Qwen2 (without their default system turn).
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved 2-layer, 64-wide random Llama with MiniLM's tokenizer (its vocabulary size) given
    a ChatML chat template: for QLoRA and instruction-tuning runs in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


# The layout of nyu-mll/glue's mrpc config on the Hub: parquet files per split, declared in the card.
GLUE_CARD = """---
configs:
- config_name: mrpc
  data_files:
  - split: train
    path: mrpc/train-*
  - split: validation
    path: mrpc/validation-*
dataset_info:
- config_name: mrpc
  features:
  - name: sentence1
    dtype: string
  - name: sentence2
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': not_equivalent
          '1': equivalent
  - name: idx
    dtype: int32
---
"""


def write_glue_copy(root: Path, train, validation) -> Path:
    """A local folder laid out like nyu-mll/glue (mrpc), from two pandas frames."""
    (root / "mrpc").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(GLUE_CARD)
    train.to_parquet(root / "mrpc/train-00000-of-00001.parquet")
    validation.to_parquet(root / "mrpc/validation-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    """120 rows, "great movie number i" -> pos and "awful movie number i" -> neg: a task that a
    working training loop learns in a few dozen steps."""
    folder = tmp_path_factory.mktemp("sentiment")
    rows = ["text,label"] + [f"{w} movie number {i},{lab}" for i in range(60)
                             for w, lab in (("great", "pos"), ("awful", "neg"))]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def write_recipe(folder: Path, model: Path | str, train_file: Path, *, method: str = "seq_bn",
                 config: dict | None = None, name: str = "tiny", data: dict | None = None,
                 composition: dict | None = None, **train: object) -> Path:
    """``folder/recipe.yaml`` for a short CPU run writing to ``folder/run``; ``train`` overrides the
    train section's settings."""
    settings = {"max_steps": 12, "save_steps": 4, "batch_size": 8, "eval_steps": 6, "logging_steps": 2,
                "learning_rate": 1e-3, "max_seq_length": 16, **train}
    recipe = {
        "model": {"name_or_path": str(model)},
        "adapter": {"name": name, "method": method, "config": config or {}},
        "data": {"train_file": str(train_file), "label_column": "label", **(data or {})},
        "train": settings,
        "output_dir": str(folder / "run"),
    }
    if composition is not None:
        recipe["composition"] = composition
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# One head named "a" of each type, added the way a user adds it (tests of heads and their losses).
ADD_HEAD = {
    "classification": lambda m: m.add_classification_head("a", num_labels=3),
    "multilabel": lambda m: m.add_multilabel_classification_head("a", num_labels=3),
    "regression": lambda m: m.add_regression_head("a"),
    "tagging": lambda m: m.add_tagging_head("a", num_labels=3),
    "qa": lambda m: m.add_qa_head("a"),
    "mlm": lambda m: m.add_masked_lm_head("a"),
    "causal_lm": lambda m: m.add_causal_lm_head("a"),
}
