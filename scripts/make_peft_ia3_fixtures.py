"""Reference fixtures for PEFT IA3 adapters as PEFT configures them by default: the scaled layers
include ``feedforward_modules``, whose *input* IA3 scales (BERT's ``output.dense``, Llama's
``down_proj``, GPT-2's ``mlp.c_proj``), besides the keys and values whose output it scales.

Same conventions as ``scripts/make_fixtures.py`` (read its docstring) and its tiny base models
(``tests/fixtures/models/<arch>``): every ``ia3_l`` perturbed away from ones, the input, the
output with the adapter (``expected``) and without it (``bare``) saved beside the folder PEFT
writes. Run it in that throw-away environment (torch 2.13.0+cpu, transformers 4.57.6, peft
0.18.1), from the repository root::

    /tmp/refvenv/bin/python scripts/make_peft_ia3_fixtures.py

Writes ``tests/fixtures/peft_ia3/<case>/`` (PEFT's folder), ``tests/fixtures/peft_ia3/io/<case>.safetensors``
and ``tests/fixtures/peft_ia3/manifest.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as core  # noqa: E402

OUT = core.OUT / "peft_ia3"
# (arch, IA3Config kwargs): PEFT's defaults for the architecture, and an explicit list.
CASES = {
    "peft_bert_ia3_default": ("bert", {}),
    "peft_llama_ia3_default": ("llama", {}),
    "peft_gpt2_ia3_default": ("gpt2", {}),
    "peft_bert_ia3_listed": ("bert", {"target_modules": ["query", "value", "intermediate.dense", "output.dense"],
                                      "feedforward_modules": ["intermediate.dense"]}),
}


def make_case(name: str, arch: str, kwargs: dict) -> dict:
    from peft import IA3Config, get_peft_model
    from safetensors.torch import save_file

    base = core.load_base(arch)
    inputs = core.make_inputs(arch, base.config.pad_token_id)
    with torch.no_grad():
        bare = base(**inputs).last_hidden_state
    model = get_peft_model(base, IA3Config(**kwargs))
    params = [p for n, p in model.named_parameters() if "ia3_l" in n]
    core.perturb_(params, core.seed_for("perturb_" + name))
    with torch.no_grad():
        for p in params:  # ones + 5x the core perturbation: a visible change through the tiny model
            p.sub_(1.0).mul_(5.0).add_(1.0)
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
    return {"name": name, "arch": arch, "model_dir": core.rel(core.OUT / "models" / arch), "adapter_dir": core.rel(folder),
            "io": core.rel(io), "kwargs": kwargs, "feedforward_modules": config.get("feedforward_modules"),
            "note": f"{len(params)} ia3_l tensors perturbed; max|expected-bare|={diff:.4g}"}


def main() -> None:
    import peft
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    cases = [make_case(name, arch, kwargs) for name, (arch, kwargs) in CASES.items()]
    manifest = {"generator": "scripts/make_peft_ia3_fixtures.py",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
                "cases": cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for case in cases:
        print(case["name"], case["feedforward_modules"], case["note"])


if __name__ == "__main__":
    main()
