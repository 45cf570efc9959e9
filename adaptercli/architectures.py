"""The per-architecture table: everything adaptercli knows about the inside of a transformer.

Adapters hook into the *unmodified* Hugging Face model. All they need to know is where things
are, as module paths relative to one transformer layer (or to the backbone):

* the attention projections q/k/v/o and the FFN projections (LoRA, IA3),
* the two residual sub-layers (attention, FFN) around which bottleneck adapters sit: which module
  receives the residual stream ``x``, which module produces the sub-layer output ``h`` (before
  the residual add), and which norm the model applies to ``h + x`` (post-LN models) or ``None``
  (pre-LN models, where the layer just adds ``h + x``),
* the embeddings (invertible adapters) and the self-attention module (prefix tuning).

Adding an architecture means adding one entry to ``ARCHITECTURES``; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import AdapterCliError


@dataclass(frozen=True)
class Site:
    """One residual sub-layer of a transformer layer, as seen by a bottleneck adapter.

    ``residual`` names the module whose call receives the residual stream ``x`` (argument
    ``residual_arg``: a position or a keyword); ``output`` the module whose output is the
    sub-layer output ``h``; ``norm`` the LayerNorm the model applies to ``h + x`` (``None`` in
    pre-LN models). ``host`` is where the adapter modules are registered (created if missing), so
    weight keys read ``<layer>.<host>.adapters.<name>...`` as in AdapterHub files.
    """

    residual: str
    residual_arg: int | str
    output: str
    norm: str | None
    host: str


@dataclass(frozen=True)
class Architecture:
    """Module paths of one model family. Layer-relative unless said otherwise."""

    model_types: tuple[str, ...]
    layers: str  # backbone-relative path of the ModuleList of transformer layers
    embeddings: str  # backbone-relative module whose output feeds layer 0
    attention: str  # the self-attention module (prefix tuning joins keys/values there)
    q: str
    k: str
    v: str
    o: str
    # FFN projections that `intermediate_lora` / `output_lora` adapt. AdapterHub 1.3.0 assigns
    # Llama's down_proj to "intermediate" and up_proj to "output"; we keep that so its files load.
    lora_intermediate: str
    lora_output: str
    attn_site: Site
    ffn_site: Site
    fused_qkv: bool = False  # GPT-2: q, k, v are one Conv1D (`q`, `k`, `v` then name the same module)
    # How many KV heads the prefix carries: "kv" (GQA models) or "attn" (one per attention head).
    prefix_heads: str = "attn"

    @property
    def name(self) -> str:
        return self.model_types[0]


_BERT_LIKE = Architecture(
    model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    layers="encoder.layer",
    embeddings="embeddings",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    lora_intermediate="intermediate.dense",
    lora_output="output.dense",
    attn_site=Site(
        residual="attention.output", residual_arg=1, output="attention.output.dropout",
        norm="attention.output.LayerNorm", host="attention.output",
    ),
    ffn_site=Site(
        residual="output", residual_arg=1, output="output.dropout", norm="output.LayerNorm", host="output",
    ),
)

_DISTILBERT = Architecture(
    model_types=("distilbert",),
    layers="transformer.layer",
    embeddings="embeddings",
    attention="attention",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    lora_intermediate="ffn.lin1",
    lora_output="ffn.lin2",
    attn_site=Site(residual="", residual_arg=0, output="attention", norm="sa_layer_norm", host="attention_adapters"),
    ffn_site=Site(residual="ffn", residual_arg=0, output="ffn", norm="output_layer_norm", host="output_adapters"),
)

_GPT2 = Architecture(
    model_types=("gpt2",),
    layers="h",
    embeddings="drop",  # after wte + wpe + dropout, where AdapterHub applies invertible adapters
    attention="attn",
    q="attn.c_attn",
    k="attn.c_attn",
    v="attn.c_attn",
    o="attn.c_proj",
    lora_intermediate="mlp.c_fc",
    lora_output="mlp.c_proj",
    attn_site=Site(residual="ln_1", residual_arg=0, output="attn", norm=None, host="attention_adapters"),
    ffn_site=Site(residual="ln_2", residual_arg=0, output="mlp", norm=None, host="output_adapters"),
    fused_qkv=True,
)

_LLAMA_LIKE = Architecture(
    model_types=("llama", "mistral", "qwen2"),
    layers="layers",
    embeddings="embed_tokens",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    lora_intermediate="mlp.down_proj",
    lora_output="mlp.up_proj",
    attn_site=Site(
        residual="input_layernorm", residual_arg=0, output="self_attn", norm=None, host="attention_adapters",
    ),
    ffn_site=Site(
        residual="post_attention_layernorm", residual_arg=0, output="mlp", norm=None, host="output_adapters",
    ),
    prefix_heads="kv",
)

ARCHITECTURES: tuple[Architecture, ...] = (_BERT_LIKE, _DISTILBERT, _GPT2, _LLAMA_LIKE)
_BY_TYPE = {t: arch for arch in ARCHITECTURES for t in arch.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def architecture_for(model_type: str, *, required: bool = True, what: str = "") -> Architecture | None:
    """The table entry for a ``config.model_type``; a clear error (or None) when there is none.
    ``what`` names the feature that needs the entry, to start the error message."""
    arch = _BY_TYPE.get(model_type)
    if arch is None and required:
        raise UnsupportedArchitectureError(
            f"{what + ': ' if what else ''}model type '{model_type}' has no entry in the architecture table; supported: "
            f"{', '.join(supported_model_types())}. LoRA and IA3 still work on any model when you "
            "name the modules with `target_modules`."
        )
    return arch


class UnsupportedArchitectureError(AdapterCliError):
    pass


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` where the empty path means ``root`` itself."""
    return root.get_submodule(path) if path else root


def transformer_layers(backbone: nn.Module, arch: Architecture) -> list[nn.Module]:
    return list(get_module(backbone, arch.layers))
