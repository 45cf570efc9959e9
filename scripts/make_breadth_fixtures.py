"""Reference fixtures for the architectures and methods added after the core seven (issue 12).

Same conventions as ``scripts/make_fixtures.py`` (read its docstring): tiny random fp32 models
built from configs, one adapter named ``ref`` per case made with the real AdapterHub ``adapters``
1.3.0, every adapter tensor perturbed away from its initial value, and the input, the output with
the adapter active (``expected``) and without it (``bare``) saved beside it. Run it in the
throw-away virtual environment described there (torch 2.13.0+cpu, transformers 4.57.6,
adapters 1.3.0), from the repository root::

    /tmp/refvenv/bin/python scripts/make_breadth_fixtures.py            # everything
    /tmp/refvenv/bin/python scripts/make_breadth_fixtures.py qwen3 bert_vera   # cases or archs by name

Everything goes under ``tests/fixtures/breadth/`` (the core fixtures are never touched):
``models/<arch>/`` (the base model), ``adapters/<case>/`` (AdapterHub's folder, as
``save_adapter`` writes it), ``io/<case>.safetensors`` and ``manifest.json`` (cases, status,
library versions). Naming some cases regenerates only those and keeps the others in the manifest.
A case the reference library refuses (for example prefix tuning on a model that AdapterHub only
reaches through its plugin interface) is recorded as ``skipped`` with its reason, never faked.

Prompt-tuning outputs have ``prompt_length`` more positions than the input (AdapterHub returns the
prompt positions too); ``expected`` keeps them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "breadth"

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, MAX_POS = 16, 2, 4, 32, 100, 64
IMAGE = 16  # ViT: 16x16 images in 8x8 patches, 4 patches + CLS
BATCH, SEQ_LEN, N_PAD = 2, 10, 3
PERTURB = 0.05
MIN_DIFF = 1e-3
SMALL_PREFIX = {"bottleneck_size": 16, "prefix_length": 6}  # the default 512-wide MLP would be 330 kB a case

PHM_SMALL = {"reduction_factor": 4}  # hidden 16 -> width 4, divisible by phm_dim 4
# A LoRA that reaches every projection the table names: q, k, v and both FFN projections.
LORA_ALL = {"architecture": "lora", "r": 4, "alpha": 8, "attn_matrices": ["q", "k", "v"],
            "intermediate_lora": True, "output_lora": True}


def base_config(arch: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS)
    dropless = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    decoder_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "electra":
        return t.ElectraConfig(**common, **dropless, embedding_size=HIDDEN, pad_token_id=0)
    if arch == "albert":
        # One shared layer run twice (num_hidden_groups=1), as in the released ALBERTs.
        return t.AlbertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              classifier_dropout_prob=0.0, embedding_size=16, num_hidden_groups=1,
                              inner_group_num=1, pad_token_id=0)
    if arch == "deberta-v2":
        return t.DebertaV2Config(**common, **dropless, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 max_relative_positions=16, position_buckets=8, pad_token_id=0)
    if arch == "deberta":
        return t.DebertaConfig(**common, **dropless, relative_attention=True, pos_att_type=["p2c", "c2p"],
                               max_relative_positions=16, pad_token_id=0)
    if arch == "qwen2":
        return t.Qwen2Config(**common, num_key_value_heads=2, attention_dropout=0.0, tie_word_embeddings=False,
                             **decoder_ids)
    if arch == "qwen3":
        return t.Qwen3Config(**common, num_key_value_heads=2, head_dim=8, attention_dropout=0.0,
                             tie_word_embeddings=False, **decoder_ids)
    if arch == "gemma2":
        return t.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, attention_dropout=0.0, **decoder_ids)
    if arch == "gemma3_text":
        return t.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, attention_dropout=0.0,
                                  sliding_window=4, **decoder_ids)
    if arch == "phi":
        return t.PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **decoder_ids)
    if arch == "modernbert":
        return t.ModernBertConfig(**common, global_attn_every_n_layers=1, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, cls_token_id=1, sep_token_id=2, attention_dropout=0.0,
                                  embedding_dropout=0.0, mlp_dropout=0.0, reference_compile=False)
    if arch == "opt":
        return t.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           ffn_dim=INTERMEDIATE, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN,
                           dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if arch == "vit":
        return t.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INTERMEDIATE, image_size=IMAGE, patch_size=IMAGE // 2, **dropless)
    if arch == "clip_text_model":
        return t.CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS, attention_dropout=0.0,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "clip_vision_model":
        return t.CLIPVisionConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=INTERMEDIATE, image_size=IMAGE, patch_size=IMAGE // 2,
                                  attention_dropout=0.0)
    if arch in ("bart", "mbart"):  # the same shape; mBART differs in its pre-LN layers, not its config
        config = t.BartConfig if arch == "bart" else t.MBartConfig
        return config(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                      encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE,
                      decoder_ffn_dim=INTERMEDIATE, max_position_embeddings=MAX_POS, dropout=0.0,
                      attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    if arch == "t5":
        return t.T5Config(vocab_size=VOCAB, d_model=HIDDEN, num_layers=LAYERS, num_heads=HEADS, d_ff=INTERMEDIATE,
                          d_kv=HIDDEN // HEADS, dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0)
    if arch == "mt5":  # gated-GELU FFN (wi_0, wi_1), as the released mT5
        return t.MT5Config(vocab_size=VOCAB, d_model=HIDDEN, num_layers=LAYERS, num_heads=HEADS, d_ff=INTERMEDIATE,
                           d_kv=HIDDEN // HEADS, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0)
    if arch == "whisper":
        return t.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=HIDDEN, encoder_layers=LAYERS,
                               decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                               encoder_ffn_dim=INTERMEDIATE, decoder_ffn_dim=INTERMEDIATE, max_source_positions=8,
                               max_target_positions=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if arch == "bert":
        return t.BertConfig(**common, **dropless, pad_token_id=0)
    if arch == "llama":
        return t.LlamaConfig(**common, num_key_value_heads=2, attention_dropout=0.0, tie_word_embeddings=False,
                             **decoder_ids)
    raise ValueError(arch)


def _methods(arch: str, *, prefix: bool, inv: bool) -> list[tuple[str, object]]:
    cases: list[tuple[str, object]] = [("seq_bn", "seq_bn"), ("double_seq_bn", "double_seq_bn"),
                                       ("par_bn", "par_bn"), ("lora", LORA_ALL), ("ia3", "ia3")]
    if inv:
        cases.append(("seq_bn_inv", "seq_bn_inv"))
    if prefix:
        cases.append(("prefix_tuning", {"architecture": "prefix_tuning", **SMALL_PREFIX}))
    return cases


# (case suffix, config) per architecture. Prefix tuning where AdapterHub has it for the model
# (natively supported models); it refuses it on the plugin-interface models (recorded as skipped).
ARCH_CASES = {
    "electra": _methods("electra", prefix=True, inv=True),
    "albert": _methods("albert", prefix=True, inv=False),
    # DeBERTa: prefixes join its disentangled attention (content scores only, as AdapterHub's copy);
    # prompts widen the mask inside each attention module.
    **{arch: [*_methods(arch, prefix=True, inv=arch == "deberta-v2"),
              ("prefix_tuning_flat", {"architecture": "prefix_tuning", "flat": True, "prefix_length": 6}),
              ("mam", "mam"), ("unipelt", "unipelt"),
              ("prompt_tuning", {"architecture": "prompt_tuning", "prompt_length": 5})]
       for arch in ("deberta-v2", "deberta")},
    "qwen2": _methods("qwen2", prefix=True, inv=False),
    "qwen3": _methods("qwen3", prefix=True, inv=False),
    "gemma2": _methods("gemma2", prefix=False, inv=False),
    "gemma3_text": _methods("gemma3_text", prefix=False, inv=False),
    "phi": _methods("phi", prefix=False, inv=False),
    "modernbert": _methods("modernbert", prefix=False, inv=False),
    # ViT: AdapterHub has no invertible adapters there; its files name transformers 4's modules.
    "vit": [*_methods("vit", prefix=True, inv=False), ("noreft", "noreft"), ("compacter", ("compacter", PHM_SMALL))],
    "clip_text_model": _methods("clip_text_model", prefix=True, inv=True),
    "clip_vision_model": _methods("clip_vision_model", prefix=True, inv=False),
    # Encoder-decoders: adapters in the encoder, the decoder and (cross_adapter) after cross-attention;
    # LoRA on self- and cross-attention; prefixes for encoder, decoder and cross-attention.
    **{arch: [*_methods(arch, prefix=True, inv=True),
              ("seq_bn_cross", ("seq_bn", {"cross_adapter": True})),
              ("double_seq_bn_cross", ("double_seq_bn", {"cross_adapter": True})),
              ("prefix_tuning_self_only", {"architecture": "prefix_tuning", "encoder_prefix": False,
                                           "cross_prefix": False, **SMALL_PREFIX})]
       for arch in ("bart", "t5")},
    **{arch: [("seq_bn", "seq_bn"), ("double_seq_bn_cross", ("double_seq_bn", {"cross_adapter": True})),
              ("lora", LORA_ALL), ("prefix_tuning", {"architecture": "prefix_tuning", **SMALL_PREFIX})]
       for arch in ("mbart", "mt5")},
    "whisper": [("seq_bn", "seq_bn"), ("double_seq_bn_cross", ("double_seq_bn", {"cross_adapter": True})),
                ("lora", LORA_ALL), ("seq_bn_inv", "seq_bn_inv"),
                ("prefix_tuning", {"architecture": "prefix_tuning", **SMALL_PREFIX})],
}
# IA3 scales barely move a tiny random ModernBERT (its final norm absorbs them): perturb harder.
PERTURB_SCALE = {"modernbert_ia3": 0.5}

# The plugin entry: OPT is in neither AdapterHub's model list nor our table. AdapterHub reaches it
# through this AdapterModelInterface (its "plugin interface"), written beside the model as
# adapter_interface.json; adaptercli reads that file, or the same layout in its own keys.
OPT_INTERFACE = {
    "adapter_methods": ["bottleneck", "lora", "reft", "invertible"],
    "model_embeddings": "embed_tokens", "model_layers": "layers", "layer_self_attn": "self_attn",
    "layer_cross_attn": None, "attn_q_proj": "q_proj", "attn_k_proj": "k_proj", "attn_v_proj": "v_proj",
    "attn_o_proj": "out_proj", "layer_intermediate_proj": "fc1", "layer_output_proj": "fc2",
    "layer_pre_self_attn": "self_attn_layer_norm", "layer_pre_ffn": "final_layer_norm",
    "layer_ln_1": None, "layer_ln_2": None, "base_model": "decoder",
}
INTERFACES = {"opt": OPT_INTERFACE}

# New methods, on BERT (and some on Llama / GPT-2 to cover pre-LN models and fused projections).
METHOD_CASES: dict[str, tuple[str, object]] = {
    "bert_scaled_par_bn": ("bert", "scaled_par_bn"),
    "bert_double_seq_bn_inv": ("bert", "double_seq_bn_inv"),
    "bert_prefix_tuning_flat": ("bert", {"architecture": "prefix_tuning", "flat": True, "prefix_length": 6}),
    "llama_prefix_tuning_flat": ("llama", {"architecture": "prefix_tuning", "flat": True, "prefix_length": 6}),
    "bert_compacter": ("bert", ("compacter", PHM_SMALL)),
    "bert_compacter_pp": ("bert", ("compacter++", PHM_SMALL)),
    "bert_compacter_unshared": ("bert", ("compacter", {**PHM_SMALL, "shared_phm_rule": False,
                                                       "factorized_phm_rule": True})),
    "bert_compacter_shared_w": ("bert", ("compacter++", {**PHM_SMALL, "shared_W_phm": True})),
    "bert_compacter_full_w": ("bert", ("compacter++", {**PHM_SMALL, "factorized_phm_W": False,
                                                       "hypercomplex_nonlinearity": "glorot-uniform"})),
    "llama_compacter": ("llama", ("compacter", PHM_SMALL)),
    "bert_prompt_tuning": ("bert", {"architecture": "prompt_tuning", "prompt_length": 5}),
    "bert_loreft": ("bert", "loreft"),
    "bert_noreft": ("bert", ("noreft", {"suffix_positions": 2, "r": 2})),
    "bert_direft": ("bert", ("direft", {"r": 2, "tied_weights": True, "suffix_positions": 1})),
    "llama_loreft": ("llama", ("loreft", {"suffix_positions": 2})),
    "bert_vera": ("bert", "vera"),
    "bert_dora": ("bert", "dora"),
    "bert_dvora": ("bert", "dvora"),
    "llama_dora": ("llama", ("dora", {"attn_matrices": ["q", "k", "v"], "intermediate_lora": True})),
    "bert_mam": ("bert", "mam"),
    "bert_unipelt": ("bert", "unipelt"),
    "opt_seq_bn": ("opt", "seq_bn"),
    "opt_double_seq_bn": ("opt", "double_seq_bn"),
    "opt_par_bn": ("opt", "par_bn"),
    "opt_seq_bn_inv": ("opt", "seq_bn_inv"),
    "opt_compacter": ("opt", ("compacter", PHM_SMALL)),
    "opt_lora": ("opt", LORA_ALL),
    "opt_ia3": ("opt", "ia3"),
    "opt_dora": ("opt", "dora"),
    "opt_loreft": ("opt", ("loreft", {"suffix_positions": 2})),
}

# Bottleneck flags beyond the presets' values, on a post-LN (BERT) and a pre-LN (Llama) model:
# where the residual is taken, the adapter's own norms and the order of its residual, learned and
# per-channel scaling, gating, another activation. reduction_factor 4: 16 -> 4 wide.
BN_FLAG_CASES: dict[str, tuple[str, dict]] = {
    "seq_bn_residual_after_ln": ("seq_bn", {"residual_before_ln": False}),
    "seq_bn_post_add": ("seq_bn", {"residual_before_ln": "post_add"}),
    "seq_bn_own_norms": ("seq_bn", {"ln_before": True, "ln_after": True}),
    "seq_bn_norm_after_residual": ("seq_bn", {"ln_after": True, "adapter_residual_before_ln": True}),
    "seq_bn_learned_scaling": ("seq_bn", {"scaling": "learned"}),
    "seq_bn_channel_scaling": ("seq_bn", {"scaling": "channel"}),
    "seq_bn_gated": ("seq_bn", {"use_gating": True}),
    "seq_bn_tanh": ("seq_bn", {"non_linearity": "tanh"}),
    "double_seq_bn_post_add": ("double_seq_bn", {"residual_before_ln": "post_add"}),
    "double_seq_bn_no_ln_after": ("double_seq_bn", {"original_ln_after": False}),
    "par_bn_norm_scaled": ("par_bn", {"ln_after": True, "scaling": 2.0}),
    "par_bn_gated": ("par_bn", {"use_gating": True}),
}
METHOD_CASES.update({f"{arch}_{suffix}": (arch, (preset, {"reduction_factor": 4, **flags}))
                     for arch in ("bert", "llama") for suffix, (preset, flags) in BN_FLAG_CASES.items()})

# The other families' flags beyond their presets' values, on the same two models.
FLAG_CASES: dict[str, tuple[str, dict]] = {
    "lora_k_only_alpha": ("lora", {"attn_matrices": ["k"], "r": 2, "alpha": 16}),
    "lora_ffn_only": ("lora", {"selfattn_lora": False, "intermediate_lora": True, "output_lora": True, "r": 4}),
    "lora_gated": ("lora", {"use_gating": True, "r": 4, "attn_matrices": ["q", "v"], "intermediate_lora": True}),
    "lora_leave_out": ("lora", {"leave_out": [0], "r": 4, "alpha": 4}),
    "ia3_output": ("ia3", {"output_lora": True}),
    "prefix_tuning_gated": ("prefix_tuning", {**SMALL_PREFIX, "use_gating": True}),
    "prefix_tuning_gated_apart": ("prefix_tuning", {**SMALL_PREFIX, "use_gating": True, "shared_gating": False}),
    "prefix_tuning_leave_out": ("prefix_tuning", {**SMALL_PREFIX, "leave_out": [1]}),
    "prefix_tuning_relu": ("prefix_tuning", {**SMALL_PREFIX, "non_linearity": "relu"}),
    "loreft_both_ends": ("loreft", {"prefix_positions": 2, "suffix_positions": 1, "r": 2}),
    "loreft_one_layer": ("loreft", {"layers": [1], "suffix_positions": 2, "r": 2}),
    "noreft_tanh": ("noreft", {"non_linearity": "tanh", "r": 2, "suffix_positions": 2}),
}
METHOD_CASES.update({f"{arch}_{suffix}": (arch, spec) for arch in ("bert", "llama")
                     for suffix, spec in FLAG_CASES.items()})
# leave_out on an encoder-decoder counts encoder, then decoder layers (2 + 2 here): each pool
# holds the layers of its place that are left in.
METHOD_CASES.update({f"{arch}_prefix_tuning_leave_out": (arch, ("prefix_tuning", {**SMALL_PREFIX, "leave_out": [1, 2]}))
                     for arch in ("bart", "t5")})
FLAG_CASES_MORE: dict[str, tuple[str, dict]] = {
    "prompt_tuning_after_bos": ("prompt_tuning", {"prompt_length": 4, "combine": "prefix_after_bos"}),
    "prefix_tuning_flat_leave_out": ("prefix_tuning_flat", {"prefix_length": 4, "leave_out": [0]}),
    "seq_bn_inv_narrow": ("seq_bn_inv", {"inv_adapter_reduction_factor": 4, "reduction_factor": 4}),
    "ia3_qkv": ("ia3", {"attn_matrices": ["q", "k", "v"], "intermediate_lora": False}),
}
METHOD_CASES.update({f"{arch}_{suffix}": (arch, spec) for arch in ("bert", "llama")
                     for suffix, spec in FLAG_CASES_MORE.items()})
METHOD_CASES.update({f"{arch}_{suffix}": (arch, spec) for arch in ("bart", "t5") for suffix, spec in (
    ("seq_bn_leave_out", ("seq_bn", {"leave_out": [1, 2]})),
    ("lora_leave_out", ("lora", {"r": 4, "alpha": 8, "attn_matrices": ["q", "k", "v"], "intermediate_lora": True,
                                 "output_lora": True, "leave_out": [0, 3]})))})

# Cases whose reference we do not reproduce, with why: saved (status "differs"), never compared.
DIFFERS: dict[str, str] = {}


def model_class(arch: str):
    import transformers as t

    return {"electra": t.ElectraModel, "albert": t.AlbertModel, "deberta-v2": t.DebertaV2Model,
            "deberta": t.DebertaModel, "qwen2": t.Qwen2Model, "qwen3": t.Qwen3Model, "gemma2": t.Gemma2Model,
            "gemma3_text": t.Gemma3TextModel, "phi": t.PhiModel, "modernbert": t.ModernBertModel, "opt": t.OPTModel,
            "vit": t.ViTModel, "clip_text_model": t.CLIPTextModel, "clip_vision_model": t.CLIPVisionModel,
            "bart": t.BartModel, "t5": t.T5Model, "mbart": t.MBartModel, "mt5": t.MT5Model,
            "whisper": t.WhisperModel,
            "bert": t.BertModel, "llama": t.LlamaModel}[arch]


def resolve(spec: object):
    """An ``adapters`` config for a case: an identifier, a dict, or (identifier, overrides)."""
    import adapters

    if isinstance(spec, tuple):
        name, overrides = spec
        return adapters.AdapterConfig.load(name).replace(**overrides)
    if isinstance(spec, str) and spec == "mam":
        return adapters.MAMConfig(adapters.PrefixTuningConfig(**SMALL_PREFIX))
    if isinstance(spec, str) and spec == "unipelt":
        return adapters.UniPELTConfig(adapters.PrefixTuningConfig(**SMALL_PREFIX))
    return adapters.AdapterConfig.load(spec)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def seed_for(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def load_base(arch: str):
    model = model_class(arch).from_pretrained(OUT / "models" / arch, attn_implementation="eager")
    model.config._name_or_path = rel(OUT / "models" / arch)
    return model.eval()


def make_inputs(pad_id: int, arch: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    if arch in ("vit", "clip_vision_model"):
        return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)}
    if arch == "whisper":  # 8 mel bins x 16 frames (twice max_source_positions)
        return {"input_features": torch.randn(BATCH, 8, 16, generator=gen),
                "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, 7), generator=gen)}
    if arch in ("bart", "t5", "mbart", "mt5"):  # the decoder reads 7 target tokens and the padded source
        inputs = make_inputs(pad_id)
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 7), generator=gen)
        return inputs
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    attention_mask[1, SEQ_LEN - N_PAD:] = 0
    input_ids[1, SEQ_LEN - N_PAD:] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def interface(arch: str):
    import adapters

    return adapters.AdapterModelInterface(**INTERFACES[arch]) if arch in INTERFACES else None


def zero_stray_biases(model, base) -> None:
    """adapters 1.3.0 wraps a fused q/k/v projection that has no bias (ModernBERT's ``Wqkv``,
    DeBERTa's ``in_proj``) in a layer with a randomly initialised bias, which changes the bare
    model's output. Zero those biases so the reference measures the adapters, not that defect."""
    own = dict(base.named_modules())
    with torch.no_grad():
        for path, module in model.named_modules():
            original = own.get(path)
            if type(module).__name__ == "LoRAMergedLinear" and original is not None and original.bias is None:
                module.bias.zero_()


def complete_folder(model, folder: Path, spec: object) -> list[str]:
    """Add what adapters 1.3.0 leaves out of a saved folder, so that the folder alone reproduces
    the output (its own ``load_adapter`` reads these keys; only ``save_adapter`` misses them):

    * ``shared_parameters.ref.*``: Compacter's shared PHM rule / weights and VeRA's frozen random
      matrices live outside the layers and are not written;
    * DiReFT's ``subtract_projection=False`` is a class attribute, not a config field, so the
      written config reads back as NoReFT; we add the key (read by adaptercli).
    """
    from safetensors.torch import load_file, save_file

    notes = []
    weights_file = folder / "adapter.safetensors"
    if weights_file.exists():
        saved = load_file(str(weights_file))
        shared = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                  if k.startswith("shared_parameters.ref.") and k not in saved}
        if shared:
            save_file({**saved, **shared}, str(weights_file), metadata={"format": "pt"})
            notes.append(f"added {len(shared)} shared tensors adapters 1.3.0 does not save ({', '.join(sorted(shared))});")
    config_file = folder / "adapter_config.json"
    meta = json.loads(config_file.read_text())
    if meta["config"].get("architecture") == "reft" and spec_name(spec) == "direft":
        meta["config"]["subtract_projection"] = False
        config_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
        notes.append("added config subtract_projection=false (adapters 1.3.0 reloads its direft folders as noreft);")
    return notes


