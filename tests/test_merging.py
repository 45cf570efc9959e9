"""Merging adapters: every combination type equals PEFT's ``add_weighted_adapter`` on the same LoRA
adapters (fixtures made by PEFT itself: scripts/make_merge_fixtures.py), TIES / DARE on other
methods follow their formulas, and merges that have no meaning are refused before anything changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModel

import adaptercli
from adaptercli import merging
from adaptercli.errors import AdapterError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "merging"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
MERGED = load_file(FIXTURES / "merged.safetensors")


def _with_sources():
    model = adaptercli.init(AutoModel.from_pretrained(ROOT / "tests/fixtures/models/bert").eval())
    for name in ("a", "b", "c"):
        model.load_adapter(FIXTURES / "sources" / name, load_as=name)
    return model


# PEFT's "linear" is the weighted sum (task arithmetic); ours keeps AdapterHub's meaning of "linear".
OUR_NAME = {"linear": "task_arithmetic"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_merge_equals_peft_add_weighted_adapter(case: dict) -> None:
    model = _with_sources()
    model.average_adapter("m", case["sources"], weights=case["weights"], normalize_weights=False,
                          combine_strategy=OUR_NAME.get(case["strategy"], case["strategy"]), svd_rank=case["svd_rank"], density=case["density"],
                          majority_sign_method=case["majority_sign_method"], seed=case["seed"])
    state = model.adapter_state
    ours = {k.replace(".loras.m.", "/"): v for k, v in state.adapter_parameters("m").items()}
    theirs = {k.removeprefix(f"{case['name']}/"): v for k, v in MERGED.items() if k.startswith(f"{case['name']}/")}
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    scaling = state.adapters["m"].config.scaling
    for key in ours:
        if key.endswith("lora_A"):
            module = key.removesuffix("/lora_A")
            ours_delta = scaling * ours[f"{module}/lora_B"] @ ours[key]
            theirs_delta = theirs[f"{module}/lora_B"] @ theirs[key]  # PEFT's merged adapter has scaling 1
            assert torch.allclose(ours_delta, theirs_delta, atol=1e-5), key
            if not case["strategy"].endswith("svd"):  # SVD factors are equal up to sign; their products above
                assert torch.allclose(ours[key], theirs[key], atol=1e-5), key
                assert torch.allclose(scaling * ours[f"{module}/lora_B"], theirs[f"{module}/lora_B"], atol=1e-5), key


def test_dare_masks_follow_the_seed_and_keep_the_expected_value() -> None:
    model = _with_sources()
    for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        model.average_adapter(name, ["a", "b"], weights=[0.5, 0.5], combine_strategy="dare_linear", density=0.5,
                              seed=seed)
    state = model.adapter_state

    def weights(name):
        return torch.cat([v.flatten() for v in state.adapter_parameters(name).values()])
    assert torch.equal(weights("s1"), weights("s1_again")) and not torch.equal(weights("s1"), weights("s2"))
    t = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    pruned = merging.prune_at_random(t, 0.3, torch.Generator().manual_seed(1))
    assert abs((pruned != 0).float().mean().item() - 0.3) < 0.01 and abs(pruned.mean() - t.mean()) < 0.02


def test_ties_on_bottleneck_adapters_follows_its_formula(perturb) -> None:
    model = adaptercli.init(tiny_model("bert"))
    for i, name in enumerate(("x", "y", "z")):
        model.add_adapter(name, "seq_bn")
        perturb(model, name, seed=i)
    model.average_adapter("t", ["x", "y", "z"], weights=[1.0, 2.0, -1.0], normalize_weights=False,
                          combine_strategy="ties", density=0.5)
    state = model.adapter_state
    for key, value in state.adapter_parameters("t").items():
        stacked = torch.stack([state.adapter_parameters(n)[key.replace(".t.", f".{n}.")] for n in "xyz"])
        # by hand: keep each source's top half by magnitude, elect the sign of the sum, average the agreeing
        kept = torch.stack([s * (s.abs() >= s.abs().flatten().kthvalue(s.numel() - s.numel() // 2 + 1).values)
                            if s.numel() > 1 else s for s in stacked])
        elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
        agree = kept.sign() == elected
        weighted = kept * torch.tensor([1.0, 2.0, -1.0]).view(-1, *[1] * (kept.dim() - 1))
        expected = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
        assert torch.allclose(value, expected, atol=1e-6), key


@pytest.mark.parametrize("kwargs, message", [
    ({"adapter_list": ["a", "bn"]}, "mix methods"),
    ({"adapter_list": ["a", "b"], "combine_strategy": "average_of_signs"}, "combine_strategy must be one of"),
    ({"adapter_list": ["a", "b"], "combine_strategy": "ties"}, r"needs a density in \(0, 1\]"),
    ({"adapter_list": ["a", "b"], "combine_strategy": "dare_ties", "density": 1.5}, r"density in \(0, 1\]"),
    ({"adapter_list": ["a", "b"], "combine_strategy": "dare_linear", "density": 0}, r"density in \(0, 1\]"),
    ({"adapter_list": ["a", "c"], "combine_strategy": "ties", "density": 0.5}, "same config"),
    ({"adapter_list": ["bn", "bn2"], "combine_strategy": "cat"}, "works with LoRA adapters"),
    ({"adapter_list": ["a", "b"], "combine_strategy": "ties", "density": 0.5, "majority_sign_method": "most"},
     "total or frequency"),
])
def test_meaningless_merges_are_refused_before_anything_changes(kwargs: dict, message: str) -> None:
    model = _with_sources()
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("bn2", "seq_bn")
    before = set(model.adapter_state.adapters)
    with pytest.raises(AdapterError, match=message):
        model.average_adapter("m", **kwargs)
    assert set(model.adapter_state.adapters) == before


def test_adapters_from_different_base_models_are_refused(tmp_path: Path) -> None:
    model = _with_sources()
    model.adapter_state.adapters["b"].base_model = "some-org/another-model"
    with pytest.raises(AdapterError, match="different base models"):
        model.average_adapter("m", ["a", "b"], combine_strategy="task_arithmetic")


def _saved(folder: Path, model_dir: Path, spec: str, seed: int, head: bool) -> Path:
    model = adaptercli.AutoAdapterModel.from_pretrained(model_dir)
    model.add_adapter("x", spec)
    if head:
        model.add_classification_head("x", num_labels=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.adapter_state.adapter_parameters("x").values(), *model.heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.save_adapter(folder, "x", with_head=head)
    return folder


def test_adapter_merge_writes_the_merge_average_adapter_makes(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adaptercli.cli import app

    a = _saved(tmp_path / "a", tiny_bert_dir, "lora[r=4]", 1, head=True)
    b = _saved(tmp_path / "b", tiny_bert_dir, "lora[r=4,alpha=16]", 2, head=False)
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--strategy", "ties", "--density", "0.5",
                                      "--weights", "0.6,0.4", "--no-normalize", "--seed", "3", "--head-from", "1",
                                      "--dest", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    assert merged.load_adapter(tmp_path / "m") == "merged"
    reference = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    reference.load_adapter(a, load_as="a")
    reference.load_adapter(b, load_as="b", with_head=False)
    reference.average_adapter("r", ["a", "b"], weights=[0.6, 0.4], normalize_weights=False, combine_strategy="ties",
                              density=0.5, seed=3)
    ours = merged.adapter_state.adapter_parameters("merged")
    for key, value in reference.adapter_state.adapter_parameters("r").items():
        assert torch.equal(ours[key.replace(".r.", ".merged.")], value), key
    for (_, p), (_, q) in zip(merged.heads["merged"].named_parameters(), reference.heads["a"].named_parameters(),
                              strict=True):
        assert torch.equal(p, q)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    merged.set_active_adapters("merged")
    merged.eval()
    with torch.no_grad():
        assert merged(input_ids=ids).logits.shape == (2, 2)
    exported = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--to", "peft", "--dest", str(tmp_path / "p")])
    assert exported.exit_code == 0, exported.output


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "ties", "--density", "1.5"], r"density in \(0, 1\]"),
    (["--strategy", "mean_of_everything"], "combine_strategy must be one of"),
    (["--weights", "1,x"], "--weights: expected comma-separated numbers"),
    (["--weights", "1,2,3"], "--weights: 3 weights for 2 adapters"),
])
def test_adapter_merge_refuses_bad_input_in_one_line(extra: list[str], message: str, tiny_bert_dir: Path,
                                                      tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adaptercli.cli import app

    a = _saved(tmp_path / "a", tiny_bert_dir, "lora[r=4]", 1, head=False)
    b = _saved(tmp_path / "b", tiny_bert_dir, "lora[r=4]", 2, head=False)
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--dest", str(tmp_path / "m"), *extra])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output) and not (tmp_path / "m").exists()


def test_adapter_merge_refuses_mixed_methods_and_base_models(tiny_bert_dir: Path, tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adaptercli.cli import app

    lora = _saved(tmp_path / "lora", tiny_bert_dir, "lora[r=4]", 1, head=False)
    bottleneck = _saved(tmp_path / "bn", tiny_bert_dir, "seq_bn", 2, head=False)
    other_model = _saved(tmp_path / "llama", tiny_llama_dir, "lora[r=4]", 3, head=False)
    for pair, message in (((lora, bottleneck), "mix methods"), ((lora, other_model), "different base models")):
        result = CliRunner().invoke(app, ["merge", *map(str, pair), "--dest", str(tmp_path / "m")])
        assert result.exit_code == 1 and message in result.output and not (tmp_path / "m").exists(), result.output


def test_dora_merges_every_weight_its_magnitude_included(perturb) -> None:
    """DoRA is not merged as plain LoRA (A and B apart): each of its weights, the magnitude vector
    too, is combined by the strategy."""
    model = adaptercli.init(tiny_model("bert"))
    for i, name in enumerate(("x", "y")):
        model.add_adapter(name, "dora")
        perturb(model, name, seed=i)
    model.average_adapter("t", ["x", "y"], weights=[0.7, 0.3], normalize_weights=False,
                          combine_strategy="magnitude_prune", density=0.5)
    state = model.adapter_state
    merged = state.adapter_parameters("t")
    assert any(key.endswith(".m.weight") for key in merged)  # DoRA's magnitude vectors are among them
    for key, value in merged.items():
        sources = [state.adapter_parameters(n)[key.replace(".t.", f".{n}.")] for n in ("x", "y")]
        expected = merging.combine(sources, [0.7, 0.3], "magnitude_prune", density=0.5)
        assert torch.equal(value, expected), key
