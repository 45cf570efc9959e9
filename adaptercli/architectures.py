"""The per-architecture table: everything adaptercli knows about the inside of a transformer.

Adapters hook into the *unmodified* Hugging Face model. All they need to know is where things
are, as module paths relative to one transformer layer (or to the backbone):

* the attention projections q/k/v/o and the FFN projections (LoRA, IA3),
* the two residual sub-layers (attention, FFN) around which bottleneck adapters sit: which module
  receives the residual stream ``x``, which module produces the sub-layer output ``h`` (before
  the residual add), and which norm the model applies to ``h + x`` (post-LN models) or ``None``
  (pre-LN models, where the layer just adds ``h + x``),
* the embeddings (invertible adapters) and the self-attention module (prefix tuning).

Adding an architecture means adding one entry to ``ARCHITECTURES``; nothing else changes. A model
that is not in the table can be described the same way at run time (:func:`layout_from_dict`, a
recipe's ``model.layout``, or an AdapterHub ``adapter_interface.json``) and every method works on it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .errors import AdapterCliError


@dataclass(frozen=True)
class Site:
    """One residual sub-layer of a transformer layer, as seen by a bottleneck adapter.

    ``residual`` names the module whose call receives the residual stream ``x`` (argument
    ``residual_arg``: a position or a keyword; ``None``: the sub-layer has no residual of its own,
    as Phi's FFN, which shares the attention's); ``output`` the module whose output is the
    sub-layer output ``h``; ``norm`` the LayerNorm the model applies to ``h + x`` (``None`` in
    pre-LN models). ``host`` is where the adapter modules are registered (created if missing), so
    weight keys read ``<layer>.<host>.adapters.<name>...`` as in AdapterHub files.

    ``hooked``: AdapterHub's plugin-interface placement. The adapter's result replaces ``h`` itself
    and the model then adds its residual and applies its norms as usual; ``norm`` is only the norm
    the adapter applies to ``h + x`` before it (``original_ln_before``), never after.
    ``swap``: the site hands the adapter the sub-layer input as ``h`` and the output as ``x``
    (AdapterHub 1.3.0 does so at ALBERT's attention; we follow so that its files give the same
    outputs).
    """

    residual: str | None
    residual_arg: int | str
    output: str
    norm: str | None
    host: str
    hooked: bool = False
    swap: bool = False


@dataclass(frozen=True)
class Architecture:
    """Module paths of one model family. Layer-relative unless said otherwise."""

    model_types: tuple[str, ...]
    # Backbone-relative path of the ModuleList of transformer layers; ``*`` stands for every index
    # of a list (ALBERT: ``encoder.albert_layer_groups.*.albert_layers``, its unique shared layers).
    layers: str
    embeddings: str  # backbone-relative module whose output feeds layer 0
    # The self-attention module (prefix tuning joins keys/values there; None: no prefix tuning).
    attention: str | None
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
    # Prompt tuning prepends to the embeddings' output; only where the model builds its attention
    # mask from that output (AdapterHub offers it on the same encoders), or, with "attention", where
    # the mask each attention module receives is widened instead (DeBERTa, as AdapterHub does).
    prompts: bool | str = False
    # Decoder-only models, whose ReFT suffix positions and LM heads read left to right.
    causal: bool = False
    # Backbone-relative module that holds adapter modules of no layer (invertible adapters, prefix
    # pools, shared tensors): AdapterHub's interface ``base_model`` (OPT: ``decoder``), so keys match.
    root: str = ""
    # (pattern, replacement) regexes from module paths of transformers 4.x, as AdapterHub 1.3.0
    # files name them, to this version's (ViT was restructured in transformers 5).
    legacy_keys: tuple[tuple[str, str], ...] = ()
    # The reverse, applied when writing AdapterHub's format: backbone-relative keys of this version
    # to the module paths adapters 1.3.0 (on transformers 4.x) names.
    adapterhub_keys: tuple[tuple[str, str], ...] = ()
    # Attention that computes its own scores instead of calling transformers' attention functions
    # (DeBERTa's disentangled attention): prefixes join through our forward for that module, named
    # here (methods/prefix_tuning.py); None: through the attention functions.
    attention_forward: str | None = None
    # Encoder-decoders: the decoder's layers, described like the encoder's (its own sites and
    # projections), plus its cross-attention: the module where cross prefixes join, its q/k/v
    # (LoRA adapts them with the self-attention's, as AdapterHub does) and its residual site
    # (bottleneck adapters with ``cross_adapter``).
    decoder: Architecture | None = None
    cross_attention: str | None = None
    cross_q: str | None = None
    cross_k: str | None = None
    cross_v: str | None = None
    cross_site: Site | None = None
    # Where invertible adapters live, backbone-relative (AdapterHub: the encoder of an
    # encoder-decoder); None: ``root``. ``embeddings_input``: they act on the input of the module
    # named by ``embeddings`` instead of its output (T5: the first encoder block).
    invertible_root: str | None = None
    embeddings_input: bool = False

    @property
    def name(self) -> str:
        return self.model_types[0]

    def upgrade_keys(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Weight keys written against transformers 4.x module paths, renamed to this version's."""
        rules = self.legacy_keys
        if self.decoder is not None:  # a lone decoder prefix pool, read without its location
            rules = (*rules, (r"^(prefix_tunings\.[^.]+)\.(?!encoder_prefix\.|self_prefix\.|cross_prefix\.)",
                              r"\1.self_prefix."))
        if not rules:
            return weights
        out = {}
        for key, value in weights.items():
            for pattern, replacement in rules:
                key = re.sub(pattern, replacement, key)
            out[key] = value
        return out