def spec_name(spec: object) -> str:
    return spec[0] if isinstance(spec, tuple) else spec if isinstance(spec, str) else ""


def build_model(arch: str) -> None:
    torch.manual_seed(seed_for("model_" + arch))
    config = base_config(arch)
    config._attn_implementation = "eager"
    model = model_class(arch)(config).eval()
    folder = OUT / "models" / arch
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    if arch in INTERFACES:  # as AdapterHub's save_pretrained writes it for a plugin-interface model
        (folder / "adapter_interface.json").write_text(json.dumps(
            {"model_type": config.model_type, "interface": INTERFACES[arch], "version": "adapters.1.3.0"},
            indent=2, sort_keys=True) + "\n")


def run_case(name: str, arch: str, spec: object) -> dict:
    import adapters

    case = {"name": name, "arch": arch, "spec": spec if not isinstance(spec, tuple) else list(spec),
            "model_dir": rel(OUT / "models" / arch), "adapter_dir": rel(OUT / "adapters" / name),
            "io": rel(OUT / "io" / f"{name}.safetensors")}
    out_dir = OUT / "adapters" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        base = load_base(arch)
        inputs = make_inputs(getattr(base.config, "pad_token_id", 0) or 0, arch)
        with torch.no_grad():
            reference = base(**inputs).last_hidden_state
        model = load_base(arch)
        adapters.init(model, interface=interface(arch))
        zero_stray_biases(model, base)
        torch.manual_seed(seed_for("init_" + name))
        model.add_adapter("ref", config=resolve(spec))
        params = [p for n, p in model.named_parameters() if ".ref." in n or n.endswith(".ref")]
        gen = torch.Generator().manual_seed(seed_for("perturb_" + name))
        with torch.no_grad():
            for p in params:
                p.add_(PERTURB_SCALE.get(name, PERTURB) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if not params:
            raise RuntimeError("no adapter parameters found")
        model.set_active_adapters("ref")
        model.eval()  # adapters 1.3.0 creates some layers (ReFT's) in training mode: dropout would run
        with torch.no_grad():
            out = model(**inputs)
            expected = out.last_hidden_state
            extra = {"expected_encoder": out.encoder_last_hidden_state} if "decoder_input_ids" in inputs else {}
            model.set_active_adapters(None)
            bare = model(**inputs).last_hidden_state
        if (bare - reference).abs().max().item() > 1e-5:
            raise RuntimeError("adapters.init changed the base output")
        if expected.shape == bare.shape:
            diff = (expected - bare).abs().max().item()
        else:  # prompt tuning: compare the input positions
            diff = (expected[:, -bare.shape[1]:] - bare).abs().max().item()
        if not diff > MIN_DIFF:
            raise RuntimeError(f"adapter has no visible effect (max abs diff {diff:.2e})")
        out_dir.parent.mkdir(parents=True, exist_ok=True)  # adapters 1.3.0 does not create parents
        # Prefix pools are shared tensors, which adapters 1.3.0 cannot write as safetensors.
        safetensors = not any(".prefix_tuning." in n for n, _ in model.named_parameters())
        model.save_adapter(str(out_dir), "ref", use_safetensors=safetensors)
        notes = complete_folder(model, out_dir, spec)
        # Reload with the reference library: the saved folder alone reproduces `expected` (not for
        # DiReFT, which adapters 1.3.0 reloads as NoReFT; see complete_folder).
        again = load_base(arch) if spec_name(spec) != "direft" else None
        if again is None:
            return finish(case, name, inputs, expected, bare, params, diff, out_dir, notes, extra)
        adapters.init(again, interface=interface(arch))
        zero_stray_biases(again, base)
        again.load_adapter(str(out_dir), use_safetensors=safetensors, set_active=True)
        again.eval()
        with torch.no_grad():
            reloaded = again(**inputs).last_hidden_state
        if (reloaded - expected).abs().max().item() > 1e-5:
            raise RuntimeError("the saved folder does not reproduce the output when reloaded")
    except Exception as exc:  # recorded in the manifest, never faked
        shutil.rmtree(out_dir, ignore_errors=True)
        case.update(status="skipped", note=f"{type(exc).__name__}: {str(exc)[:300]}", adapter_dir=None, io=None)
        print(f"SKIP {name}: {case['note']}", file=sys.stderr)
        return case
    return finish(case, name, inputs, expected, bare, params, diff, out_dir, notes, extra)


def finish(case, name, inputs, expected, bare, params, diff, out_dir, notes, extra) -> dict:
    from safetensors.torch import save_file

    path = OUT / "io" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, **{k: v.float().contiguous() for k, v in extra.items()},
               "expected": expected.detach().float().contiguous(), "bare": bare.detach().float().contiguous()},
              str(path))
    n_params = sum(p.numel() for p in params)
    differs = [f"differs: {DIFFERS[name]}"] if name in DIFFERS else []
    case.update(status="differs" if differs else "ok",
                note=" ".join([f"{len(params)} tensors ({n_params} values) perturbed;",
                               f"max|expected-bare|={diff:.4g}", *notes, *differs]),
                files=sorted(p.name for p in out_dir.iterdir()))
    print(f"{case['status']:4s} {name}: {case['note']}")
    return case


