"""The plugin entry: a model outside the architecture table, described by its layout (in Python,
in a recipe's ``model.layout`` or by AdapterHub's adapter_interface.json), gets every method;
mistakes in a layout are reported key by key. (Outputs against AdapterHub's plugin interface:
tests/test_reference_architectures.py; every method on it: tests/test_support_matrix.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import batch, write_recipe
from rich.console import Console
from transformers import AutoConfig, AutoModel, OPTConfig, OPTModel

import adaptercli
from adaptercli import train as train_module
from adaptercli.architectures import LayoutError, architecture_for, layout_from_dict
from adaptercli.assets import resolve_model_path
from adaptercli.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
OPT_LAYOUT = yaml.safe_load((ROOT / "configs/layout/opt.yaml").read_text())["model"]["layout"]


def tiny_opt(**extra) -> OPTModel:
    torch.manual_seed(0)
    return OPTModel(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                              max_position_embeddings=64, word_embed_proj_dim=32, **extra)).eval()


def test_a_model_without_a_layout_is_refused_with_the_way_out() -> None:
    model = adaptercli.init(tiny_opt())
    with pytest.raises(adaptercli.AdapterCliError, match="model type 'opt' has no entry.*layout"):
        model.add_adapter("a", "seq_bn")


def test_layout_mistakes_are_reported_key_by_key() -> None:
    broken = {**OPT_LAYOUT, "ffn_ot": "fc2", "q": "self_attn.query"}
    del broken["ffn_out"]
    with pytest.raises(LayoutError) as err:
        layout_from_dict(broken)
    assert err.value.problems == ["ffn_ot: unknown layout key, did you mean ffn_out?", "ffn_out: required"]
    with pytest.raises(LayoutError, match=r"layout\.q: layer 0 of decoder.layers has no module 'self_attn.query', "
                                          r"did you mean self_attn.q_proj\?"):
        adaptercli.init(tiny_opt(), layout={**OPT_LAYOUT, "q": "self_attn.query"})
    with pytest.raises(LayoutError, match=r"layout\.layers: no list of layers at 'layers', did you mean decoder.layers"):
        adaptercli.init(tiny_opt(), layout={**OPT_LAYOUT, "layers": "layers"})


def test_registered_layout_serves_every_model_of_its_type() -> None:
    from adaptercli.architectures import _BY_TYPE

    config = AutoConfig.for_model("biogpt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    try:
        adaptercli.register_architecture({
            "layers": "layers", "embeddings": "embed_tokens", "attention": "self_attn", "causal": True,
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
            "ffn_in": "fc1", "ffn_out": "fc2",
            "attention_site": {"input": "self_attn_layer_norm", "output": "self_attn.out_proj"},
            "ffn_site": {"input": "final_layer_norm", "output": "fc2"},
        }, model_type="biogpt")
        assert architecture_for("biogpt") is not None
        model = adaptercli.init(AutoModel.from_config(config).eval())
        ids, mask = batch()
        with torch.no_grad():
            bare = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.add_adapter("a", "unipelt")
        model.set_active_adapters("a")
        with torch.no_grad():
            adapted = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (adapted - bare)[mask.bool()].abs().max() > 1e-6
    finally:
        _BY_TYPE.pop("biogpt", None)


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory) -> Path:
    """A saved tiny OPT with MiniLM's tokenizer (a stand-in: any tokenizer whose ids fit)."""
    folder = tmp_path_factory.mktemp("tiny-opt")
    tiny_opt_model = OPTModel(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                        vocab_size=30522, max_position_embeddings=64, word_embed_proj_dim=32,
                                        pad_token_id=0))
    tiny_opt_model.save_pretrained(folder)
    minilm = Path(resolve_model_path("minilm"))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    return folder


def test_recipe_with_a_layout_trains_and_reloads(tmp_path: Path, tiny_opt_dir: Path, sentiment_csv: Path) -> None:
    recipe_path = write_recipe(tmp_path, tiny_opt_dir, sentiment_csv, method="loreft", config={"r": 2},
                               max_steps=6, eval_steps=100, save_steps=100)
    body = yaml.safe_load(recipe_path.read_text())
    recipe_path.write_text(yaml.safe_dump({"defaults": ["layout/opt"], **body}, sort_keys=False))
    recipe = load_recipe(recipe_path)
    assert recipe.model.layout == OPT_LAYOUT
    final = train_module.train(recipe, console=Console(quiet=True))
    assert final["loss"] == final["loss"]
    model = adaptercli.AutoAdapterModel.from_pretrained(tiny_opt_dir, layout=recipe.model.layout).eval()
    name = model.load_adapter(tmp_path / "run/adapter", set_active=True)
    assert model.adapter_summary()[0]["method"] == "loreft" and name in model.heads


def test_recipe_layout_problems_name_their_recipe_key(tmp_path: Path, sentiment_csv: Path) -> None:
    recipe_path = write_recipe(tmp_path, "m", sentiment_csv)
    body = yaml.safe_load(recipe_path.read_text())
    body["model"]["layout"] = {**OPT_LAYOUT, "atention": "self_attn"}
    recipe_path.write_text(yaml.safe_dump(body))
    with pytest.raises(RecipeError, match=r"model\.layout\.atention: unknown layout key, did you mean attention\?"):
        load_recipe(recipe_path)