_BERT_LIKE = Architecture(
    model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    prompts=True,
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
    prompts=True,
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
    causal=True,
)

_LLAMA_LIKE = Architecture(
    model_types=("llama", "mistral"),
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
    causal=True,
)

# AdapterHub reaches Qwen through its plugin interface, which calls up_proj "intermediate" and
# down_proj "output" (the reverse of its Llama mixin); the bottleneck sites are Llama's.
_QWEN = dataclasses.replace(
    _LLAMA_LIKE, model_types=("qwen2", "qwen3"), lora_intermediate="mlp.up_proj", lora_output="mlp.down_proj",
)

_ALBERT = Architecture(
    model_types=("albert",),
    layers="encoder.albert_layer_groups.*.albert_layers",  # the unique layers; each runs several times
    embeddings="embeddings",
    attention="attention",
    q="attention.query",
    k="attention.key",
    v="attention.value",
    o="attention.dense",
    lora_intermediate="ffn",
    lora_output="ffn_output",
    attn_site=Site(residual="attention", residual_arg=0, output="attention.output_dropout",
                   norm="attention.LayerNorm", host="attention.attention_adapters", swap=True),
    ffn_site=Site(residual="ffn", residual_arg=0, output="ffn_output", norm="full_layer_layer_norm",
                  host="output_adapters"),
    prompts=True,
)

_DEBERTA_V2 = Architecture(
    model_types=("deberta-v2",),
    layers="encoder.layer",
    embeddings="embeddings",
    attention="attention.self",
    attention_forward="disentangled",  # its own scores, not transformers' attention functions
    prompts="attention",  # the encoder builds its mask from the input's length, before the prompt joins
    q="attention.self.query_proj",
    k="attention.self.key_proj",
    v="attention.self.value_proj",
    o="attention.output.dense",
    lora_intermediate="intermediate.dense",
    lora_output="output.dense",
    attn_site=_BERT_LIKE.attn_site,
    ffn_site=_BERT_LIKE.ffn_site,
)

# DeBERTa (v1) projects q, k and v with one ``in_proj``; LoRA adapts thirds of its output, as
# AdapterHub's merged layer does.
_DEBERTA = dataclasses.replace(
    _DEBERTA_V2, model_types=("deberta",), q="attention.self.in_proj", k="attention.self.in_proj",
    v="attention.self.in_proj", fused_qkv=True,
)

