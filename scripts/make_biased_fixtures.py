"""AdapterHub reference fixtures on a BERT whose biases are not zero.

The tiny models of the other fixtures are initialised as transformers initialises them, with every
bias zero: a method that treats the layer's bias wrongly (scales it, renormalises it, adds it
twice, leaves it out) gives the same output there. Here the base is the core tiny BERT with every
bias drawn from N(0, 0.1), and each adapter's tensors are moved by N(0, 0.2) (four times the other
fixtures' perturbation). Same environment and conventions as ``scripts/make_breadth_fixtures.py``
(whose ``complete_folder`` adds what adapters 1.3.0's ``save_adapter`` leaves out)::

    /tmp/refvenv/bin/python scripts/make_biased_fixtures.py

Writes ``tests/fixtures/biased/``: ``models/bert``, ``adapters/<method>/``, ``io/<method>.safetensors``
and ``manifest.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_breadth_fixtures as breadth  # noqa: E402
import make_fixtures as core  # noqa: E402

OUT = core.OUT / "biased"
PERTURB = 0.2
METHODS: dict[str, object] = {
    "seq_bn": "seq_bn", "double_seq_bn": "double_seq_bn", "par_bn": "par_bn", "scaled_par_bn": "scaled_par_bn",
    "seq_bn_inv": "seq_bn_inv", "compacter": ("compacter", breadth.PHM_SMALL),
    "lora": ("lora", {"attn_matrices": ["q", "k", "v"], "intermediate_lora": True, "output_lora": True}),
    "ia3": ("ia3", {"output_lora": True}), "dora": ("dora", {"intermediate_lora": True}), "vera": "vera",
    "prefix_tuning": ("prefix_tuning", breadth.SMALL_PREFIX), "loreft": "loreft", "noreft": "noreft",
    "direft": "direft", "mam": "mam", "unipelt": "unipelt",
}


def build_model() -> Path:
    folder = OUT / "models" / "bert"
    model = core.load_base("bert")
    gen = torch.Generator().manual_seed(core.seed_for("biased_bert"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


def make_case(name: str, spec: object, model_dir: Path) -> dict:
    import adapters
    from safetensors.torch import save_file
    from transformers import BertModel

    def load():
        model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        model.config._name_or_path = core.rel(model_dir)
        return model

    inputs = core.make_inputs("bert", 0)
    model = load()
    with torch.no_grad():
        bare = model(**inputs).last_hidden_state
    adapters.init(model)
    torch.manual_seed(core.seed_for("init_" + name))
    model.add_adapter("ref", config=breadth.resolve(spec))
    params = [p for n, p in model.named_parameters() if ".ref." in n or n.endswith(".ref")]
    gen = torch.Generator().manual_seed(core.seed_for("perturb_" + name))
    with torch.no_grad():
        for p in params:
            p.add_(PERTURB * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.set_active_adapters("ref")
    model.eval()  # adapters 1.3.0 creates ReFT's layers in training mode
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    diff = core.check_differs(name, expected, bare)
    folder = OUT / "adapters" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    safetensors = not any(".prefix_tuning." in n for n, _ in model.named_parameters())
    model.save_adapter(str(folder), "ref", use_safetensors=safetensors)
    notes = breadth.complete_folder(model, folder, spec)
    io = OUT / "io" / f"{name}.safetensors"
    io.parent.mkdir(parents=True, exist_ok=True)
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, "expected": expected.contiguous(),
               "bare": bare.contiguous()}, str(io))
    return {"name": name, "model_dir": core.rel(model_dir), "adapter_dir": core.rel(folder), "io": core.rel(io),
            "note": " ".join([f"{len(params)} tensors perturbed by N(0, {PERTURB});",
                              f"max|expected-bare|={diff:.4g}", *notes])}


def main() -> None:
    import adapters
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    model_dir = build_model()
    cases = [make_case(name, spec, model_dir) for name, spec in METHODS.items()]
    manifest = {"generator": "scripts/make_biased_fixtures.py",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "adapters": adapters.__version__},
                "cases": cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for case in cases:
        print(case["name"], case["note"])


if __name__ == "__main__":
    main()
