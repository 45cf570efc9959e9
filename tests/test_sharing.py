"""Sharing adapters: model cards, `adapter export --to native|hub|peft|adapterhub|merged`, loading
by Hub id (and by AdapterHub-style ids through an index), and `adapter hub add|search|show`.

Push and pull run against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py: olah for
the read API, our write layer in front), through the real `huggingface_hub` client over HTTP.
`huggingface_hub` reads HF_ENDPOINT at import, so everything that talks to the server runs the CLI
or Python as a subprocess. (PEFT and `adapters` themselves load the exports in
scripts/check_exports.py, in a throw-away venv.)"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, write_recipe
from hub_server import HubServer, find_olah
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)
from typer.testing import CliRunner

import adaptercli
from adaptercli.cli import app
from adaptercli.export import base_model_id

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
runner = CliRunner()
OFFLINE = {"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
BASE = "google/bert_uncased_L-2_H-128_A-2"  # the Hub id the tiny test model stands in for
TEXTS = ["great movie number 7", "awful movie number 3 , really"]


def read_metadata(text: str) -> dict:
    """The YAML front matter of a model card ({} when it has none)."""
    if not text.startswith("---"):
        return {}
    data = yaml.safe_load(text[3:].partition("\n---")[0])
    return data if isinstance(data, dict) else {}

# Runs steps in a fresh process (which reads HF_ENDPOINT): load an adapter by name into a base
# model and record its logits (or the error), search an index, or edit a file. Prints the results.
STEPS = """
import json, sys, torch, adaptercli
from pathlib import Path
from transformers import AutoTokenizer
from adaptercli.hub import pinned
from adaptercli.index import descriptors, open_index, search
results = []
for step in json.loads(sys.argv[1]):
    if step["op"] == "replace":
        path = Path(step["path"])
        path.write_text(path.read_text().replace(step["old"], step["new"]))
        continue
    if step["op"] == "search":
        results.append([d.id for d in search(descriptors(open_index(step["index"])), **step["filters"])])
        continue
    model = adaptercli.AutoAdapterModel.from_pretrained(step["base"])
    try:
        getattr(model, step.get("fn", "load_adapter"))(step["source"], set_active=True, **step.get("kwargs", {}))
    except adaptercli.errors.AdapterCliError as error:
        results.append({"error": str(error)})
        continue
    model.eval()  # after loading: the head it adds starts in training mode
    if "texts" in step:
        inputs = AutoTokenizer.from_pretrained(step["base"])(step["texts"], padding=True, return_tensors="pt")
    else:
        inputs = {"input_ids": torch.tensor(step["ids"])}
    with torch.no_grad():
        results.append({"logits": model(**inputs).logits.tolist(), "pinned": pinned(step["source"])})
print(json.dumps(results))
"""


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptercli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def logits_of(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir: Path, sentiment_csv: Path) -> Path:
    """A finished LoRA run (classification head, best checkpoint by accuracy)."""
    folder = tmp_path_factory.mktemp("lora")
    recipe = write_recipe(folder, tiny_bert_dir, sentiment_csv, method="lora", config={"r": 4, "alpha": 8},
                          name="senti", metric_for_best="accuracy")
    result = runner.invoke(app, ["train", str(recipe)], env=OFFLINE)
    assert result.exit_code == 0, result.output
    return folder / "run"


@pytest.fixture(scope="module")
def expected(run: Path) -> torch.Tensor:
    from adaptercli.runs import load_run

    _, model, tokenizer, _ = load_run(run)
    return logits_of(model, tokenizer)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if find_olah() is None:
        pytest.fail("olah-cli not found: `make install` creates .venv-hub/ with olah (the test Hub server)")
    with HubServer(tmp_path_factory.mktemp("hub"), token=f"hf_{secrets.token_hex(16)}") as server:
        yield server


@pytest.fixture(scope="module")
def hub_env(hub, tmp_path_factory) -> dict[str, str]:
    """The environment of a process that talks to the test Hub with its token (own cache, no login file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path_factory.mktemp("hf")),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_COLOR": "1", "COLUMNS": "200"}