# Models AdapterHub 1.3.0 supports through its plugin interface only: adapters replace the output
# of a projection ("hooked" sites) and the model adds its residuals and norms itself.
_GEMMA = Architecture(
    model_types=("gemma2", "gemma3_text"),
    layers="layers",
    embeddings="embed_tokens",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    lora_intermediate="mlp.up_proj",
    lora_output="mlp.down_proj",
    attn_site=Site(residual="input_layernorm", residual_arg=0, output="self_attn.o_proj",
                   norm="post_attention_layernorm", host="attention_adapters", hooked=True),
    ffn_site=Site(residual="pre_feedforward_layernorm", residual_arg=0, output="mlp.down_proj",
                  norm="post_feedforward_layernorm", host="output_adapters", hooked=True),
    prefix_heads="kv",
    causal=True,
)

# Phi runs attention and FFN side by side on one normed input: one residual for both.
_PHI = Architecture(
    model_types=("phi",),
    layers="layers",
    embeddings="embed_tokens",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.dense",
    lora_intermediate="mlp.fc1",
    lora_output="mlp.fc2",
    attn_site=Site(residual="input_layernorm", residual_arg=0, output="self_attn.dense", norm=None,
                   host="attention_adapters", hooked=True),
    ffn_site=Site(residual=None, residual_arg=0, output="mlp.fc2", norm=None, host="output_adapters", hooked=True),
    prefix_heads="kv",
    causal=True,
)

_MODERNBERT = Architecture(
    model_types=("modernbert",),
    layers="layers",
    embeddings="embeddings",
    attention="attn",
    q="attn.Wqkv",
    k="attn.Wqkv",
    v="attn.Wqkv",
    o="attn.Wo",
    lora_intermediate="mlp.Wi",
    lora_output="mlp.Wo",
    attn_site=Site(residual="attn", residual_arg=0, output="attn.Wo", norm="mlp_norm", host="attention_adapters",
                   hooked=True),
    ffn_site=Site(residual="mlp", residual_arg=0, output="mlp.Wo", norm=None, host="output_adapters", hooked=True),
    fused_qkv=True,
)

