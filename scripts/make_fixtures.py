"""Generate reference fixtures with the real AdapterHub ``adapters`` and ``peft`` libraries.

The fixtures let our tests check adaptercli's re-implementation of the adapter methods on
transformers 5.x against the outputs of the original libraries. Neither library is a dependency
of adaptercli: this script runs in a throw-away virtual environment outside the repository, and
only this script and the small files it writes under ``tests/fixtures/`` are committed.

How to run (from the repository root)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # local CPU wheel; never an unpinned torch
    /tmp/refvenv/bin/pip install transformers==4.57.6 adapters==1.3.0 "peft==0.18.1"
    /tmp/refvenv/bin/python scripts/make_fixtures.py

Versions used to produce the committed fixtures: torch 2.13.0+cpu, transformers 4.57.6,
adapters 1.3.0, peft 0.18.1 (the exact versions are recorded in ``tests/fixtures/manifest.json``).
No network access is needed: every model is a tiny random fp32 model built from a config.

The script deletes ``tests/fixtures/`` and regenerates from scratch (fixed seeds, deterministic):

* ``models/<arch>/``: tiny base models (bert, roberta, distilbert, gpt2, llama) saved with
  ``save_pretrained(safe_serialization=True)``; the base model classes, so keys carry no prefix.
* ``adapters/<arch>_<method>/``: one adapter named ``ref`` per architecture and method (the
  default adapters configs ``seq_bn``, ``double_seq_bn``, ``par_bn``, ``seq_bn_inv``, ``lora``,
  ``ia3``, ``prefix_tuning``), with every adapter parameter perturbed away from its initial value,
  saved with ``save_adapter`` (LoRA cases as ``adapter.safetensors``, the rest as
  ``pytorch_adapter.bin``); plus ``bert_seq_bn_head`` (BertAdapterModel with a classification
  head, saved ``with_head=True``).
* ``peft/<case>/``: PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).
* ``io/<case>.safetensors``: ``input_ids``, ``attention_mask``, ``expected`` (output with the
  adapter active) and ``bare`` (same model with no adapter active).
* ``manifest.json``: the list of cases, their paths, status and the library versions.

Inputs are a batch of 2 sequences of length 10; the second row is right-padded over its last 3
tokens (``attention_mask`` 0 there and ``input_ids`` set to the model's pad id). Outputs at
padded positions are included in ``expected``/``bare``; tests may want to compare only where
``attention_mask`` is 1.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures"

ARCHS = ["bert", "roberta", "distilbert", "gpt2", "llama"]
METHODS = ["seq_bn", "double_seq_bn", "par_bn", "seq_bn_inv", "lora", "ia3", "prefix_tuning"]
SAFETENSORS_METHODS = {"lora"}  # saved with use_safetensors=True; the others as pytorch_adapter.bin

# Tiny sizes. hidden=32 keeps prefix tuning's default 512-wide reparametrisation MLP small
# (about 330 kB per architecture) so that all fixtures together stay under ~3 MB.
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
VOCAB = 100
MAX_POS = 64
BATCH, SEQ_LEN, N_PAD = 2, 10, 3
PERTURB = 0.05
MIN_DIFF = 1e-3  # expected and bare must differ by at least this much (max abs)

PEFT_CASES = {
    "peft_bert_lora": {
        "arch": "bert",
        "kwargs": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    },
    "peft_bert_rslora": {
        "arch": "bert",
        "kwargs": {
            "r": 4,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["query", "key", "value", "dense"],
        },
    },
    "peft_llama_lora_all": {
        "arch": "llama",
        "kwargs": {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
    },
    "peft_gpt2_lora": {
        "arch": "gpt2",
        "kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    },
}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def seed_for(name: str) -> int:
    """A stable per-case seed (Python's hash() is salted, so use a simple checksum)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def base_config(arch: str):
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, RobertaConfig

    if arch == "bert":
        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
    if arch == "roberta":
        # RoBERTa positions start at pad_token_id + 1, hence the two extra positions.
        return RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS + 2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            dropout=0.0,
            attention_dropout=0.0,
            qa_dropout=0.0,
            seq_classif_dropout=0.0,
            pad_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_positions=MAX_POS,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            attention_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    raise ValueError(arch)


def model_class(arch: str):
    from transformers import BertModel, DistilBertModel, GPT2Model, LlamaModel, RobertaModel

    return {
        "bert": BertModel,
        "roberta": RobertaModel,
        "distilbert": DistilBertModel,
        "gpt2": GPT2Model,
        "llama": LlamaModel,
    }[arch]


def set_name_or_path(model, arch: str) -> None:
    """Record the repo-relative model folder (not this machine's absolute path) in saved configs."""
    model.config._name_or_path = rel(OUT / "models" / arch)
    model.name_or_path = model.config._name_or_path


def load_base(arch: str):
    model = model_class(arch).from_pretrained(OUT / "models" / arch, attn_implementation="eager")
    set_name_or_path(model, arch)
    return model.eval()


def make_inputs(arch: str, pad_id: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    # Ids 3..VOCAB-1 never collide with the pad/bos/eos ids (0, 1, 2) of any tiny config.
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    attention_mask[1, SEQ_LEN - N_PAD :] = 0
    input_ids[1, SEQ_LEN - N_PAD :] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def perturb_(params, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in params:
            p.add_(PERTURB * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            n += 1
    return n


def save_io(name: str, inputs: dict[str, torch.Tensor], expected, bare, extra=None) -> Path:
    from safetensors.torch import save_file

    tensors = {
        "input_ids": inputs["input_ids"].contiguous(),
        "attention_mask": inputs["attention_mask"].contiguous(),
        "expected": expected.detach().float().contiguous(),
        "bare": bare.detach().float().contiguous(),
    }
    tensors.update({k: v.detach().float().contiguous() for k, v in (extra or {}).items()})
    path = OUT / "io" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def check_differs(name: str, expected, bare) -> float:
    diff = (expected - bare).abs().max().item()
    if not diff > MIN_DIFF:
        raise RuntimeError(f"{name}: adapter has no visible effect (max abs diff {diff:.2e})")
    return diff


def build_base_models() -> None:
    for arch in ARCHS:
        torch.manual_seed(seed_for("model_" + arch))
        cfg = base_config(arch)
        cfg._attn_implementation = "eager"
        model = model_class(arch)(cfg).eval()
        model.save_pretrained(OUT / "models" / arch, safe_serialization=True)


def adapters_case(arch: str, method: str) -> dict:
    import adapters

    name = f"{arch}_{method}"
    case = {
        "name": name,
        "source": "adapters",
        "arch": arch,
        "method": method,
        "model_dir": rel(OUT / "models" / arch),
        "adapter_dir": rel(OUT / "adapters" / name),
        "io": rel(OUT / "io" / f"{name}.safetensors"),
        "output": "last_hidden_state",
    }
    base = load_base(arch)
    inputs = make_inputs(arch, base.config.pad_token_id)
    with torch.no_grad():
        reference = base(**inputs).last_hidden_state
    try:
        model = load_base(arch)
        adapters.init(model)
        torch.manual_seed(seed_for("init_" + name))
        model.add_adapter("ref", config=method)
        params = [p for n, p in model.named_parameters() if ".ref." in n or n.endswith(".ref")]
        n_params = perturb_(params, seed_for("perturb_" + name))
        if n_params == 0:
            raise RuntimeError("no adapter parameters found")
        model.set_active_adapters("ref")
        model.eval()
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
            model.set_active_adapters(None)
            bare = model(**inputs).last_hidden_state
            model.set_active_adapters("ref")
        diff = check_differs(name, expected, bare)
        drift = (bare - reference).abs().max().item()
        if drift > 1e-5:
            raise RuntimeError(f"adapters.init changed the base output (max abs {drift:.2e})")
        out_dir = OUT / "adapters" / name
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        model.save_adapter(str(out_dir), "ref", use_safetensors=method in SAFETENSORS_METHODS)
    except Exception as exc:  # recorded in the manifest, never faked
        shutil.rmtree(OUT / "adapters" / name, ignore_errors=True)
        case.update(status="skipped", note=f"{type(exc).__name__}: {exc}", adapter_dir=None, io=None)
        print(f"SKIP {name}: {case['note']}", file=sys.stderr)
        return case
    save_io(name, inputs, expected, bare)
    case.update(
        status="ok",
        note=f"{n_params} adapter tensors perturbed; max|expected-bare|={diff:.4g}",
        files=sorted(p.name for p in out_dir.iterdir()),
    )
    return case


def head_case() -> dict:
    import adapters

    name = "bert_seq_bn_head"
    case = {
        "name": name,
        "source": "adapters",
        "arch": "bert",
        "method": "seq_bn",
        "model_dir": rel(OUT / "models" / "bert"),
        "adapter_dir": rel(OUT / "adapters" / name),
        "io": rel(OUT / "io" / f"{name}.safetensors"),
        "output": "logits",
    }
    # The backbone is loaded from models/bert (BertModel keys gain the "bert." prefix here);
    # only the head (absent from that checkpoint) is freshly initialised.
    torch.manual_seed(seed_for("head_" + name))
    model = adapters.BertAdapterModel.from_pretrained(OUT / "models" / "bert", attn_implementation="eager")
    set_name_or_path(model, "bert")
    model.add_adapter("ref", config="seq_bn")
    model.add_classification_head("ref", num_labels=3)
    params = [p for n, p in model.named_parameters() if ".ref." in n]
    n_params = perturb_(params, seed_for("perturb_" + name))
    model.set_active_adapters("ref")
    model.active_head = "ref"
    model.eval()
    inputs = make_inputs("bert", model.config.pad_token_id)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        expected = out.logits
        hidden = out.hidden_states[-1]
        model.set_active_adapters(None)
        bare_out = model(**inputs, head="ref", output_hidden_states=True)
        bare = bare_out.logits
        model.set_active_adapters("ref")
        model.active_head = "ref"
        backbone_drift = (load_base("bert")(**inputs).last_hidden_state - bare_out.hidden_states[-1]).abs()
    diff = check_differs(name, expected, bare)
    if backbone_drift.max().item() > 1e-5:
        raise RuntimeError(f"{name}: backbone differs from models/bert ({backbone_drift.max().item():.2e})")
    out_dir = OUT / "adapters" / name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(out_dir), "ref", with_head=True)
    save_io(name, inputs, expected, bare, extra={"expected_last_hidden_state": hidden})
    case.update(
        status="ok",
        note=(
            f"BertAdapterModel from models/bert + classification head 'ref' (3 labels), saved with_head=True; "
            f"{n_params} tensors perturbed; max|expected-bare|={diff:.4g}; bare = head on the un-adapted "
            f"backbone (identical to models/bert); classification on the first token's hidden state; "
            f"io also holds expected_last_hidden_state (backbone output with the adapter active)"
        ),
        files=sorted(p.name for p in out_dir.iterdir()),
    )
    return case


def peft_case(name: str, spec: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    arch = spec["arch"]
    case = {
        "name": name,
        "source": "peft",
        "arch": arch,
        "method": "lora",
        "model_dir": rel(OUT / "models" / arch),
        "adapter_dir": rel(OUT / "peft" / name),
        "io": rel(OUT / "io" / f"{name}.safetensors"),
        "output": "last_hidden_state",
    }
    base = load_base(arch)
    inputs = make_inputs(arch, base.config.pad_token_id)
    with torch.no_grad():
        bare = base(**inputs).last_hidden_state
    torch.manual_seed(seed_for("init_" + name))
    peft_model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **spec["kwargs"]))
    params = [p for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]
    n_params = perturb_(params, seed_for("perturb_" + name))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).last_hidden_state
    diff = check_differs(name, expected, bare)
    out_dir = OUT / "peft" / name
    peft_model.save_pretrained(str(out_dir))
    # peft keeps target_modules as a set, so its JSON order depends on hash salting: sort it for
    # reproducible files (format otherwise as peft writes it). Drop peft's boilerplate model card.
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "README.md").unlink(missing_ok=True)
    save_io(name, inputs, expected, bare)
    case.update(
        status="ok",
        note=f"LoraConfig({spec['kwargs']}); {n_params} lora tensors perturbed; max|expected-bare|={diff:.4g}",
        files=sorted(p.name for p in out_dir.iterdir()),
    )
    return case