# Every AdapterHub method identifier, counted on a RoBERTa-base (125M) config: trainable parameters
# after `train_adapter`, as adapters 1.3.0 builds them (AdapterHub's docs quote such counts).
COUNTED_METHODS = ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "seq_bn_inv", "double_seq_bn_inv",
                   "compacter", "compacter++", "lora", "ia3", "dora", "vera", "dvora", "prefix_tuning",
                   "prefix_tuning_flat", "prompt_tuning", "loreft", "noreft", "direft", "mam", "unipelt"]


def param_counts() -> dict[str, int]:
    import adapters
    from transformers import RobertaConfig, RobertaModel

    counts = {}
    for method in COUNTED_METHODS:
        # DoRA reads the weights it adapts, so it needs real tensors; the rest count on the meta device.
        device = "cpu" if method in ("dora", "dvora") else "meta"
        torch.manual_seed(0)
        with torch.device(device):
            model = RobertaModel(RobertaConfig())
        adapters.init(model)
        model.add_adapter("x", config=method)
        model.train_adapter("x")
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"count {method}: {counts[method]:,}")
    return counts


def all_cases() -> dict[str, tuple[str, object]]:
    cases = {f"{arch.replace('-', '_')}_{suffix}": (arch, spec)
             for arch, methods in ARCH_CASES.items() for suffix, spec in methods}
    cases.update(METHOD_CASES)
    return cases