def run_steps(env: dict, *steps: dict) -> list:
    result = subprocess.run([sys.executable, "-c", STEPS, json.dumps(steps, default=str)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def load(base: Path, source: str, fn: str = "load_adapter", **kwargs) -> dict:
    return {"op": "load", "base": str(base), "source": source, "fn": fn, "kwargs": kwargs, "texts": TEXTS}


def best_eval(run: Path) -> dict:
    """The evaluation of the checkpoint in adapter/ (the first best accuracy, as training keeps it)."""
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return next(e for e in evals if e["accuracy"] == max(x["accuracy"] for x in evals))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- cards and folder exports -------------------------------------------------------------------

def test_native_export_has_a_card_with_the_runs_metadata(run: Path, tmp_path: Path, tiny_bert_dir: Path,
                                                         expected: torch.Tensor) -> None:
    dest = tmp_path / "native"
    result = runner.invoke(app, ["export", str(run), "--to", "native", "--dest", str(dest), "--base-model", BASE,
                                 "--task", "sentiment", "--dataset", "movies"], env=OFFLINE)
    assert result.exit_code == 0, result.output
    card = (dest / "README.md").read_text()
    meta = read_metadata(card)
    assert meta["base_model"] == BASE and meta["library_name"] == "adaptercli" and meta["license"] == "apache-2.0"
    assert {"lora", "task:sentiment", "dataset:movies"} <= set(meta["tags"])
    best = best_eval(run)  # what adapter/ holds
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported["accuracy"] == round(best["accuracy"], 4) and meta["pipeline_tag"] == "text-classification"
    assert "model.load_adapter(" in card and "## Recipe" in card and "metric_for_best: accuracy" in card
    for text in [card, *(p.read_text() for p in dest.glob("*.json"))]:  # portable: no local path anywhere
        assert str(tiny_bert_dir) not in text and str(run.parent) not in text
    assert json.loads((dest / "adapter_config.json").read_text())["model_name"] == BASE

    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    model.load_adapter(dest, set_active=True)
    model.eval()
    assert torch.allclose(logits_of(model, AutoTokenizer.from_pretrained(tiny_bert_dir)), expected, atol=1e-6)


def test_offline_short_names_are_recorded_by_their_hub_ids(tmp_path: Path) -> None:
    from adaptercli.assets import resolve_model_path

    installed = resolve_model_path("minilm")
    assert base_model_id("minilm") == base_model_id(installed) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("bert-base-uncased") == "bert-base-uncased" and base_model_id(str(tmp_path)) is None
    # An adapter saved from the installed MiniLM records the package's folder; its PEFT export names the Hub id.
    model = adaptercli.init(tiny_model("bert"))
    model.add_adapter("a", "lora")
    model.save_adapter(tmp_path / "a", "a")
    meta = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(json.dumps({**meta, "model_name": installed}))
    result = runner.invoke(app, ["export", str(tmp_path / "a"), "--to", "peft", "--dest", str(tmp_path / "p")],
                           env=OFFLINE)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "p/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert read_metadata((tmp_path / "p/README.md").read_text())["base_model"] == config["base_model_name_or_path"]


def test_peft_export_with_its_head_is_a_sequence_classification_model(run: Path, tmp_path: Path,
                                                                      tiny_bert_dir: Path, expected) -> None:
    """PEFT's own loading, done by hand on transformers 5: LoRA deltas into the task model's
    weights, modules_to_save over its pooler and classifier (PEFT itself: scripts/check_exports.py)."""
    dest = tmp_path / "peft"
    assert runner.invoke(app, ["export", str(run), "--to", "peft", "--dest", str(dest)], env=OFFLINE).exit_code == 0
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier", "pooler"] and config["base_model_name_or_path"] is None
    weights = load_file(dest / "adapter_model.safetensors")
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    scaling = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}"
            if f"{key}.lora_A.weight" in weights:
                assert any(name == t or name.endswith("." + t) for t in config["target_modules"])
                module.weight += scaling * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
        for key, value in weights.items():
            if "lora_" not in key and key.startswith("base_model.model.bert.") or key.startswith("base_model.model.classifier"):
                model.get_parameter(key.removeprefix("base_model.model.")).copy_(value)
            elif "lora_" not in key:  # the bare backbone's copy of the task model's pooler (PEFT on the backbone)
                assert torch.equal(value, weights[key.replace("base_model.model.", "base_model.model.bert.", 1)])
    assert torch.allclose(logits_of(model, AutoTokenizer.from_pretrained(tiny_bert_dir)), expected, atol=1e-5)
    assert "AutoModelForSequenceClassification" in (dest / "README.md").read_text()


def test_ia3_and_lora_peft_exports_load_back(tmp_path: Path, perturb) -> None:
    for spec in ("ia3", "lora[r=4,alpha=8,use_rslora=true]"):
        model = adaptercli.init(tiny_model("gpt2"))  # IA3 on GPT-2's fused c_attn: only k and v scaled
        model.add_adapter("a", spec if spec == "ia3" else spec.replace("]", ",target_modules=[c_attn,c_fc]]"))
        perturb(model, "a", scale=0.3)
        model.set_active_adapters("a")
        ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state
        model.save_adapter(tmp_path / spec, "a")
        result = runner.invoke(app, ["export", str(tmp_path / spec), "--to", "peft", "--dest", str(tmp_path / f"{spec}-peft")],
                               env=OFFLINE)
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / f"{spec}-peft/adapter_config.json").read_text())
        assert config["peft_type"] == ("IA3" if spec == "ia3" else "LORA") and config["fan_in_fan_out"] is True
        fresh = adaptercli.init(tiny_model("gpt2"))
        fresh.load_adapter(tmp_path / f"{spec}-peft", set_active=True)
        with torch.no_grad():
            assert torch.allclose(fresh(input_ids=ids).last_hidden_state, want, atol=1e-5)