def verify(case: dict) -> None:
    """Reload the saved files with the reference library and check they reproduce ``expected``."""
    from safetensors.torch import load_file

    io = load_file(str(REPO / case["io"]))
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    adapter_dir = str(REPO / case["adapter_dir"])
    if case["source"] == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(case["arch"]), adapter_dir).eval()
        with torch.no_grad():
            got = model(**inputs).last_hidden_state
    elif case["output"] == "logits":
        import adapters

        model = adapters.BertAdapterModel.from_pretrained(
            REPO / case["model_dir"], attn_implementation="eager"
        )
        name = model.load_adapter(adapter_dir, with_head=True)
        model.set_active_adapters(name)
        model.eval()
        with torch.no_grad():
            got = model(**inputs, head=name).logits
    else:
        import adapters

        model = load_base(case["arch"])
        adapters.init(model)
        name = model.load_adapter(adapter_dir, use_safetensors=case["method"] in SAFETENSORS_METHODS)
        model.set_active_adapters(name)
        model.eval()
        with torch.no_grad():
            got = model(**inputs).last_hidden_state
    err = (got - io["expected"]).abs().max().item()
    if err > 1e-5:
        raise RuntimeError(
            f"{case['name']}: reloaded adapter does not reproduce expected (max abs {err:.2e})"
        )


def main() -> None:
    import adapters
    import peft
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    build_base_models()
    cases = [adapters_case(arch, method) for arch in ARCHS for method in METHODS]
    cases.append(head_case())
    cases.extend(peft_case(name, spec) for name, spec in PEFT_CASES.items())
    for case in cases:
        case.setdefault("files", [])
        if case["status"] == "ok":
            verify(case)

    manifest = {
        "generator": "scripts/make_fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "adapters": adapters.__version__,
            "peft": peft.__version__,
        },
        "dtype": "float32",
        "attn_implementation": "eager",
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    ok = sum(c["status"] == "ok" for c in cases)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{ok}/{len(cases)} cases ok; {total / 1e6:.2f} MB under {rel(OUT)}")


if __name__ == "__main__":
    main()