def main(selected: list[str]) -> None:
    import adapters
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cases = all_cases()
    if selected:
        cases = {n: c for n, c in cases.items() if n in selected or c[0] in selected}
        if not cases and selected != ["param_counts"]:
            raise SystemExit(f"no case or architecture named {selected}")
    manifest_path = OUT / "manifest.json"
    old = json.loads(manifest_path.read_text())["cases"] if manifest_path.exists() and selected else []
    for arch in sorted({arch for arch, _ in cases.values()}):
        build_model(arch)
    results = {c["name"]: c for c in old}
    for name, (arch, spec) in cases.items():
        results[name] = run_case(name, arch, spec)
    order = list(all_cases())
    if not selected or "param_counts" in selected:
        counts = param_counts()
    else:  # keep the counts already recorded
        counts = json.loads(manifest_path.read_text()).get("param_counts", {}).get("roberta-base", {})
    manifest = {
        "generator": "scripts/make_breadth_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "adapters": adapters.__version__},
        "dtype": "float32", "attn_implementation": "eager",
        "cases": [results[n] for n in order if n in results],
        "param_counts": {"roberta-base": counts},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    ok = sum(c["status"] == "ok" for c in manifest["cases"])
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{ok}/{len(manifest['cases'])} cases ok; {total / 1e6:.2f} MB under {rel(OUT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
