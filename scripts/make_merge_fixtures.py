"""Reference merges from PEFT itself, for tests/test_merging.py (PEFT is never our dependency).

Run in a throw-away venv (from the repository root)::

    python3 -m venv /tmp/peftvenv && /tmp/peftvenv/bin/pip install torch==2.13.0
    /tmp/peftvenv/bin/pip install "transformers>=5,<6" peft
    /tmp/peftvenv/bin/python scripts/make_merge_fixtures.py

On the tiny BERT in tests/fixtures/models/bert it makes three LoRA adapters on query and value
(a: r 4, alpha 8; b: r 4, alpha 16; c: r 2, alpha 4), moves every weight to a seeded random value,
saves each as a PEFT folder (tests/fixtures/merging/sources/<name>), then merges them with
``add_weighted_adapter`` for every combination type and writes the merged A and B of every layer
to tests/fixtures/merging/merged.safetensors (keys ``<case>/<module>/lora_A``) with the cases in
cases.json.

DARE draws random masks. ``add_weighted_adapter`` first creates the new adapter (whose initialisation
uses the global random generator), so each case seeds the generator after that, right before the
merge loop, and runs the same per-layer merge ``add_weighted_adapter`` runs
(``_generalized_task_arithmetic_weighted_adapter`` / its SVD form) layer by layer in module order.
The deterministic cases are also checked against the public ``add_weighted_adapter`` result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModel

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "bert"
OUT = ROOT / "tests" / "fixtures" / "merging"
SEED = 7
CASES = [  # name, combination type, sources, weights, density, majority sign method, svd rank
    ("linear", "linear", ["a", "b"], [0.7, -0.4], None, "total", None),
    ("ties", "ties", ["a", "b"], [0.7, 0.5], 0.5, "total", None),
    ("ties_frequency", "ties", ["a", "b"], [0.7, -0.5], 0.3, "frequency", None),
    ("magnitude_prune", "magnitude_prune", ["a", "b"], [0.6, 0.9], 0.4, "total", None),
    ("dare_linear", "dare_linear", ["a", "b"], [0.7, 0.5], 0.5, "total", None),
    ("dare_ties", "dare_ties", ["a", "b"], [0.7, -0.5], 0.6, "total", None),
    ("cat", "cat", ["a", "b", "c"], [0.5, 0.3, 0.2], None, "total", None),
    ("svd", "svd", ["a", "b", "c"], [0.5, 0.3, 0.2], None, "total", 3),
    ("ties_svd", "ties_svd", ["a", "c"], [0.6, 0.4], 0.5, "total", 4),
    ("dare_linear_svd", "dare_linear_svd", ["a", "c"], [0.6, 0.4], 0.5, "total", 4),
    ("dare_ties_svd", "dare_ties_svd", ["b", "c"], [0.6, -0.4], 0.7, "frequency", None),
    ("magnitude_prune_svd", "magnitude_prune_svd", ["a", "b"], [1.0, 1.0], 0.5, "total", 2),
]
SOURCES = {"a": (4, 8), "b": (4, 16), "c": (2, 4)}


def _model():
    torch.manual_seed(0)
    model = None
    for name, (r, alpha) in SOURCES.items():
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0)
        if model is None:
            model = get_peft_model(AutoModel.from_pretrained(MODEL), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if "lora_" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def _merge_layers(model, case) -> None:
    """``add_weighted_adapter``'s loop over layers, with the global generator seeded first."""
    name, kind, sources, weights, density, sign, _ = case
    lora_model = model.base_model
    torch.manual_seed(SEED)
    for _, target in lora_model.model.named_modules():
        if not isinstance(target, LoraLayer) or name not in target.lora_A:
            continue
        a, b = target.lora_A[name].weight, target.lora_B[name].weight
        if kind.endswith("svd"):
            new_a, new_b = lora_model._svd_generalized_task_arithmetic_weighted_adapter(
                kind, sources, weights, a.shape[0], target, a, b, density, sign)
        elif kind == "cat":
            continue  # no randomness: the public call's result stands
        else:
            new_a, new_b = lora_model._generalized_task_arithmetic_weighted_adapter(
                kind, sources, weights, target, density, sign)
        a.data, b.data = new_a, new_b


def main() -> None:
    model = _model()
    shutil.rmtree(OUT, ignore_errors=True)
    for name in SOURCES:
        model.save_pretrained(OUT / "sources" / name, selected_adapters=[name])
        nested = OUT / "sources" / name / name
        if nested.is_dir():  # PEFT nests a non-default adapter in a folder of its name
            for path in nested.iterdir():
                path.rename(OUT / "sources" / name / path.name)
            nested.rmdir()
    merged, checked = {}, []
    for case in CASES:
        name, kind, sources, weights, density, sign, rank = case
        model.add_weighted_adapter(sources, weights, name, combination_type=kind, svd_rank=rank, density=density,
                                   majority_sign_method=sign)
        public = {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}
        _merge_layers(model, case)
        for key, param in model.named_parameters():
            if f".{name}." not in key:
                continue
            if "dare" not in kind:
                assert torch.equal(param, public[key]), (name, key)
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            part = "lora_A" if ".lora_A." in key else "lora_B"
            merged[f"{name}/{module}/{part}"] = param.detach().contiguous()
        checked.append({"name": name, "strategy": kind, "sources": sources, "weights": weights, "density": density,
                        "majority_sign_method": sign, "svd_rank": rank, "seed": SEED})
    save_file(merged, OUT / "merged.safetensors")
    (OUT / "cases.json").write_text(json.dumps({"peft": peft.__version__, "torch": torch.__version__,
                                                "cases": checked}, indent=1) + "\n")
    print(f"{len(checked)} cases, {len(merged)} tensors -> {OUT} (peft {peft.__version__})")


if __name__ == "__main__":
    main()
