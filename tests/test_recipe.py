"""Recipe loading: presets, overrides, interpolation, method switching and error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptercli.errors import AdapterCliError, RecipeError
from adaptercli.recipe import CONFIGS_DIR, Recipe, available_presets, load_recipe, recipe_to_yaml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems_of(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return caught.value.problems


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "recipe.yaml",
        """
defaults: [method/lora, model/minilm]
data:
  source: rotten_tomatoes
train:
  learning_rate: 3e-4
output_dir: runs/${adapter.method}
""",
    )


def test_minimal_recipe_gets_defaults_and_inferred_values(tmp_path: Path) -> None:
    write(tmp_path / "train.csv.gz", "")
    path = write(
        tmp_path / "r.yaml",
        f"model: {{name_or_path: bert-base-uncased}}\ndata: {{train_file: {tmp_path / 'train.csv.gz'}}}\noutput_dir: out\n",
    )
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.source == "csv"  # from the suffix, past the compression suffix
    assert recipe.data.task == "classification"
    assert recipe.head.type == "classification"
    assert recipe.adapter.method == "lora" and recipe.adapter.config == {}
    assert recipe.train.batch_size == 32 and recipe.train.learning_rate == 1e-4
    assert recipe.composition is None


def test_presets_interpolation_and_float_parsing(recipe_file: Path) -> None:
    recipe = load_recipe(recipe_file)
    assert recipe.model.name_or_path == "minilm"
    assert recipe.adapter.config == {"r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"]}
    assert recipe.train.learning_rate == pytest.approx(3e-4)  # "3e-4" is a float, not a string
    assert recipe.output_dir == "runs/lora"


def test_offline_source_sets_task_and_head(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml", "model: {name_or_path: minilm}\ndata: {source: vader_movies}\noutput_dir: o\n"
    )
    recipe = load_recipe(path)
    assert (recipe.data.task, recipe.head.type) == ("regression", "regression")
    assert load_recipe(path, ["data.task=mlm"]).head.type == "mlm"  # any data set's text serves an LM


def test_overrides_are_dotted_and_parsed_as_yaml(recipe_file: Path) -> None:
    recipe = load_recipe(
        recipe_file,
        [
            "train.batch_size=16",
            "train.learning_rate=1e-3",
            "adapter.config.attn_matrices=[q,k,v]",
            "train.eval_steps=null",
            "head.num_labels='3'",
            "composition={type: fuse, adapters: [a, b]}",
        ],
    )
    assert recipe.train.batch_size == 16
    assert recipe.train.learning_rate == pytest.approx(1e-3)
    assert recipe.adapter.config["attn_matrices"] == ["q", "k", "v"]
    assert recipe.adapter.config["r"] == 8  # merged into the preset's config, not replacing it
    assert recipe.train.eval_steps is None
    assert recipe.head.num_labels == 3
    assert recipe.composition.type == "fuse" and recipe.composition.adapters == ["a", "b"]


def test_switching_method_drops_the_old_methods_config(recipe_file: Path) -> None:
    recipe = load_recipe(recipe_file, ["adapter.method=seq_bn"])
    assert recipe.adapter.method == "seq_bn"
    assert recipe.adapter.config == {}
    assert recipe.output_dir == "runs/seq_bn"


def test_config_set_with_the_new_method_is_kept(recipe_file: Path) -> None:
    recipe = load_recipe(recipe_file, ["adapter.config.reduction_factor=8", "adapter.method=seq_bn"])
    assert recipe.adapter.config == {"reduction_factor": 8}


def test_recipe_config_without_method_belongs_to_the_presets_method(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "defaults: [method/seq_bn]\nadapter: {config: {reduction_factor: 4}}\nmodel: {name_or_path: m}\n"
        "data: {source: sms_spam}\noutput_dir: o\n",
    )
    assert load_recipe(path).adapter.config == {"reduction_factor": 4, "non_linearity": "relu"}
    assert load_recipe(path, ["adapter.method=lora"]).adapter.config == {}


def test_switching_to_a_preset_method_via_defaults_override(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "defaults: [method/lora, method/ia3]\nmodel: {name_or_path: m}\ndata: {source: sms_spam}\noutput_dir: o\n",
    )
    recipe = load_recipe(path)
    assert recipe.adapter.method == "ia3"
    assert recipe.adapter.config == {"attn_matrices": ["k", "v"], "intermediate_lora": True}


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.yaml",
        """
model: {name_or_path: m}
data: {train_file: foo.csv}
train:
  learning_rat: 1e-3
  batch_size: abc
  mixed_precision: fp32
  warmup_ratio: 2