def test_adapterhub_export_is_adapters_layout_and_loads_back(run: Path, tmp_path: Path, tiny_bert_dir: Path,
                                                            expected) -> None:
    dest = tmp_path / "ah"
    assert runner.invoke(app, ["export", str(run), "--to", "adapterhub", "--dest", str(dest)], env=OFFLINE).exit_code == 0
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["version"] == "adapters.1.3.0" and config["model_class"] == "BertAdapterModel"
    assert config["config"]["architecture"] == "lora" and "target_modules" not in config["config"]
    pickled = torch.load(dest / "pytorch_adapter.bin", weights_only=True)  # what `adapters` reads by default
    safe = load_file(dest / "adapter.safetensors")
    assert set(pickled) == set(safe) and all(k.startswith("bert.encoder.") for k in safe)
    assert all(torch.equal(pickled[k], safe[k]) for k in safe)
    head = json.loads((dest / "head_config.json").read_text())
    assert head["config"]["head_type"] == "classification" and head["config"]["label2id"] == {"neg": 0, "pos": 1}
    assert set(torch.load(dest / "pytorch_model_head.bin", weights_only=True)) == {
        "heads.senti.1.weight", "heads.senti.1.bias", "heads.senti.4.weight", "heads.senti.4.bias"}
    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    model.load_adapter(dest, set_active=True)
    model.eval()
    assert torch.allclose(logits_of(model, AutoTokenizer.from_pretrained(tiny_bert_dir)), expected, atol=1e-6)


def test_merged_export_gives_the_same_logits_with_the_bare_models_weights(run: Path, tmp_path: Path,
                                                                          tiny_bert_dir: Path, expected) -> None:
    dest = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(run), "--to", "merged", "--dest", str(dest), "--base-model", BASE],
                           env=OFFLINE)
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(dest).eval()  # plain transformers
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert torch.allclose(logits_of(merged, tokenizer), expected, atol=1e-5)
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    # No inference overhead: exactly the parameters of the bare task model, and no hooks anywhere.
    bare = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in bare.state_dict().items()}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert not any("lora" in k for k in load_file(dest / "model.safetensors"))
    config = (dest / "config.json").read_text()
    assert str(tiny_bert_dir) not in config and read_metadata((dest / "README.md").read_text())["base_model"] == BASE


