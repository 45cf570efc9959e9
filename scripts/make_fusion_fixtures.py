"""Generate reference fixtures for composition blocks and AdapterFusion with AdapterHub ``adapters``.

Like ``scripts/make_fixtures.py`` (same throw-away venv, same tiny BERT from
``tests/fixtures/models/bert``, same inputs), but for several adapters at once: it writes only
under ``tests/fixtures/composition/`` and leaves the single-adapter fixtures alone. Run it after
``make_fixtures.py`` has built the models::

    /tmp/refvenv/bin/python scripts/make_fusion_fixtures.py

Versions used for the committed fixtures: torch 2.13.0+cpu, transformers 4.57.6, adapters 1.3.0
(recorded in ``tests/fixtures/composition/manifest.json``).

What it writes (deterministic, fixed seeds):

* ``adapters/<name>/``: the member adapters, each perturbed away from its init and saved with
  ``save_adapter``: ``bn_a``, ``bn_b``, ``bn_c`` (seq_bn), ``lora_a``, ``lora_b`` (lora, q and v),
  ``pre_a``, ``pre_b`` (prefix tuning, 5 positions, a 16-wide MLP to keep files small).
* ``fusion/fuse_dynamic/``: ``Fuse(bn_a, bn_b, bn_c)`` with the "dynamic" config, its fusion
  weights perturbed, saved with ``save_adapter_fusion`` (``adapter_fusion_config.json`` +
  ``pytorch_model_adapter_fusion.bin``) from a bare ``BertModel`` (keys without a model prefix).
* ``fusion/fuse_static_head/``: ``Fuse(bn_a, bn_b)`` with the "static" config, saved from a
  ``BertAdapterModel`` (keys with the ``bert.`` prefix) with a 3-label classification head named
  like the fusion (``save_adapter_fusion(..., with_head=True)``).
* ``io/<case>.safetensors``: ``input_ids``, ``attention_mask``, ``expected``; fusion cases also hold
  ``fusion_attention`` [layers, batch, tokens, members], the softmax AdapterHub reports with
  ``output_adapter_fusion_attentions=True`` (FFN site).
* ``io/alone.safetensors``: ``expected_<name>``: each adapter alone (what Parallel / BatchSplit rows
  should equal; each Parallel / BatchSplit case records ``max_diff_to_alone``).
* ``manifest.json``: each case's composition as AdapterHub's ``to_dict()``, its members, folders
  and what it checks; plus the library versions.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_fixtures import load_base, make_inputs, perturb_, rel, seed_for  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "composition"
MODEL_DIR = REPO / "tests" / "fixtures" / "models" / "bert"

ADAPTERS = {
    "bn_a": "seq_bn",
    "bn_b": "seq_bn",
    "bn_c": "seq_bn",
    "lora_a": "lora",
    "lora_b": "lora",
    "pre_a": "prefix_tuning[prefix_length=5,bottleneck_size=16]",
    "pre_b": "prefix_tuning[prefix_length=3,bottleneck_size=16]",
}


def _cases():
    from adapters.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack

    return {
        # name: (setup, what the case checks)
        "stack_seq_bn": (Stack("bn_a", "bn_b"), "Stack of two seq_bn adapters"),
        "stack_seq_bn_lora": (Stack("bn_a", "lora_a"), "Stack of a seq_bn and a LoRA adapter"),
        "stack_prefix": (Stack("pre_a", "pre_b"), "Stack of two prefix tunings (prefixes joined)"),
        "fuse_dynamic": (Fuse("bn_a", "bn_b", "bn_c"), "Fuse with the dynamic config, weights from save_adapter_fusion"),
        "stack_fuse": (Stack(Fuse("bn_a", "bn_b", "bn_c"), "lora_b"), "a fusion followed by a LoRA adapter"),
        "parallel_seq_bn": (Parallel("bn_a", "bn_b"), "Parallel: the batch replicated, one copy per adapter"),
        "parallel_lora": (Parallel("lora_a", "lora_b"), "Parallel of LoRA adapters"),
        "parallel_prefix": (Parallel("pre_a", "pre_b"), "Parallel of prefix tunings of different lengths"),
        "batchsplit_seq_bn": (BatchSplit("bn_a", "bn_b", batch_sizes=[1, 1]), "BatchSplit by rows"),
        "batchsplit_lora": (BatchSplit("lora_a", "lora_b", batch_sizes=[1, 1]), "BatchSplit of LoRA adapters"),
        "average_seq_bn": (Average("bn_a", "bn_b", weights=[0.7, 0.3]), "Average of bottleneck outputs"),
        "average_lora": (Average("lora_a", "lora_b", weights=[0.6, 0.4]), "Average of LoRA deltas"),
        "split_seq_bn": (Split("bn_a", "bn_b", splits=[4, 6]), "Split by sequence position (4 + 6 tokens)"),
    }


def build_model():
    import adapters

    model = load_base("bert")
    adapters.init(model)
    for name, config in ADAPTERS.items():
        torch.manual_seed(seed_for("init_" + name))
        method, _, rest = config.partition("[")
        kwargs = dict(item.split("=") for item in rest.rstrip("]").split(",")) if rest else {}
        if method == "prefix_tuning":
            from adapters import PrefixTuningConfig

            cfg = PrefixTuningConfig(**{k: int(v) for k, v in kwargs.items()})
        else:
            cfg = method
        model.add_adapter(name, config=cfg)
        params = [p for n, p in model.named_parameters() if f".{name}." in n]
        if not params or perturb_(params, seed_for("perturb_" + name)) == 0:
            raise RuntimeError(f"{name}: no parameters")
    model.add_adapter_fusion(["bn_a", "bn_b", "bn_c"], config="dynamic")
    fusion = [p for n, p in model.named_parameters() if "adapter_fusion_layer.bn_a,bn_b,bn_c." in n]
    perturb_(fusion, seed_for("perturb_fusion_dynamic"))
    return model.eval()


def fusion_attention(out, name: str) -> torch.Tensor:
    """[layers, batch, tokens, members] from AdapterHub's nested dict (FFN site only)."""
    per_layer = out.adapter_fusion_attentions[name]
    return torch.stack([torch.as_tensor(per_layer[i]["output_adapter"]) for i in sorted(per_layer)])