# ViT: pre-LN, no attention mask. AdapterHub's files name transformers 4.x's modules
# (encoder.layer.N.attention.attention.query, ...output.output_adapters); `legacy_keys` renames them.
_VIT = Architecture(
    model_types=("vit",),
    layers="layers",
    embeddings="embeddings",
    attention="attention",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    lora_intermediate="mlp.fc1",
    lora_output="mlp.fc2",
    attn_site=Site(residual="layernorm_before", residual_arg=0, output="attention", norm=None,
                   host="attention_adapters"),
    ffn_site=Site(residual="layernorm_after", residual_arg=0, output="mlp", norm=None, host="output_adapters"),
    legacy_keys=(
        (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
        (r"\.attention\.attention\.query\.", ".attention.q_proj."),
        (r"\.attention\.attention\.key\.", ".attention.k_proj."),
        (r"\.attention\.attention\.value\.", ".attention.v_proj."),
        (r"\.attention\.output\.dense\.", ".attention.o_proj."),
        (r"^(layers\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
        (r"^(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
        (r"^(layers\.\d+)\.output\.output_adapters\.", r"\1.output_adapters."),
    ),
    adapterhub_keys=(
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.prefix_tuning\.", ".attention.attention.prefix_tuning."),
        (r"^(layers\.\d+)\.mlp\.fc1\.", r"\1.intermediate.dense."),
        (r"^(layers\.\d+)\.mlp\.fc2\.", r"\1.output.dense."),
        (r"^(layers\.\d+)\.output_adapters\.", r"\1.output.output_adapters."),
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    ),
)

# CLIP's text and vision towers (pre-LN encoders). transformers 4 nested them as text_model /
# vision_model inside CLIPTextModel / CLIPVisionModel, which AdapterHub's keys still name.
_CLIP = Architecture(
    model_types=("clip_text_model", "clip_vision_model"),
    layers="encoder.layers",
    embeddings="embeddings",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    lora_intermediate="mlp.fc1",
    lora_output="mlp.fc2",
    attn_site=Site(residual="layer_norm1", residual_arg=0, output="self_attn", norm=None, host="attention_adapters"),
    ffn_site=Site(residual="layer_norm2", residual_arg=0, output="mlp", norm=None, host="output_adapters"),
    legacy_keys=((r"^(text_model|vision_model)\.", ""),),
)


def _clip_tower(model_type: str) -> Architecture:
    """One CLIP tower: AdapterHub's files put its modules under ``text_model.`` / ``vision_model.``
    and call its prefix pools ``<model type>_self_prefix``."""
    return dataclasses.replace(_CLIP, model_types=(model_type,), adapterhub_keys=(
        (r"\.prefix_tunings\.([^.]+)\.self_prefix\.", rf".prefix_tunings.\1.{model_type}_self_prefix."),
        (r"^(?!prefix_tuning\.)", model_type.removeprefix("clip_") + "."),
    ))

# BART / mBART: post-LN (BART) or pre-LN (mBART) encoder and decoder layers; AdapterHub puts the
# invertible adapter after the encoder's embedding norm and keeps it under the encoder.
def _bart_like(model_types: tuple[str, ...], post_ln: bool) -> Architecture:
    def sites(attn: str, ffn_in: str) -> tuple[Site, Site]:
        if post_ln:
            return (Site(residual=attn, residual_arg=0, output=attn, norm=f"{attn}_layer_norm", host="attention_adapters"),
                    Site(residual=ffn_in, residual_arg=0, output="fc2", norm="final_layer_norm", host="output_adapters"))
        return (Site(residual=f"{attn}_layer_norm", residual_arg=0, output=attn, norm=None, host="attention_adapters"),
                Site(residual="final_layer_norm", residual_arg=0, output="fc2", norm=None, host="output_adapters"))

    attn_site, ffn_site = sites("self_attn", "fc1")
    cross_site = sites("encoder_attn", "fc1")[0]
    cross_site = dataclasses.replace(cross_site, host="cross_attention_adapters")
    layer = dict(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                 o="self_attn.out_proj", lora_intermediate="fc1", lora_output="fc2", attn_site=attn_site,
                 ffn_site=ffn_site)
    decoder = Architecture(model_types=model_types, layers="decoder.layers", embeddings="", **layer,
                           cross_attention="encoder_attn", cross_q="encoder_attn.q_proj", cross_k="encoder_attn.k_proj",
                           cross_v="encoder_attn.v_proj", cross_site=cross_site, causal=True)
    return Architecture(model_types=model_types, layers="encoder.layers", embeddings="encoder.layernorm_embedding", **layer,
                        decoder=decoder, invertible_root="encoder")


_BART = _bart_like(("bart",), post_ln=True)
_MBART = _bart_like(("mbart",), post_ln=False)
# Whisper: mBART's layers over an audio encoder; AdapterHub runs the invertible adapter on the
# encoder's final norm.
_WHISPER = dataclasses.replace(_bart_like(("whisper",), post_ln=False), embeddings="encoder.layer_norm")


# T5 / mT5: pre-LN blocks of sub-layers (block.N.layer.0 self-attention, .1 cross-attention in the
# decoder, last the FFN); each sub-layer hosts its adapters, as in AdapterHub's files.
def _t5_part(layers: str, ffn: str) -> dict[str, Any]:
    return dict(
        layers=layers, embeddings="", attention="layer.0.SelfAttention", q="layer.0.SelfAttention.q",
        k="layer.0.SelfAttention.k", v="layer.0.SelfAttention.v", o="layer.0.SelfAttention.o",
        lora_intermediate=f"{ffn}.DenseReluDense.wi|{ffn}.DenseReluDense.wi_1", lora_output=f"{ffn}.DenseReluDense.wo",
        attn_site=Site(residual="layer.0.layer_norm", residual_arg=0, output="layer.0.SelfAttention", norm=None,
                       host="layer.0"),
        ffn_site=Site(residual=f"{ffn}.layer_norm", residual_arg=0, output=f"{ffn}.DenseReluDense", norm=None,
                      host=ffn),
    )


_T5 = Architecture(
    model_types=("t5", "mt5"), **{**_t5_part("encoder.block", "layer.1"), "embeddings": "encoder.block.0"},
    embeddings_input=True, invertible_root="encoder",
    decoder=Architecture(
        model_types=("t5", "mt5"), **_t5_part("decoder.block", "layer.2"), causal=True,
        cross_attention="layer.1.EncDecAttention", cross_q="layer.1.EncDecAttention.q",
        cross_k="layer.1.EncDecAttention.k", cross_v="layer.1.EncDecAttention.v",
        cross_site=Site(residual="layer.1.layer_norm", residual_arg=0, output="layer.1.EncDecAttention", norm=None,
                        host="layer.1"),
    ),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    _BERT_LIKE, _DISTILBERT, _GPT2, _LLAMA_LIKE, _QWEN, _ALBERT, _DEBERTA_V2, _DEBERTA, _GEMMA, _PHI, _MODERNBERT,
    _VIT, _clip_tower("clip_text_model"), _clip_tower("clip_vision_model"), _BART, _MBART, _T5, _WHISPER,
)
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
            "name the modules with `target_modules`; every method works once you describe the model's "
            "layout (`layout=` in Python, `model.layout` in a recipe; see 'Any model: the layout' in "
            "docs/support-matrix.md)."
        )
    return arch


class UnsupportedArchitectureError(AdapterCliError):
    pass


class LayoutError(UnsupportedArchitectureError):
    """A layout that is malformed or names modules the model does not have. ``problems`` holds one
    line per problem, each starting with the layout key it concerns."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(p if p.startswith("layout") else f"layout.{p}" for p in problems))


# -- the plugin entry: a layout for a model that is not in the table --------------------------------

_SITE_KEYS = ("input", "input_arg", "output", "norm", "post_norm")
_LAYOUT_KEYS = ("layers", "embeddings", "attention", "q", "k", "v", "qkv", "o", "ffn_in", "ffn_out",
                "attention_site", "ffn_site", "causal", "kv_heads", "prompts", "root")
# AdapterHub's AdapterModelInterface (its plugin interface; saved as adapter_interface.json).
_INTERFACE_KEYS = ("adapter_methods", "model_embeddings", "model_layers", "layer_self_attn", "layer_cross_attn",
                   "attn_o_proj", "layer_intermediate_proj", "layer_output_proj", "attn_k_proj", "attn_q_proj",
                   "attn_v_proj", "attn_qkv_proj", "layer_pre_self_attn", "layer_pre_cross_attn", "layer_pre_ffn",
                   "layer_ln_1", "layer_ln_2", "base_model")


def _unknown(keys: Any, known: tuple[str, ...], where: str) -> list[str]:
    from .schema import did_you_mean

    return [f"{where}{key}: unknown layout key{did_you_mean(str(key), list(known), ', did you mean {}?')}"
            for key in keys if key not in known]


def _site(data: Any, where: str, host: str, problems: list[str]) -> Site | None:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping with input, output (and norm, post_norm)")
        return None
    problems += _unknown(data, _SITE_KEYS, f"{where}.")
    if not data.get("output"):
        problems.append(f"{where}.output: required: the module whose output is the sub-layer's output")
    post_norm = bool(data.get("post_norm", False))
    if post_norm and not data.get("norm"):
        problems.append(f"{where}.norm: required with post_norm: the norm the model applies to output + input")
    return Site(residual=data.get("input"), residual_arg=data.get("input_arg", 0), output=data.get("output", ""),
                norm=data.get("norm"), host=host, hooked=not post_norm)


def layout_from_dict(data: dict[str, Any], model_type: str = "custom") -> Architecture:
    """An architecture-table entry for a model that has none, from a plain mapping: our layout keys
    or AdapterHub's ``AdapterModelInterface`` fields (its ``adapter_interface.json``).

    Our keys (module paths relative to one layer unless said otherwise)::

        layers: decoder.layers        # backbone-relative list of transformer layers
        embeddings: decoder.embed_tokens   # backbone-relative (invertible adapters, prompt tuning)
        attention: self_attn          # where prefix tuning joins (omit: no prefix tuning)
        q: self_attn.q_proj           # k, v likewise; or qkv: one fused projection
        o: self_attn.out_proj
        ffn_in: fc1                   # ffn_out: fc2
        attention_site: {input: self_attn_layer_norm, output: self_attn.out_proj, norm: null}
        ffn_site: {input: final_layer_norm, output: fc2, norm: null}

    A site's ``input`` is the module whose first argument (``input_arg``) is the residual stream,
    ``output`` the module whose output the adapter replaces and ``norm`` the norm the adapter applies
    to ``output + input`` first (``original_ln_before``), as in AdapterHub's plugin interface. With
    ``post_norm: true`` the model itself applies ``norm`` to ``output + input`` and the adapters
    replace that norm's result instead (BERT's placement). ``causal``, ``kv_heads`` ("kv" for
    grouped-query attention) and ``prompts`` are optional flags.
    """
    if not isinstance(data, dict):
        raise LayoutError([f"layout: expected a mapping, got {type(data).__name__}"])
    if "model_layers" in data:
        return _from_interface(data, model_type)
    problems = _unknown(data, _LAYOUT_KEYS, "")
    for key in ("layers", "o", "ffn_in", "ffn_out", "attention_site", "ffn_site"):
        if not data.get(key):
            problems.append(f"{key}: required")
    fused = data.get("qkv")
    if fused and any(data.get(k) for k in "qkv"):
        problems.append("qkv: give either qkv (one fused projection) or q, k and v, not both")
    elif not fused and not all(data.get(k) for k in "qkv"):
        problems.append("q: give q, k and v (or qkv for one fused projection)")
    attn_site = _site(data["attention_site"], "attention_site", "attention_adapters", problems) \
        if data.get("attention_site") else None
    ffn_site = _site(data["ffn_site"], "ffn_site", "output_adapters", problems) if data.get("ffn_site") else None
    if data.get("kv_heads", "attn") not in ("attn", "kv"):
        problems.append(f"kv_heads: expected attn or kv, got {data['kv_heads']!r}")
    if problems:
        raise LayoutError(problems)
    return Architecture(
        model_types=(model_type,), layers=data["layers"], embeddings=data.get("embeddings", ""),
        attention=data.get("attention"), q=fused or data["q"], k=fused or data["k"], v=fused or data["v"],
        o=data["o"], lora_intermediate=data["ffn_in"], lora_output=data["ffn_out"], attn_site=attn_site,
        ffn_site=ffn_site, fused_qkv=bool(fused), prefix_heads=data.get("kv_heads", "attn"),
        prompts=bool(data.get("prompts", False)), causal=bool(data.get("causal", False)), root=data.get("root", ""),
    )


def _from_interface(data: dict[str, Any], model_type: str) -> Architecture:
    """AdapterHub's plugin interface, read for what it says about the model (the same placements)."""
    problems = _unknown(data, _INTERFACE_KEYS, "")
    if data.get("layer_cross_attn"):
        problems.append("layer_cross_attn: cross-attention is not supported in a layout")
    attn = data.get("layer_self_attn") or ""
    base = f"{data['base_model']}." if data.get("base_model") else ""  # where the layers sit in the model

    def in_attn(name: str | None) -> str | None:
        return f"{attn}.{name}" if name and attn else name

    ours = {
        "layers": base + (data.get("model_layers") or ""),
        "embeddings": base + data["model_embeddings"] if data.get("model_embeddings") else None,
        "attention": attn or None, "root": data.get("base_model") or "",
        "o": in_attn(data.get("attn_o_proj")), "ffn_in": data.get("layer_intermediate_proj"),
        "ffn_out": data.get("layer_output_proj"),
        "attention_site": {"input": data.get("layer_pre_self_attn"), "output": in_attn(data.get("attn_o_proj")),
                           "norm": data.get("layer_ln_1")},
        "ffn_site": {"input": data.get("layer_pre_ffn"), "output": data.get("layer_output_proj"),
                     "norm": data.get("layer_ln_2")},
    }
    if data.get("attn_qkv_proj"):
        ours["qkv"] = in_attn(data["attn_qkv_proj"])
    else:
        ours.update(q=in_attn(data.get("attn_q_proj")), k=in_attn(data.get("attn_k_proj")),
                    v=in_attn(data.get("attn_v_proj")))
    try:
        arch = layout_from_dict(ours, model_type)
    except LayoutError as exc:
        problems += exc.problems
    if problems:
        raise LayoutError(problems)
    return arch


def check_layout(backbone: nn.Module, arch: Architecture) -> None:
    """Every module a layout names exists in ``backbone`` (one LayoutError listing what does not)."""
    from .schema import did_you_mean

    problems: list[str] = []
    try:
        layers = transformer_layers(backbone, arch)
    except (AttributeError, TypeError):
        names = [n for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList)]
        raise LayoutError([f"layers: no list of layers at '{arch.layers}'{did_you_mean(arch.layers, names, ', did you mean {}?')}"
                           ]) from None
    if not layers:
        raise LayoutError([f"layers: '{arch.layers}' holds no layers"])
    inside = [n for n, _ in layers[0].named_modules() if n]
    paths = {"q": arch.q, "k": arch.k, "v": arch.v, "o": arch.o, "ffn_in": arch.lora_intermediate,
             "ffn_out": arch.lora_output, "attention": arch.attention}
    for prefix, site in (("attention_site", arch.attn_site), ("ffn_site", arch.ffn_site)):
        paths.update({f"{prefix}.input": site.residual, f"{prefix}.output": site.output, f"{prefix}.norm": site.norm})
    for key, path in paths.items():
        if path and path not in inside:
            problems.append(f"{key}: layer 0 of {arch.layers} has no module '{path}'"
                            f"{did_you_mean(path, inside, ', did you mean {}?')}")
    if arch.embeddings:
        try:
            get_module(backbone, arch.embeddings)
        except AttributeError:
            names = [n for n, _ in backbone.named_modules() if n]
            problems.append(f"embeddings: the model has no module '{arch.embeddings}'"
                            f"{did_you_mean(arch.embeddings, names, ', did you mean {}?')}")
    if problems:
        raise LayoutError(problems)


