"""Adapters on encoder-decoders with their own LM head (AutoModelForSeq2SeqLM): generation with
the KV cache equals generation without it (prefixes, cross-attention adapters and T5's position
bias included) and differs from the bare model's, and a few steps of training on the model's own
loss learn a small copy task. (Outputs against AdapterHub: tests/test_reference_architectures.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import adaptercli

T5 = dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=60, decoder_start_token_id=0,
          eos_token_id=1, pad_token_id=0, dropout_rate=0.0)


def tiny_t5():
    torch.manual_seed(0)
    return adaptercli.init(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **T5)).eval())


@pytest.mark.parametrize("method", ["prefix_tuning[prefix_length=4,bottleneck_size=16]",
                                    # left out: the encoder's second and the decoder's first layer
                                    "prefix_tuning[prefix_length=4,bottleneck_size=16,leave_out=[1,2]]",
                                    "double_seq_bn[cross_adapter=true]", "lora[attn_matrices=[q,k,v]]", "loreft",
                                    "mam[prefix_tuning.bottleneck_size=16,prefix_tuning.prefix_length=4]"])
def test_generation_with_cache_equals_without(method: str) -> None:
    model = tiny_t5()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    bare = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.add_adapter("a", method)
    with torch.no_grad():
        for key, p in model.adapter_state.adapter_parameters("a").items():
            if ".parametrizations." not in key:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.set_active_adapters("a")
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, bare)


def test_adapters_train_through_the_models_own_lm_loss() -> None:
    """A LoRA and a cross-attention bottleneck trained on the model's own loss (labels = a short
    copy of the input over a 4-token vocabulary): the loss falls below half its start (the model
    learns the targets' vocabulary; a frozen 32-wide random T5 does not learn to copy in these few
    steps) and every trained tensor, cross-attention adapters included, moves."""
    model = tiny_t5()
    model.add_adapter("lora", "lora[r=8,alpha=16,attn_matrices=[q,k,v],intermediate_lora=true,output_lora=true]")
    model.add_adapter("cross", "seq_bn[cross_adapter=true,output_adapter=false,reduction_factor=2]")
    model.train_adapter(adaptercli.Stack("lora", "cross"))
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in trained.items()}
    assert any(".layer.1.adapters.cross." in k for k in trained)  # the decoder's cross-attention sub-layer
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        ids = torch.randint(3, 7, (16, 3), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::5]
    assert all((trained[k] - before[k]).abs().max() > 0 for k in trained)
