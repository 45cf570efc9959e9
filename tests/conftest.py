"""Tiny random models of every architecture in the table, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

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
            for p in model._adapter_state.adapter_parameters(name).values():
                p.add_(scale * torch.randn(p.shape, generator=g))

    return apply
