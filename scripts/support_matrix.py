"""Generate the docs' support matrix (docs/support-matrix.md) from the code: the architecture table, the method registry
and the reference fixtures, so the matrix cannot drift from what the library does.

For every model type in the architecture table a tiny random model is built and every method of
the registry is added to it: a method the library refuses there is marked with the refusal's
reason; one it accepts is "✓" (tests/test_methods.py and tests/test_support_matrix.py run each such
pair: the output changes, deactivating restores it) or "✅" when a fixture made with AdapterHub
``adapters`` 1.3.0 checks its output (tests/test_reference_outputs.py,
tests/test_reference_architectures.py). The composition table comes from each family's ``blocks``.

    .venv/bin/python scripts/support_matrix.py          # rewrite the section in docs/support-matrix.md
    .venv/bin/python scripts/support_matrix.py --check  # exit 1 if the page is not current
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

import adaptercli
from adaptercli.architectures import ARCHITECTURES
from adaptercli.methods import FAMILIES, METHODS, method_name, resolve_config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "support-matrix.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
MANIFESTS = (ROOT / "tests/fixtures/manifest.json", ROOT / "tests/fixtures/breadth/manifest.json")

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
             max_position_embeddings=64)
_DECODER = dict(_TINY, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS: dict[str, dict] = {
    "bert": _TINY, "roberta": dict(_TINY, pad_token_id=1, max_position_embeddings=66),
    "xlm-roberta": dict(_TINY, pad_token_id=1, max_position_embeddings=66),
    "camembert": dict(_TINY, pad_token_id=1, max_position_embeddings=66), "electra": dict(_TINY, embedding_size=32),
    "albert": dict(_TINY, embedding_size=16), "deberta": dict(_TINY, relative_attention=True),
    "deberta-v2": dict(_TINY, relative_attention=True, position_buckets=8),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=100, n_positions=64),
    "llama": _DECODER, "mistral": dict(_DECODER, sliding_window=None), "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=8), "gemma2": dict(_DECODER, head_dim=8), "gemma3_text": dict(_DECODER, head_dim=8),
    "phi": dict(_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "modernbert": dict(_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=8),
    "clip_text_model": dict(_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "clip_vision_model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=16, patch_size=8),
    **{t: dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64)
       for t in ("bart", "mbart")},
    **{t: dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=100) for t in ("t5", "mt5")},
    "whisper": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8, max_source_positions=8,
                    max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1),
}
# Models outside the table, described by a shipped layout preset (the plugin entry).
LAYOUTS = {"opt": yaml.safe_load((ROOT / "configs/layout/opt.yaml").read_text())["model"]["layout"]}
# Tiny models are 32 wide: Compacter's default reduction factor (32) would leave a 1-wide PHM layer.
TINY_SETTINGS = {"compacter": "[reduction_factor=4]", "compacter++": "[reduction_factor=4]"}


def model_types() -> list[str]:
    return [t for arch in ARCHITECTURES for t in arch.model_types] + list(LAYOUTS)


def tiny_model(model_type: str, attn: str = "eager") -> torch.nn.Module:
    """A tiny random model with the adapter API (and its layout when the table has no entry)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    return adaptercli.init(AutoModel.from_config(config, attn_implementation=attn).eval(), layout=LAYOUTS.get(model_type))


def probe(model_type: str) -> dict[str, str | None]:
    """method -> None when the library accepts it on this model type, else the refusal's message."""
    results: dict[str, str | None] = {}
    model = tiny_model(model_type)
    for method in METHODS:
        try:
            model.add_adapter("probe", method + TINY_SETTINGS.get(method, ""))
        except adaptercli.AdapterCliError as exc:
            results[method] = str(exc)
        else:
            results[method] = None
            model.delete_adapter("probe")
    return results


def reference_tested() -> set[tuple[str, str]]:
    """(model type, method) pairs whose output a fixture made with AdapterHub checks."""
    pairs = set()
    for path in MANIFESTS:
        for case in json.loads(path.read_text())["cases"]:
            if case["status"] != "ok" or case.get("source", "adapters") != "adapters":
                continue
            meta = json.loads((ROOT / case["adapter_dir"] / "adapter_config.json").read_text())
            pairs.add((meta["model_type"], method_name(resolve_config(dict(meta["config"])))))
    return pairs


def _reason(message: str) -> str:
    """A short footnote text for a refusal."""
    for key, short in (("prefix tuning is not available", "attention outside transformers' attention functions"),
                       ("prompt tuning is not available", "prompt tuning: BERT-like encoders only, as in AdapterHub"),
                       ("separate q/k/v", "fused q/k/v projection"), ("same shape", "layers of different shapes (GQA)"),
                       ("not divisible", "width not divisible by phm_dim"),
                       ("no residual input", "no FFN residual of its own (Phi: parallel attention and FFN)"),
                       ("invertible adapter works", "no token embeddings as wide as the hidden states")):
        if key in message:
            return short
    return message.split(";")[0]


def render() -> str:
    tested = reference_tested()
    rows, notes = [], {}
    methods = list(METHODS)
    header = "| model type | " + " | ".join(f"`{m}`" for m in methods) + " |"
    rows += [header, "|" + "---|" * (len(methods) + 1)]
    for model_type in model_types():
        cells = []
        for method, refusal in probe(model_type).items():
            if refusal is not None:
                reason = _reason(refusal)
                mark = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"— ({mark})")
            else:
                cells.append("✅" if (model_type, method) in tested else "✓")
        label = f"{model_type} (layout/{model_type})" if model_type in LAYOUTS else model_type
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    blocks = ("Stack", "Fuse", "Parallel", "BatchSplit", "Average", "Split")
    composition = ["| family (methods) | " + " | ".join(blocks) + " |", "|" + "---|" * (len(blocks) + 1)]
    for name, family in FAMILIES.items():
        members = [m for m, spec in METHODS.items() if spec.family is family]
        composition.append(f"| {name} ({', '.join(members)}) | "
                           + " | ".join("✅" if b in family.blocks else "—" for b in blocks) + " |")
    legend = ("✅ output equals AdapterHub `adapters` 1.3.0 within 1e-4 (reference fixture; eager and SDPA where "
              "the model has SDPA; for a layout row, AdapterHub's plugin interface for that model) · ✓ runs: the output changes and deactivating restores it (tested; no reference "
              "fixture for the pair) · — refused with an error:")
    footnotes = "; ".join(f"({n}) {reason}" for reason, n in notes.items())
    return "\n".join([START, "<!-- generated by scripts/support_matrix.py from the architecture table, the method "
                      "registry and the fixtures; do not edit by hand -->", "", *rows, "",
                      f"{legend} {footnotes}.", "", "Composition blocks per method family (a union runs its "
                      "members together; members are refused in blocks the union does not list):", "",
                      *composition, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's section is not current")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE.name} has no {START} ... {END} section")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    updated = before + render() + after
    if args.check:
        if updated != text:
            print(f"{PAGE.name}'s support matrix is out of date: run scripts/support_matrix.py", file=sys.stderr)
            raise SystemExit(1)
        print(f"{PAGE.name}'s support matrix is current")
        return
    PAGE.write_text(updated)
    print(f"{PAGE.name} support matrix updated")


if __name__ == "__main__":
    main()
