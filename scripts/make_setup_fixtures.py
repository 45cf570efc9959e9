"""Generate reference adapter setups with AdapterHub ``adapters`` (``save_adapter_setup``).

Like ``scripts/make_fusion_fixtures.py`` (same throw-away venv, same tiny BERT from
``tests/fixtures/models/bert``, same inputs), it writes only under ``tests/fixtures/setups/``::

    /tmp/refvenv/bin/python scripts/make_setup_fixtures.py

Versions used for the committed fixtures: torch 2.13.0+cpu, transformers 4.57.6, adapters 1.3.0
(recorded in ``tests/fixtures/setups/manifest.json``).

What it writes (deterministic, fixed seeds; every adapter, fusion and head weight perturbed away
from its init), each from a ``BertAdapterModel`` (keys with the ``bert.`` prefix):

* ``stack/``: ``Stack(st_bn, st_lora)`` (a seq_bn adapter, then a LoRA adapter) with a 3-label
  classification head named ``st_lora``, like the stack's last adapter, so the head shares that
  member's folder; ``save_adapter_setup(..., head_setup="st_lora")``, pickled weights (the default).
* ``fuse/``: ``Fuse(fu_a, fu_b, fu_c)`` (seq_bn members, "dynamic" fusion) with a 2-label head named
  ``sentiment`` in a folder of its own; ``save_adapter_setup(..., head_setup="sentiment",
  use_safetensors=True)``.
* ``io/<case>.safetensors``: ``input_ids``, ``attention_mask``, ``expected`` (the logits with the
  setup active and its head the active head).
* ``manifest.json``: each case's folder, composition (``to_dict()``), head setup, what it checks,
  and the largest difference between ``expected`` and the logits of a fresh model that loaded the
  folder with AdapterHub's own ``load_adapter_setup`` (0 when its round trip is exact).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_fixtures import make_inputs, perturb_, rel, seed_for  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "setups"
MODEL_DIR = REPO / "tests" / "fixtures" / "models" / "bert"


def _cases():
    from adapters.composition import Fuse, Stack

    return {
        # name: (members and their configs, setup, head name, labels, save with safetensors, note)
        "stack": ({"st_bn": "seq_bn", "st_lora": "lora"}, Stack("st_bn", "st_lora"), "st_lora", 3, False,
                  "Stack(st_bn, st_lora) with a head named like the last member (they share a folder)"),
        "fuse": ({"fu_a": "seq_bn", "fu_b": "seq_bn", "fu_c": "seq_bn"}, Fuse("fu_a", "fu_b", "fu_c"), "sentiment",
                 2, True, "Fuse(fu_a, fu_b, fu_c), dynamic fusion, with a head 'sentiment' in its own folder"),
    }


def fresh_model():
    import adapters

    model = adapters.BertAdapterModel.from_pretrained(MODEL_DIR, attn_implementation="eager")
    model.config._name_or_path = rel(MODEL_DIR)
    return model


def build(members: dict[str, str], setup, head: str, labels: int, case: str):
    from adapters.composition import Fuse

    model = fresh_model()
    for name, config in members.items():
        model.add_adapter(name, config=config)
    if isinstance(setup, Fuse):
        model.add_adapter_fusion(setup, config="dynamic")
    model.add_classification_head(head, num_labels=labels)
    params = [p for n, p in model.named_parameters() if not n.startswith("bert.") or "adapter" in n or "lora" in n]
    if perturb_(params, seed_for("perturb_setup_" + case)) == 0:
        raise RuntimeError(f"{case}: nothing to perturb")
    model.set_active_adapters(setup)
    model.active_head = head
    return model.eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def main() -> None:
    import adapters
    import transformers
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if not MODEL_DIR.exists():
        raise SystemExit("run scripts/make_fixtures.py first (it builds tests/fixtures/models/)")
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "io").mkdir(parents=True)
    inputs = make_inputs("bert", transformers.AutoConfig.from_pretrained(MODEL_DIR).pad_token_id)
    cases = []
    for case, (members, setup, head, labels, safetensors, note) in _cases().items():
        torch.manual_seed(seed_for("init_setup_" + case))
        model = build(members, setup, head, labels, case)
        expected = logits(model, inputs)
        folder = OUT / case
        model.save_adapter_setup(str(folder), setup, head_setup=head, use_safetensors=safetensors)
        again = fresh_model().eval()
        again.load_adapter_setup(str(folder), set_active=True, use_safetensors=safetensors)
        reloaded = (logits(again, inputs) - expected).abs().max().item()
        io = OUT / "io" / f"{case}.safetensors"
        save_file({**{k: v.contiguous() for k, v in inputs.items()}, "expected": expected.contiguous()}, str(io))
        cases.append({"name": case, "dir": rel(folder), "setup": setup.to_dict(), "head_setup": head,
                      "members": members, "io": rel(io), "output": "logits", "note": note,
                      "adapterhub_reload_max_diff": reloaded})
    manifest = {
        "generator": "scripts/make_setup_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "adapters": adapters.__version__},
        "model_dir": rel(MODEL_DIR),
        "attn_implementation": "eager",
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{len(cases)} setups; {total / 1e6:.2f} MB under {rel(OUT)}")


if __name__ == "__main__":
    main()