def save_io(name: str, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    path = OUT / "io" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return rel(path)


def static_head_case(inputs) -> dict:
    """Fuse(bn_a, bn_b), static config, in a BertAdapterModel with a head named like the fusion."""
    import adapters

    torch.manual_seed(seed_for("static_head"))
    model = adapters.BertAdapterModel.from_pretrained(MODEL_DIR, attn_implementation="eager")
    model.config._name_or_path = rel(MODEL_DIR)
    for name in ("bn_a", "bn_b"):
        model.load_adapter(str(OUT / "adapters" / name), use_safetensors=True)
    model.add_adapter_fusion(["bn_a", "bn_b"], config="static")
    model.add_classification_head("bn_a,bn_b", num_labels=3)
    params = [p for n, p in model.named_parameters() if "bn_a,bn_b" in n]
    perturb_(params, seed_for("perturb_static_head"))
    from adapters.composition import Fuse

    setup = Fuse("bn_a", "bn_b")
    model.set_active_adapters(setup)
    model.active_head = "bn_a,bn_b"
    model.eval()
    with torch.no_grad():
        out = model(**inputs, output_adapter_fusion_attentions=True)
    folder = OUT / "fusion" / "fuse_static_head"
    model.save_adapter_fusion(str(folder), setup, with_head=True)
    io = save_io("fuse_static_head", {**inputs, "expected": out.logits,
                                      "fusion_attention": fusion_attention(out, "bn_a,bn_b")})
    return {"name": "fuse_static_head", "status": "ok", "setup": setup.to_dict(), "members": ["bn_a", "bn_b"],
            "fusion_dir": rel(folder), "io": io, "output": "logits",
            "note": "Fuse(bn_a, bn_b), static fusion config, BertAdapterModel (bert. key prefix), 3-label head "
                    "'bn_a,bn_b' saved with_head=True; fusion and head weights perturbed"}


def main() -> None:
    import adapters
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if not MODEL_DIR.exists():
        raise SystemExit("run scripts/make_fixtures.py first (it builds tests/fixtures/models/)")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    model = build_model()
    for folder in ("adapters", "fusion"):
        (OUT / folder).mkdir()  # AdapterHub's save_* do not create parent folders
    for name in ADAPTERS:
        model.save_adapter(str(OUT / "adapters" / name), name, use_safetensors=not name.startswith("pre_"))
    model.save_adapter_fusion(str(OUT / "fusion" / "fuse_dynamic"), ["bn_a", "bn_b", "bn_c"])

    inputs = make_inputs("bert", model.config.pad_token_id)
    with torch.no_grad():
        bare = load_base("bert")(**inputs).last_hidden_state
    cases = []
    for case, (setup, note) in _cases().items():
        model.set_active_adapters(setup)
        try:
            with torch.no_grad():
                out = model(**inputs, output_adapter_fusion_attentions=True)
        except Exception as exc:  # recorded in the manifest, never faked
            note = f"adapters {adapters.__version__} fails: {type(exc).__name__}: {str(exc)[:200]}"
            print(f"SKIP {case}: {note}", file=sys.stderr)
            cases.append({"name": case, "setup": setup.to_dict(), "status": "skipped", "note": note})
            continue
        expected = out.last_hidden_state
        tensors = {**inputs, "expected": expected, "bare": bare}
        if case in ("fuse_dynamic", "stack_fuse"):
            tensors["fusion_attention"] = fusion_attention(out, "bn_a,bn_b,bn_c")
        rows = expected.shape[0] // bare.shape[0]
        diff = (expected - bare.repeat(rows, 1, 1)).abs().max().item()
        if not diff > 1e-3:
            raise RuntimeError(f"{case}: the composition has no visible effect ({diff:.2e})")
        cases.append({"name": case, "status": "ok", "setup": setup.to_dict(), "members": sorted(setup.flatten()),
                      "fusion_dir": rel(OUT / "fusion" / "fuse_dynamic") if "fuse" in case else None,
                      "io": save_io(case, tensors), "output": "last_hidden_state",
                      "note": f"{note}; output rows {expected.shape[0]}; max|expected-bare|={diff:.4g}"})
    cases.append(static_head_case(inputs))

    # Each adapter alone: what Parallel / BatchSplit rows should equal. The manifest records how
    # far AdapterHub's own Parallel / BatchSplit rows are from these.
    alone = {}
    for name in ADAPTERS:
        model.set_active_adapters(name)
        with torch.no_grad():
            alone[name] = model(**inputs).last_hidden_state
    save_io("alone", {**inputs, **{f"expected_{n}": out for n, out in alone.items()}})
    keep = inputs["attention_mask"].bool()
    for case in cases:
        kind = case["setup"]["type"]
        if case["status"] != "ok" or kind not in ("Parallel", "BatchSplit"):
            continue
        from safetensors.torch import load_file

        expected = load_file(str(REPO / case["io"]))["expected"]
        members = [c["children"][0] for c in case["setup"]["children"]]
        if kind == "Parallel":
            want = torch.cat([alone[n] for n in members])
            mask = keep.repeat(len(members), 1)
        else:
            sizes = case["setup"]["kwargs"]["batch_sizes"]
            starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            want = torch.cat([alone[n][starts[i]:starts[i + 1]] for i, n in enumerate(members)])
            mask = keep
        case["max_diff_to_alone"] = (expected - want)[mask].abs().max().item()

    manifest = {
        "generator": "scripts/make_fusion_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "adapters": adapters.__version__},
        "model_dir": rel(MODEL_DIR),
        "adapters": {name: {"config": config, "dir": rel(OUT / "adapters" / name)} for name, config in ADAPTERS.items()},
        "attn_implementation": "eager",
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    ok = sum(c["status"] == "ok" for c in cases)
    print(f"{ok}/{len(cases)} cases ok; {total / 1e6:.2f} MB under {rel(OUT)}")


if __name__ == "__main__":
    main()