""",
    )
    problems = problems_of(path)
    assert "train.learning_rat: unknown key, did you mean train.learning_rate?" in problems
    assert "train.batch_size: expected an integer, got 'abc'" in problems
    assert "data.train_file: file not found: foo.csv" in problems
    assert "output_dir: missing required value" in problems
    assert "train.mixed_precision: expected one of no, fp16, bf16, got 'fp32'" in problems
    assert "train.warmup_ratio: must be >= 0 and <= 1, got 2" in problems
    assert len(problems) == 6


def test_unknown_key_in_wrong_section_suggests_the_right_one(recipe_file: Path) -> None:
    problems = problems_of(recipe_file, ["learning_rate=1e-3", "train.batch=8"])
    assert problems == [
        "learning_rate: unknown key, did you mean train.learning_rate?",
        "train.batch: unknown key, did you mean train.batch_size?",
    ]


def test_override_and_preset_problems_join_schema_problems(recipe_file: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml", "defaults: [method/lorra]\nmodel: {name_or_path: m}\ndata: {source: trec}\n"
    )
    problems = problems_of(path, ["train.seed=[1", "novalue", "output_dir=${nope}", "train.seed2=1"])
    assert problems == [
        "defaults[0]: unknown preset 'method/lorra', did you mean method/lora?",
        "train.seed: cannot parse the value '[1' as YAML",
        "novalue: override must look like key=value, e.g. train.learning_rate=3e-4",
        "output_dir: cannot resolve interpolation: Interpolation key 'nope' not found",
        "train.seed2: unknown key, did you mean train.seed?",
    ]


def test_cross_field_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
model: {name_or_path: m}
head: {type: tagging}
data: {source: hub}
composition: {adapters: []}
train: {max_steps: 0}
output_dir: o
""",
    )
    assert problems_of(path) == [
        "composition.type: missing required value",
        "data.name: the hub source needs a dataset id, e.g. nyu-mll/glue",
        "head.type: 'tagging' does not match data.task 'classification'",
        "train.max_steps: must be -1 (train for num_epochs) or positive, got 0",
        "composition.adapters: list the adapters to combine",
    ]


def test_data_source_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml", "model: {name_or_path: m}\ndata: {source: rotten_tomatos}\noutput_dir: o\n"
    )
    assert problems_of(path) == [
        "data.source: unknown source 'rotten_tomatos', did you mean rotten_tomatoes?"
    ]
    assert problems_of(path, ["data.source=null"]) == [
        "data: set data.source (an offline data set, hub, or a file format) or data.train_file"
    ]
    assert problems_of(path, ["data.source=null", "data.train_file=x.xlsx"])[0].startswith(
        "data.train_file: cannot tell the format of x.xlsx"
    )
    assert problems_of(path, ["data.source=vader_movies", "data.task=tagging"]) == [
        "data.task: data set vader_movies is for regression, got 'tagging'"
    ]


def test_invalid_value_is_not_reported_twice(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "model: {name_or_path: m}\ndata: {source: trec, task: clasification}\noutput_dir: o\n",
    )
    problems = problems_of(path)
    assert len(problems) == 1 and "did you mean classification?" in problems[0]


def test_missing_recipe_file_is_the_only_problem(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope.yaml") == [f"recipe file not found: {tmp_path / 'nope.yaml'}"]


def test_recipe_error_is_an_adaptercli_error_with_one_line_per_problem(tmp_path: Path) -> None:
    error = RecipeError(["a: x", "b: y"])
    assert isinstance(error, AdapterCliError)
    assert str(error) == "a: x\nb: y"


def test_local_presets_nest_and_cycles_are_caught(tmp_path: Path) -> None:
    write(tmp_path / "presets/base.yaml", "defaults: [method/seq_bn]\ntrain: {batch_size: 8}\n")
    path = write(
        tmp_path / "r.yaml",
        "defaults: [presets/base.yaml]\nmodel: {name_or_path: m}\ndata: {source: trec}\noutput_dir: o\n",
    )
    recipe = load_recipe(path)
    assert (recipe.adapter.method, recipe.train.batch_size) == ("seq_bn", 8)

    write(tmp_path / "loop.yaml", "defaults: [loop.yaml]\n")
    assert (
        problems_of(tmp_path / "loop.yaml")[0]
        == "defaults[0]: preset loop.yaml includes itself through its defaults"
    )


def test_yaml_round_trip(recipe_file: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        recipe_file, ["composition={type: stack, adapters: [a, b]}", "data.label_map={0: neg, 1: pos}"]
    )
    saved = write(tmp_path / "saved.yaml", recipe_to_yaml(recipe))
    assert load_recipe(saved) == recipe


def test_packaged_presets_name_their_method() -> None:
    methods = {"lora", "seq_bn", "double_seq_bn", "par_bn", "seq_bn_inv", "ia3", "prefix_tuning"}
    assert {f"method/{m}" for m in methods} | {"model/minilm"} <= set(available_presets())
    for method in methods:
        preset = (CONFIGS_DIR / "method" / f"{method}.yaml").read_text()
        assert f"method: {method}\n" in preset


def test_packaged_method_presets_are_accepted_by_the_method_registry(tmp_path: Path) -> None:
    methods = pytest.importorskip("adaptercli.methods")
    for preset in available_presets():
        if preset.startswith("method/"):
            path = write(
                tmp_path / "r.yaml",
                f"defaults: [{preset}]\nmodel: {{name_or_path: m}}\ndata: {{source: trec}}\noutput_dir: o\n",
            )
            adapter = load_recipe(path).adapter
            config = methods.resolve_config({"method": adapter.method, **adapter.config})
            assert methods.method_name(config) == adapter.method
