"""Check that one `adapter export --to peft` folder loads in PEFT itself on the task model AND on
the bare backbone, with our outputs (logits on the task model, hidden states on the backbone).

Two halves, one file:

* ``--make DIR`` (the project's ``.venv/bin/python``): on tests/fixtures/models/bert, a LoRA adapter
  (all layers; some layers; q, k, v, o and both FFN layers) with a classification head, its weights
  moved away from their start, saved, exported with ``adapter export --to peft``; our hidden states
  and logits saved beside it.
* the check (a throw-away venv with ``peft``; PEFT is never our dependency)::

      python3 -m venv /tmp/peftvenv && /tmp/peftvenv/bin/pip install torch==2.13.0
      /tmp/peftvenv/bin/pip install "transformers>=5,<6" peft
      /tmp/peftvenv/bin/python scripts/check_peft_backbone.py

  runs the ``--make`` half with .venv/bin/python in a temporary folder, loads each folder with
  ``PeftModel.from_pretrained`` on ``AutoModel`` and on ``AutoModelForSequenceClassification`` and
  prints the largest difference from our outputs; exits 1 above 1e-5.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "models" / "bert"
SPECS = ["lora[r=4]", "lora[r=4,leave_out=[0]]",
         "lora[r=4,attn_matrices=[q,k,v,o],intermediate_lora=true,output_lora=true]"]


def make(out: Path) -> None:
    from typer.testing import CliRunner

    import adaptercli
    from adaptercli.cli import app

    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    for i, spec in enumerate(SPECS):
        model = adaptercli.AutoAdapterModel.from_pretrained(MODEL)
        model.add_adapter("a", spec)
        model.add_classification_head("a", num_labels=2)
        with torch.no_grad():
            for p in model.adapter_state.adapter_parameters("a").values():
                p.normal_(0, 0.2)
        model.save_adapter(out / str(i) / "native", "a")
        result = CliRunner().invoke(app, ["export", str(out / str(i) / "native"), "--to", "peft",
                                          "--dest", str(out / str(i) / "peft")])
        assert result.exit_code == 0, result.output
        model.set_active_adapters("a")
        model.eval()
        with torch.no_grad():
            ours = {"hidden": model.base_model(input_ids=ids).last_hidden_state, "logits": model(input_ids=ids).logits}
        torch.save({"ids": ids, "spec": spec, **ours}, out / str(i) / "ours.pt")


def check() -> int:
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSequenceClassification

    worst = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        python = str(ROOT / ".venv" / "bin" / "python")
        subprocess.run([python, __file__, "--make", scratch], check=True, cwd=ROOT)
        for case in sorted(Path(scratch).iterdir()):
            ours = torch.load(case / "ours.pt", weights_only=True)
            bare = PeftModel.from_pretrained(AutoModel.from_pretrained(MODEL), case / "peft").eval()
            task = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2),
                                             case / "peft").eval()
            with torch.no_grad():
                on_bare = (bare(input_ids=ours["ids"]).last_hidden_state - ours["hidden"]).abs().max().item()
                on_task = (task(input_ids=ours["ids"]).logits - ours["logits"]).abs().max().item()
            print(f"{ours['spec']}: bare backbone {on_bare:.2e}, task model {on_task:.2e}")
            worst = max(worst, on_bare, on_task)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make", type=Path, help="write the exports and our outputs here (project venv)")
    args = parser.parse_args()
    if args.make:
        make(args.make)
    else:
        sys.exit(check())