def register_architecture(layout: Architecture | dict[str, Any], model_type: str | None = None) -> Architecture:
    """Add an entry to the table for this session: every model of its type then gets adapters
    without a ``layout=`` argument. A dict is read with :func:`layout_from_dict`."""
    arch = layout if isinstance(layout, Architecture) else layout_from_dict(layout, model_type or "custom")
    if model_type is not None and model_type not in arch.model_types:
        arch = dataclasses.replace(arch, model_types=(model_type,))
    for name in arch.model_types:
        _BY_TYPE[name] = arch
    return arch


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` where the empty path means ``root`` itself and ``a|b`` the
    first of the alternatives that exists (T5's FFN input is ``wi``, or ``wi_1`` when gated)."""
    if "|" in path:
        for option in path.split("|"):
            try:
                return get_module(root, option)
            except AttributeError:
                continue
        raise AttributeError(f"none of {path.split('|')} in {type(root).__name__}")
    return root.get_submodule(path) if path else root


def _stack(backbone: nn.Module, path: str) -> list[nn.Module]:
    modules = [backbone]
    for part in path.split("."):
        modules = [child for m in modules for child in (m.children() if part == "*" else [get_module(m, part)])]
    return [layer for m in modules for layer in m]


def transformer_layers(backbone: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The transformer layers in order (an encoder-decoder's encoder layers, then its decoder
    layers, numbered on as AdapterHub does); a ``*`` in a path runs over every index of a list."""
    return [layer for layer, _ in layers_with_parts(backbone, arch)]


def fit_architecture(backbone: nn.Module, arch: Architecture) -> tuple[Architecture | None, str]:
    """The entry as it fits this backbone: itself, its encoder alone (T5EncoderModel, a BART
    encoder), or None with the reason (a part of a model, such as T5's encoder stack on its own)."""
    try:
        transformer_layers(backbone, arch)
        return arch, ""
    except AttributeError as exc:
        if arch.decoder is not None:
            encoder_only = dataclasses.replace(arch, decoder=None)
            try:
                transformer_layers(backbone, encoder_only)
                return encoder_only, ""
            except AttributeError:
                pass
        return None, str(exc)


def layers_with_parts(backbone: nn.Module, arch: Architecture) -> list[tuple[nn.Module, Architecture]]:
    """Each transformer layer with the table entry that describes it (the decoder part for an
    encoder-decoder's decoder layers)."""
    layers = [(layer, arch) for layer in _stack(backbone, arch.layers)]
    if arch.decoder is not None:
        layers += [(layer, arch.decoder) for layer in _stack(backbone, arch.decoder.layers)]
    return layers