def test_exports_that_cannot_convert_say_what_can(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    model = adaptercli.AdapterModel(AutoModel.from_pretrained(tiny_bert_dir))
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("o", "lora[attn_matrices=[q,o]]")
    model.save_adapter(tmp_path / "bn", "bn")
    model.save_adapter(tmp_path / "o", "o")
    write_recipe(tmp_path / "bnrun", tiny_bert_dir, sentiment_csv, name="bn")  # a run folder around the seq_bn
    model.save_adapter(tmp_path / "bnrun/run/adapter", "bn")
    (tmp_path / "bnrun/run/recipe.yaml").write_text((tmp_path / "bnrun/recipe.yaml").read_text())
    for source, to, message in [
        (tmp_path / "bn", "peft", "PEFT folders hold LoRA and IA3 adapters only (export it --to native, hub or adapterhub)"),
        (tmp_path / "o", "adapterhub", "AdapterHub 1.3.0 does not place (export it --to peft or native)"),
        (tmp_path / "bnrun/run", "merged", "only LoRA and IA3 merge into the weights"),
        (tmp_path / "bn", "merged", "give the run folder"),
    ]:
        result = runner.invoke(app, ["export", str(source), "--to", to, "--dest", str(tmp_path / f"out-{to}")], env=OFFLINE)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_folder_exports_never_write_into_the_run_or_outside_dest(run: Path, tmp_path: Path) -> None:
    before = files_under(run)
    for to in ("adapterhub", "merged", "native"):
        for dest in (run / "adapter", run / "best" / "x", run):
            result = runner.invoke(app, ["export", str(run), "--to", to, "--dest", str(dest)], env=OFFLINE)
            assert result.exit_code == 1 and "--dest:" in result.output
    dest = tmp_path / "out"
    assert runner.invoke(app, ["export", str(run), "--to", "adapterhub", "--dest", str(dest)], env=OFFLINE).exit_code == 0
    assert files_under(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- the Hub: push, pull by id, tokens ----------------------------------------------------------

def test_push_then_load_by_id_with_the_cards_metadata(run: Path, hub: HubServer, hub_env: dict, tiny_bert_dir: Path,
                                                      expected: torch.Tensor) -> None:
    from huggingface_hub import HfApi

    pushed = cli("export", str(run), "--to", "hub", "--dest", "tester/senti", "--base-model", BASE, "--task", "sentiment",
                 env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed commit" in pushed.stdout and hub.token not in pushed.stdout + pushed.stderr
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    info = api.model_info("tester/senti")
    assert info.card_data.base_model == BASE and info.card_data.library_name == "adaptercli"
    assert "task:sentiment" in info.card_data.tags
    accuracy = next(r.metric_value for r in info.card_data.eval_results if r.metric_type == "accuracy")
    assert accuracy == round(best_eval(run)["accuracy"], 4)
    assert {s.rfilename for s in info.siblings} >= {"README.md", "adapter.safetensors", "adapter_config.json",
                                                    "head.safetensors", "head_config.json"}

    # AdapterHub's own repositories (the `adapters` layout: pytorch_adapter.bin + head) load like folders.
    folder = FIXTURES / "adapters/bert_seq_bn_head"
    api.create_repo("AdapterHub/bert-tiny-pf-seq-bn")
    api.upload_folder(folder_path=str(folder), repo_id="AdapterHub/bert-tiny-pf-seq-bn")
    reference = adaptercli.AutoAdapterModel.from_pretrained(FIXTURES / "models/bert")
    reference.load_adapter(folder, set_active=True)
    with torch.no_grad():
        want = reference.eval()(input_ids=torch.tensor([[5, 6, 7, 8]])).logits

    ours, theirs, missing = run_steps(
        hub_env, load(tiny_bert_dir, "tester/senti"),
        {"op": "load", "base": FIXTURES / "models/bert", "source": "AdapterHub/bert-tiny-pf-seq-bn", "ids": [[5, 6, 7, 8]]},
        load(tiny_bert_dir, "tester/no-such-adapter"))
    assert torch.allclose(torch.tensor(ours["logits"]), expected, atol=1e-6)
    assert ours["pinned"] == f"tester/senti@{info.sha}"
    assert torch.allclose(torch.tensor(theirs["logits"]), want, atol=1e-6)
    assert "adapter 'tester/no-such-adapter': repository not found on http://127.0.0.1" in missing["error"]


def test_a_wrong_token_is_refused_and_never_echoed(run: Path, hub_env: dict) -> None:
    wrong = f"hf_{secrets.token_hex(16)}"
    result = cli("export", str(run), "--to", "hub", "--dest", "tester/other", env={**hub_env, "HF_TOKEN": wrong})
    assert result.returncode == 1
    assert "the Hub refused the token (401 Unauthorized)" in result.stderr and "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_dry_run_lists_the_files_and_pushes_nothing(run: Path, hub: HubServer) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    result = runner.invoke(app, ["export", str(run), "--to", "hub", "--dest", "tester/dry", "--dry-run"], env=OFFLINE)
    assert result.exit_code == 0, result.output
    for name in ("README.md", "adapter.safetensors", "adapter_config.json", "head_config.json", "head.safetensors"):
        assert name in result.output
    assert "nothing was pushed" in result.output
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=hub.token).model_info("tester/dry")


def test_private_branch_push_pinned_and_loaded_again_offline(run: Path, hub: HubServer, hub_env: dict,
                                                             tiny_bert_dir: Path, expected) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    pushed = cli("export", str(run), "--to", "hub", "--dest", "tester/private", "--private", "--revision", "v1",
                 "--commit-message", "first version", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    assert "adapter.safetensors" in api.list_repo_files("tester/private", revision="v1")
    assert "adapter.safetensors" not in api.list_repo_files("tester/private")  # main is untouched
    v1 = next(b for b in api.list_repo_refs("tester/private").branches if b.name == "v1").target_commit
    assert hub.git(hub.repo_path("models", "tester/private"), "log", "-1", "--format=%s", "v1") == "first version"
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("tester/private")

    (loaded,) = run_steps(hub_env, load(tiny_bert_dir, "tester/private", revision="v1"))
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-6)
    assert loaded["pinned"] == f"tester/private@{v1}"  # what a run folder records (below)
    (again,) = run_steps({**hub_env, "HF_HUB_OFFLINE": "1"}, load(tiny_bert_dir, f"tester/private@{v1}"))
    assert torch.allclose(torch.tensor(again["logits"]), expected, atol=1e-6)


def test_a_run_records_the_commit_of_the_hub_adapters_it_loaded(tmp_path: Path, monkeypatch) -> None:
    from adaptercli import hub
    from adaptercli.recipe import load_recipe
    from adaptercli.runs import with_absolute_paths

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: minilm}\nadapter: {name: top, method: seq_bn, load: org/base}\n"
                      "composition: {type: stack, adapters: [org/lang, org/other@v2]}\n"
                      "data: {source: rotten_tomatoes}\noutput_dir: out\n")
    monkeypatch.setattr(hub, "_PINNED", {"org/lang": "org/lang@" + "a" * 40, "org/base": "org/base@" + "b" * 40})
    saved = with_absolute_paths(load_recipe(recipe))
    assert saved.composition.adapters == ["org/lang@" + "a" * 40, "org/other@v2"]  # not downloaded: as written
    assert saved.adapter.load == "org/base@" + "b" * 40


