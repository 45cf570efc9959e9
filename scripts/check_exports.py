"""Check `adapter export --to peft` and `--to adapterhub` in the libraries they are for.

Two halves, one file:

* ``--make DIR`` (run by the project's own ``.venv/bin/python``): on the tiny reference models in
  ``tests/fixtures/models/`` and the real all-MiniLM-L6-v2 (the installed ``minilm``), add each case's adapter and head with adaptercli, move every weight
  away from its initial value, save it, export it with `adaptercli.export` to a PEFT folder and an
  AdapterHub folder (or record why that export refuses it), and save the inputs, our output with
  the adapter active and the bare model's output.
* the check (run by a throw-away venv with the reference libraries): load each PEFT folder with
  ``peft.PeftModel.from_pretrained`` on the matching transformers task model, and each AdapterHub
  folder with ``adapters`` ``AutoAdapterModel.load_adapter`` (its default pickle and, again, with
  ``use_safetensors=True``), and compare their outputs with ours on the real (unpadded) tokens.

How to run (from the repository root)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # the local CPU wheel; never an unpinned torch
    /tmp/refvenv/bin/pip install transformers==4.57.6 adapters==1.3.0 peft==0.18.1
    /tmp/refvenv/bin/python scripts/check_exports.py [--out result.json]

The check starts the ``--make`` half itself with ``.venv/bin/python`` (or $ADAPTERCLI_PYTHON) in a
temporary folder, then prints one line per case and exits non-zero if any output differs by more
than 1e-4 or an export that should work does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
ATOL = 1e-4

# case: (model, method config, head: None or {type, num_labels, layers, activation, bias})
CLS2 = {"type": "classification", "num_labels": 3, "layers": 2, "activation": "tanh", "bias": True}
CASES = {
    "bert_lora_cls": ("bert", "lora[r=8,alpha=16]", CLS2),
    "bert_ia3_cls": ("bert", "ia3", CLS2),
    "bert_lora_rslora": ("bert", "lora[r=4,alpha=8,use_rslora=true]", None),
    "bert_lora_regression": ("bert", "lora[attn_matrices=[q,k,v],intermediate_lora=true]",
                             {**CLS2, "type": "regression", "num_labels": 1}),
    "roberta_lora_cls": ("roberta", "lora", CLS2),
    "distilbert_lora_cls_relu": ("distilbert", "lora", {**CLS2, "activation": "relu"}),
    "gpt2_ia3": ("gpt2", "ia3", None),
    "gpt2_lora_target_modules_score": ("gpt2", "lora[target_modules=[c_attn,c_proj]]",
                                       {**CLS2, "layers": 1, "bias": False}),
    "llama_lora_score": ("llama", "lora[attn_matrices=[q,k,v],output_lora=true]", {**CLS2, "layers": 1, "bias": False}),
    "bert_lora_attn_output": ("bert", "lora[attn_matrices=[q,o]]", None),
    "llama_ia3": ("llama", "ia3", None),
    # IA3 as PEFT configures it by default: the FFN's down projection scaled at its input
    "bert_ia3_feedforward_cls": ("bert", "ia3[target_modules=[key,value,output.dense],feedforward_modules=[output.dense]]",
                                 CLS2),
    "llama_ia3_feedforward": ("llama", "ia3[target_modules=[k_proj,v_proj,down_proj],feedforward_modules=[down_proj]]",
                              None),
    "gpt2_ia3_feedforward": ("gpt2", "ia3[target_modules=[c_attn,mlp.c_proj],feedforward_modules=[mlp.c_proj]]", None),
    # DoRA as PEFT computes it (the bias left out of the renormalisation)
    "bert_dora_peft_cls": ("bert", "dora[dora_norm=peft]", CLS2),
    "llama_dora_peft": ("llama", "dora[dora_norm=peft,attn_matrices=[q,k,v],output_lora=true]", None),
    # per-layer ranks and alphas (PEFT's rank_pattern / alpha_pattern)
    "bert_lora_patterns_cls": ("bert", {"method": "lora", "r": 4, "attn_matrices": ["q", "k", "v"],
                                        "rank_pattern": {"key": 2, "layer.1.attention.self.query": 6},
                                        "alpha_pattern": {"value": 16}}, CLS2),
    "bert_seq_bn_cls": ("bert", "seq_bn", CLS2),
    "bert_seq_bn_inv": ("bert", "seq_bn_inv", None),
    "bert_double_seq_bn_tagging": ("bert", "double_seq_bn", {**CLS2, "type": "tagging", "layers": 1}),
    "bert_par_bn_multilabel": ("bert", "par_bn", {**CLS2, "type": "multilabel_classification"}),
    "bert_prefix_tuning": ("bert", "prefix_tuning[prefix_length=5,bottleneck_size=16]", None),
    "llama_prefix_tuning": ("llama", "prefix_tuning[prefix_length=5,bottleneck_size=16]", None),
    "gpt2_seq_bn": ("gpt2", "seq_bn", None),
    "minilm_lora_cls": ("minilm", "lora[r=8,alpha=16]", {**CLS2, "num_labels": 2}),  # the real all-MiniLM-L6-v2
    "minilm_seq_bn_cls": ("minilm", "seq_bn", {**CLS2, "num_labels": 2}),
}


def _inputs(vocab: int = 100, pad: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens; the second right-padded over its last 3 (pad id 0 nowhere else)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, -3:], mask[1, -3:] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


def _output(out) -> torch.Tensor:
    for field in ("logits", "last_hidden_state", "hidden_states"):
        value = getattr(out, field, None)
        if value is not None:
            return value
    return out[0]


# -- the adaptercli half ------------------------------------------------------------------------

def make(folder: Path) -> None:
    from transformers import AutoModel

    import adaptercli
    from adaptercli.assets import resolve_model_path
    from adaptercli.export import export, open_source
    from adaptercli.heads import HeadConfig

    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for case, (arch, config, head) in CASES.items():
        torch.manual_seed(0)
        model_dir = Path(resolve_model_path("minilm")) if arch == "minilm" else MODELS / arch
        model = adaptercli.AdapterModel(AutoModel.from_pretrained(model_dir, attn_implementation="eager")).eval()
        model.add_adapter(case, config)
        if head:
            labels = {f"label_{i}": i for i in range(head["num_labels"])} if head["type"] != "regression" else None
            model.add_head(case, HeadConfig(head["type"], head["num_labels"], head["layers"], head["activation"],
                                            labels, bias=head["bias"]))
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in [*model.adapter_state.adapter_parameters(case).values(), *model._head_parameters(case).values()]:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        io = _inputs()
        model.eval()  # the head was added after eval(): no dropout
        model.set_active_adapters(case)
        with torch.no_grad():
            expected = _output(model(**io))
            model.set_active_adapters(None)
            bare = model.base_model(**io).last_hidden_state
            bare = model.heads[case].predict(bare, io["attention_mask"], None)[1] if head else bare
        torch.save({**io, "expected": expected, "bare": bare}, folder / f"{case}.pt")
        model.save_adapter(folder / case / "native", case)
        source = open_source(folder / case / "native", base_model=None if arch == "minilm" else f"tests/fixtures/models/{arch}")
        entry = {"case": case, "model_dir": str(model_dir), "model_type": model.config.model_type, "config": config,
                 "head": head}
        for target in ("peft", "adapterhub"):
            try:
                export(source, target, str(folder / case / target))
                written = json.loads((folder / case / target / "adapter_config.json").read_text())
                entry[target] = {"dir": str(folder / case / target), "config": written}
            except Exception as error:  # a refusal is a result too: recorded, and shown by the check
                entry[target] = {"refused": str(error)}
        manifest.append(entry)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


# -- the reference-library half -----------------------------------------------------------------

def _close(actual: torch.Tensor, io: dict) -> tuple[float, float]:
    """(max |ours - theirs|, max |ours - bare|) on real tokens (sequence outputs: every row)."""
    expected, bare, mask = io["expected"], io["bare"], io["attention_mask"].bool()
    if expected.dim() == 3:
        return (actual - expected)[mask].abs().max().item(), (bare - expected)[mask].abs().max().item()
    return (actual - expected).abs().max().item(), (bare - expected).abs().max().item()


def _peft_output(entry: dict, io: dict) -> torch.Tensor:
    import transformers
    from peft import PeftModel

    config = entry["peft"]["config"]
    head = entry["head"]
    kwargs = {"attn_implementation": "eager"}
    auto = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}.get(
        config["task_type"] or "", "AutoModel")
    if auto != "AutoModel":
        kwargs["num_labels"] = head["num_labels"]
        if entry["model_type"] == "gpt2":  # it has no pad token; the sequence head needs one to find the last token
            kwargs["pad_token_id"] = 0
        if head["type"] == "regression":
            kwargs["problem_type"] = "regression"
    base = getattr(transformers, auto).from_pretrained(entry["model_dir"], **kwargs)
    model = PeftModel.from_pretrained(base, entry["peft"]["dir"]).eval()
    with torch.no_grad():
        return _output(model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]))


def _adapters_output(entry: dict, io: dict, use_safetensors: bool) -> torch.Tensor:
    from adapters import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(entry["model_dir"], attn_implementation="eager")
    name = model.load_adapter(entry["adapterhub"]["dir"], set_active=True, use_safetensors=use_safetensors)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
    if entry["head"] is not None:
        assert name in model.heads, f"head {name} not loaded"
    return _output(out)


def _cell(label: str, value: str | dict) -> str:
    if isinstance(value, str):
        return f"{label}: refused"
    if "error" in value:
        return f"{label}: FAIL ({value['error'][:100]})"
    return f"{label}: {'ok' if value['ok'] else 'FAIL'} {value['max_abs_diff']:.1e}"


def check(folder: Path) -> list[dict]:
    import adapters
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {adapters.__version__}, "
          f"peft {peft.__version__}")
    results = []
    for entry in json.loads((folder / "manifest.json").read_text()):
        io = torch.load(folder / f"{entry['case']}.pt", weights_only=True)
        row = {"case": entry["case"]}
        checks = [("peft", _peft_output, ()), ("adapterhub", _adapters_output, (False,)),
                  ("adapterhub_safetensors", _adapters_output, (True,))]
        for label, load, extra in checks:
            target = label.split("_")[0]
            if "refused" in entry[target]:
                row[label] = f"refused: {entry[target]['refused']}"
                continue
            try:
                diff, effect = _close(load(entry, io, *extra), io)
                ok = diff <= ATOL and effect > 1e-3
                row[label] = {"max_abs_diff": diff, "adapter_effect": effect, "ok": ok}
            except Exception as error:  # report every case, then fail
                row[label] = {"error": f"{type(error).__name__}: {error}", "ok": False}
        results.append(row)
        cells = [_cell(label, row[label]) for label in ("peft", "adapterhub", "adapterhub_safetensors")]
        print(f"{entry['case']:<34} " + " | ".join(cells))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=Path, help="(adaptercli's venv) write the exports and outputs to this folder")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    if args.make:
        make(args.make)
        return 0
    ours = os.environ.get("ADAPTERCLI_PYTHON", str(ROOT / ".venv/bin/python"))
    with tempfile.TemporaryDirectory(prefix="check-exports-") as tmp:
        subprocess.run([ours, str(Path(__file__).resolve()), "--make", tmp], check=True, cwd=ROOT)
        results = check(Path(tmp))
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    refused = {m["case"]: {t: m[t]["refused"] for t in ("peft", "adapterhub") if "refused" in m[t]} for m in manifest}
    if args.out:
        args.out.write_text(json.dumps({"results": results, "refused": refused}, indent=2) + "\n")
    failed = [r["case"] for r in results for v in r.values() if isinstance(v, dict) and not v.get("ok")]
    print(f"{len(results)} cases; {'all exports that were written load with the same outputs' if not failed else 'FAILED: ' + ', '.join(sorted(set(failed)))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
