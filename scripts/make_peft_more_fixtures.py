"""Reference fixtures for PEFT adapters beyond plain LoRA: IA3 as PEFT configures it by default
(the scaled layers include ``feedforward_modules``, whose *input* IA3 scales: BERT's
``output.dense``, Llama's ``down_proj``, GPT-2's ``mlp.c_proj``), and LoRA with ``use_dora``
(PEFT's DoRA: the norm of ``W + scaling * B A``, the bias left out of the renormalisation).

Same conventions as ``scripts/make_fixtures.py`` (read its docstring) and its tiny base models
(``tests/fixtures/models/<arch>``): every adapter tensor perturbed (``ia3_l`` away from ones), the input, the
output with the adapter (``expected``) and without it (``bare``) saved beside the folder PEFT
writes. Run it in that throw-away environment (torch 2.13.0+cpu, transformers 4.57.6, peft
0.18.1), from the repository root::

    /tmp/refvenv/bin/python scripts/make_peft_more_fixtures.py

Writes ``tests/fixtures/peft_more/<case>/`` (PEFT's folder), ``tests/fixtures/peft_more/io/<case>.safetensors``
and ``tests/fixtures/peft_more/manifest.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as core  # noqa: E402

OUT = core.OUT / "peft_more"
# (arch, PEFT config class, its kwargs): IA3 with PEFT's defaults for the architecture and with an
# explicit list; DoRA on a model with biases (BERT) and one without (Llama).
CASES = {
    "peft_bert_ia3_default": ("bert_biased", "IA3Config", {}),
    "peft_llama_ia3_default": ("llama", "IA3Config", {}),
    "peft_gpt2_ia3_default": ("gpt2", "IA3Config", {}),
    "peft_bert_ia3_listed": ("bert", "IA3Config", {"target_modules": ["query", "value", "intermediate.dense", "output.dense"],
                                                   "feedforward_modules": ["intermediate.dense"]}),
    "peft_bert_dora": ("bert_biased", "LoraConfig", {"r": 4, "lora_alpha": 16, "use_dora": True,
                                              "target_modules": ["query", "value", "output.dense"]}),
    "peft_llama_dora": ("llama", "LoraConfig", {"r": 4, "lora_alpha": 8, "use_dora": True,
                                                "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    # per-layer ranks and alphas (keys are regular expressions that end a module's name)
    "peft_bert_lora_patterns": ("bert_biased", "LoraConfig", {
        "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"],
        "rank_pattern": {"layer.1.attention.self.query": 2, r"layer\.\d\.output\.dense": 6},
        "alpha_pattern": {"value": 16}}),
    "peft_llama_rslora_patterns": ("llama", "LoraConfig", {
        "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"layers.0.self_attn.q_proj": 4}}),
}


def load_base(arch: str):
    """The core tiny model; ``bert_biased``: BERT with every bias drawn from N(0, 0.1) (the core
    models' biases are zeros, under which a bias handled wrongly would not show), saved once
    under ``peft_more/models/``."""
    if arch != "bert_biased":
        return core.load_base(arch)
    folder = OUT / "models" / arch
    if not folder.exists():
        model = core.load_base("bert")
        gen = torch.Generator().manual_seed(core.seed_for(arch))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    from transformers import BertModel

    model = BertModel.from_pretrained(folder, attn_implementation="eager")
    model.config._name_or_path = core.rel(folder)
    return model.eval()


def make_case(name: str, arch: str, kind: str, kwargs: dict) -> dict:
    import peft
    from safetensors.torch import save_file

    base = load_base(arch)
    inputs = core.make_inputs(arch, base.config.pad_token_id)
    with torch.no_grad():
        bare = base(**inputs).last_hidden_state
    torch.manual_seed(core.seed_for("init_" + name))  # PEFT draws LoRA's A from the global generator
    model = peft.get_peft_model(base, getattr(peft, kind)(**kwargs))
    params = [p for n, p in model.named_parameters() if any(k in n for k in ("ia3_l", "lora_", "magnitude"))]
    before = [p.detach().clone() for p in params]
    core.perturb_(params, core.seed_for("perturb_" + name))
    with torch.no_grad():
        for p, start in zip(params, before, strict=True):  # 5x the core perturbation: a visible change through the tiny model
            p.sub_(start).mul_(5.0).add_(start)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    diff = core.check_differs(name, expected, bare)
    folder = OUT / name
    model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key in ("target_modules", "feedforward_modules"):  # sets in peft: sorted for reproducible files
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "README.md").unlink(missing_ok=True)
    io = OUT / "io" / f"{name}.safetensors"
    io.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": inputs["input_ids"].contiguous(), "attention_mask": inputs["attention_mask"].contiguous(),
               "expected": expected.float().contiguous(), "bare": bare.float().contiguous()}, str(io))
    model_dir = OUT / "models" / arch if arch == "bert_biased" else core.OUT / "models" / arch
    return {"name": name, "arch": arch, "model_dir": core.rel(model_dir), "adapter_dir": core.rel(folder),
            "io": core.rel(io), "config": kind, "kwargs": kwargs, "feedforward_modules": config.get("feedforward_modules"),
            "note": f"{len(params)} tensors perturbed; max|expected-bare|={diff:.4g}"}


def main() -> None:
    import peft
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    cases = [make_case(name, arch, kind, kwargs) for name, (arch, kind, kwargs) in CASES.items()]
    manifest = {"generator": "scripts/make_peft_more_fixtures.py",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
                "cases": cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for case in cases:
        print(case["name"], case["feedforward_modules"], case["note"])


if __name__ == "__main__":
    main()