# -- the index ------------------------------------------------------------------------------------

def test_hub_add_search_show_and_load_by_task_dataset_org(run: Path, tmp_path: Path, tiny_bert_dir: Path,
                                                          expected) -> None:
    index = tmp_path / "index"
    added = runner.invoke(app, ["hub", "add", str(run), "--index", str(index), "--task", "sentiment", "--dataset",
                                "movies", "--org", "me", "--base-model", BASE], env=OFFLINE)
    assert added.exit_code == 0, added.output
    found = runner.invoke(app, ["hub", "search", "--index", str(index), "--task", "sentiment"], env=OFFLINE)
    assert found.exit_code == 0 and "sentiment/movies@me" in found.output and "lora" in found.output
    assert runner.invoke(app, ["hub", "search", "--index", str(index), "--task", "nli"], env=OFFLINE).exit_code == 1
    for option, value in (("--model", "bert"), ("--method", "lora"), ("--dataset", "movies")):
        assert "sentiment/movies@me" in runner.invoke(app, ["hub", "search", "--index", str(index), option, value],
                                                         env=OFFLINE).output
    shown = runner.invoke(app, ["hub", "show", "sentiment/movies@me", "--index", str(index)], env=OFFLINE)
    assert shown.exit_code == 0 and BASE in shown.output and "sha256: adapter.safetensors" in shown.output

    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    model.load_adapter("sentiment/movies@me", index=index, set_active=True)
    model.eval()
    assert torch.allclose(logits_of(model, AutoTokenizer.from_pretrained(tiny_bert_dir)), expected, atol=1e-6)

    # The index as a git repository: cloned, then read the same way.
    subprocess.run(["git", "init", "-q", str(index)], check=True)
    subprocess.run(["git", "-C", str(index), "add", "."], check=True)
    subprocess.run(["git", "-C", str(index), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"],
                   check=True)
    env = {**OFFLINE, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cloned = runner.invoke(app, ["hub", "search", "--index", f"file://{index}", "--task", "sentiment"], env=env)
    assert cloned.exit_code == 0 and "sentiment/movies@me" in cloned.output

    # Files that do not match their recorded sha256 are refused.
    weights = next(index.rglob("adapter.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(adaptercli.errors.AdapterCliError, match="sha256 .* the index records .* refusing to load it"):
        model.load_adapter("sentiment/movies@me", index=index, load_as="again")


def test_index_entries_on_the_hub_are_checked_against_their_sha256(run: Path, hub: HubServer, hub_env: dict,
                                                                   tmp_path: Path, tiny_bert_dir: Path, expected) -> None:
    from huggingface_hub import HfApi

    index = tmp_path / "index"
    pushed = cli("export", str(run), "--to", "hub", "--dest", "tester/indexed", "--index", str(index), "--task",
                 "sentiment", "--dataset", "movies", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    descriptor = next(index.rglob("*.yaml"))
    assert "repo: tester/indexed" in descriptor.read_text()
    api = HfApi(endpoint=hub.endpoint, token=hub.token)  # the index itself shared as a Hub data set repository
    api.create_repo("tester/adapter-index", repo_type="dataset")
    api.upload_folder(folder_path=str(index), repo_id="tester/adapter-index", repo_type="dataset")
    digest = descriptor.read_text().split("adapter.safetensors: ")[1].split()[0]
    found, loaded, refused = run_steps(
        hub_env,
        {"op": "search", "index": "hf:datasets/tester/adapter-index", "filters": {"task": "sentiment"}},
        load(tiny_bert_dir, "sentiment/movies@tester", index="hf:datasets/tester/adapter-index"),
        {"op": "replace", "path": descriptor, "old": digest, "new": "0" * 64},  # the local copy of the index
        load(tiny_bert_dir, "sentiment/movies@tester", index=str(index)))
    assert found == ["sentiment/movies@tester"]
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-6)
    assert "adapter.safetensors has sha256" in refused["error"] and "refusing to load it" in refused["error"]


def composed_run(root: Path, kind: str, tiny_bert_dir: Path, sentiment_csv: Path, perturb) -> tuple[Path, torch.Tensor]:
    """A finished run folder of a ``fuse`` (fusion 'target' over members alpha and beta) or ``stack``
    (alpha and beta under the run's adapter 'target') composition, written as training writes it, and
    the logits of its model."""
    model = adaptercli.AdapterModel(AutoModel.from_pretrained(tiny_bert_dir))
    for member in ("alpha", "beta"):
        model.add_adapter(member, "seq_bn")
        perturb(model, member)
        model.save_adapter(root / member, member)
    if kind == "fuse":
        model.add_adapter_fusion(["alpha", "beta"], name="target")
        trained = list(model.adapter_state.fusion_parameters("target").values())
        setup = adaptercli.Fuse("alpha", "beta", name="target")
    else:
        model.add_adapter("target", "lora[r=4]")
        trained = list(model.adapter_state.adapter_parameters("target").values())
        setup = adaptercli.Stack("alpha", "beta", "target")
    model.add_classification_head("target", num_labels=2)
    with torch.no_grad():
        for p in trained + list(model.heads.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    if kind == "fuse":
        model.save_adapter_fusion(root / "run/adapter", "target", with_head=True)
    else:
        model.save_adapter(root / "run/adapter", "target")
    recipe = write_recipe(root, tiny_bert_dir, sentiment_csv, name="target", method="lora", config={"r": 4},
                          composition={"type": kind, "adapters": [str(root / "alpha"), str(root / "beta")]})
    (root / "run/recipe.yaml").write_text(recipe.read_text())
    model.set_active_adapters(setup)
    return root / "run", logits_of(model.eval(), AutoTokenizer.from_pretrained(tiny_bert_dir))


@pytest.mark.parametrize("kind, setup", [("fuse", "Fuse('alpha', 'beta', name='target')"),
                                         ("stack", "Stack('alpha', 'beta', 'target')")])
def test_a_fusion_or_stack_run_exports_as_one_setup_folder(kind: str, setup: str, tmp_path: Path, tiny_bert_dir: Path,
                                                           sentiment_csv: Path, perturb) -> None:
    run, want = composed_run(tmp_path, kind, tiny_bert_dir, sentiment_csv, perturb)
    dest = tmp_path / "shared"
    result = runner.invoke(app, ["export", str(run), "--to", "native", "--dest", str(dest)], env=OFFLINE)
    assert result.exit_code == 0, result.output
    saved = json.loads((dest / "adapter_setup.json").read_text())
    assert repr(adaptercli.composition.CompositionBlock.from_dict(saved["adapter_setup"])) == setup
    assert saved["head_setup"] == "target" and (dest / "target/head_config.json").is_file()
    assert (dest / "alpha/adapter.safetensors").is_file() and (dest / "beta/adapter_config.json").is_file()
    card = (dest / "README.md").read_text()
    assert 'load_adapter_setup("path/to/this/folder")' in card and "adapter-setup" in read_metadata(card)["tags"]
    fresh = adaptercli.AdapterModel(AutoModel.from_pretrained(tiny_bert_dir)).eval()
    fresh.load_adapter_setup(dest)  # one call: members, fusion, head, the setup made active
    assert torch.allclose(logits_of(fresh, AutoTokenizer.from_pretrained(tiny_bert_dir)), want, atol=1e-6)
    refused = runner.invoke(app, ["export", str(run), "--to", "peft", "--dest", str(tmp_path / "p")], env=OFFLINE)
    assert kind == "stack" or refused.exit_code == 1 and "fusions export --to native or hub" in refused.output
    unindexed = runner.invoke(app, ["export", str(run), "--to", "hub", "--dest", "tester/x", "--index",
                                    str(tmp_path / "index")], env=OFFLINE)  # refused before anything is pushed
    assert unindexed.exit_code == 1 and "an adapter setup cannot be indexed yet" in unindexed.output


def test_a_fusion_run_pushed_to_the_hub_loads_by_id_in_one_call(tmp_path: Path, hub: HubServer, hub_env: dict,
                                                                 tiny_bert_dir: Path, sentiment_csv: Path,
                                                                 perturb) -> None:
    from huggingface_hub import HfApi

    run, want = composed_run(tmp_path, "fuse", tiny_bert_dir, sentiment_csv, perturb)
    pushed = cli("export", str(run), "--to", "hub", "--dest", "tester/fused", "--base-model", BASE, env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    files = set(HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files("tester/fused"))
    assert {"adapter_setup.json", "alpha/adapter.safetensors", "beta/adapter.safetensors",
            "target/adapter_fusion.safetensors", "target/head.safetensors", "README.md"} <= files
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("tester/alpha")
    api.upload_folder(folder_path=str(tmp_path / "alpha"), repo_id="tester/alpha")
    by_id, at_main, single = run_steps(
        hub_env, load(tiny_bert_dir, "tester/fused", fn="load_adapter_setup"),
        load(tiny_bert_dir, "tester/fused@main", fn="load_adapter_setup"),
        load(tiny_bert_dir, "tester/alpha", fn="load_adapter_setup"))
    assert torch.allclose(torch.tensor(by_id["logits"]), want, atol=1e-6)
    assert torch.allclose(torch.tensor(at_main["logits"]), want, atol=1e-6)
    assert "not an adapter setup folder (no adapter_setup.json) (it holds one adapter" in single["error"]

    # a setup saved in Python (here AdapterHub's) pushed as it is: by id, the logits of the folder
    pushed = cli("export", str(FIXTURES / "setups/stack"), "--to", "hub", "--dest", "tester/stacked", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    ids = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    reference = adaptercli.AutoAdapterModel.from_pretrained(FIXTURES / "models/bert").eval()
    reference.load_adapter_setup(FIXTURES / "setups/stack")
    with torch.no_grad():
        folder_logits = reference(input_ids=torch.tensor(ids)).logits
    (stacked,) = run_steps(hub_env, {"op": "load", "base": FIXTURES / "models/bert", "source": "tester/stacked",
                                     "fn": "load_adapter_setup", "ids": ids})
    assert torch.allclose(torch.tensor(stacked["logits"]), folder_logits, atol=1e-6)


def test_a_setup_folder_exports_as_it_is_and_loads_again(tmp_path: Path) -> None:
    """An AdapterHub 1.3 setup folder (tests/fixtures/setups) exports with a card and still gives
    AdapterHub's logits (atol 1e-5); the targets that hold one adapter refuse it in one line."""
    io = load_file(FIXTURES / "setups/io/fuse.safetensors")
    dest = tmp_path / "shared"
    result = runner.invoke(app, ["export", str(FIXTURES / "setups/fuse"), "--to", "native", "--dest", str(dest),
                                 "--base-model", BASE], env=OFFLINE)
    assert result.exit_code == 0, result.output
    card = (dest / "README.md").read_text()
    assert "Fuse('fu_a', 'fu_b', 'fu_c')" in card and read_metadata(card)["base_model"] == BASE
    assert json.loads((dest / "fu_a/adapter_config.json").read_text())["model_name"] == BASE
    model = adaptercli.AutoAdapterModel.from_pretrained(FIXTURES / "models/bert").eval()
    model.load_adapter_setup(dest)
    with torch.no_grad():
        got = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits
    assert torch.allclose(got, io["expected"], atol=1e-5)
    refused = runner.invoke(app, ["export", str(FIXTURES / "setups/fuse"), "--to", "peft", "--dest", str(tmp_path / "p")],
                            env=OFFLINE)
    assert refused.exit_code == 1 and "is an adapter setup; setups export --to native or hub" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def _peft_wraps(names: list[str], config: dict) -> set[str]:
    """The modules PEFT wraps (peft.tuners.tuners_utils.check_target_module_exists): target_modules
    as a regex (a string) or as names a module equals or ends with; then layers_to_transform."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        chosen = {n for n in names if re.fullmatch(targets, n)}
    else:
        chosen = {n for n in names if n in targets or any(n.endswith(f".{t}") for t in targets)}
    if config.get("layers_to_transform") is not None:
        chosen = {n for n in chosen if (m := re.match(r".*\.[^.]*\.(\d+)\.", n))
                  and int(m.group(1)) in config["layers_to_transform"]}
    return chosen


@pytest.mark.parametrize("spec, targets, layers", [
    ("lora[r=4]", ["query", "value"], None),
    ("lora[r=4,leave_out=[0]]", ["query", "value"], [1]),
    # "dense" also names the pooler's layer, which no layer index reaches: the layers exclude it
    ("lora[r=4,attn_matrices=[q,k,v,o],intermediate_lora=true,output_lora=true]", ["dense", "key", "query", "value"],
     [0, 1]),
])
def test_peft_export_targets_module_names_that_fit_the_task_model_and_the_bare_backbone(
        spec: str, targets: list[str], layers: list[int] | None, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """PEFT writes module names (``query``, ``value``) and ``layers_to_transform`` when only some
    layers are adapted, so the folder loads on the task model and on the bare backbone alike."""
    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_bert_dir)
    model.add_adapter("a", spec)
    model.add_classification_head("a", num_labels=2)
    model.save_adapter(tmp_path / "a", "a")
    dest = tmp_path / "p"
    assert runner.invoke(app, ["export", str(tmp_path / "a"), "--to", "peft", "--dest", str(dest)], env=OFFLINE).exit_code == 0
    config = json.loads((dest / "adapter_config.json").read_text())
    written = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for k in load_file(dest / "adapter_model.safetensors") if k.endswith(".lora_A.weight")}
    adapted = {k for k in written if k.startswith("bert.")}  # the task model's names, and the backbone's copies:
    assert written - adapted == {a.removeprefix("bert.") for a in adapted}
    assert (config["target_modules"], config["layers_to_transform"]) == (targets, layers)
    task_model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert _peft_wraps([n for n, _ in task_model.named_modules()], config) == adapted
    bare = {a.removeprefix("bert.") for a in adapted}
    assert _peft_wraps([n for n, _ in AutoModel.from_pretrained(tiny_bert_dir).named_modules()], config) == bare
