import pytest

from compress.config import load_recipe, validate_recipe
from compress.errors import ConfigError


def test_shipped_recipes_validate(tmp_path):
    from conftest import ROOT

    for recipe in sorted((ROOT / "pipelines").glob("*.yaml")):
        cfg = load_recipe(recipe)
        assert cfg.name == recipe.stem
        assert cfg.stages[0] == "teacher"


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"distill\.alphx: unknown key"):
        validate_recipe({"name": "x", "distill": {"alphx": 0.5}})


def test_out_of_range_value_names_the_field():
    with pytest.raises(ConfigError, match=r"distill\.alpha: .*less than or equal to 1"):
        validate_recipe({"name": "x", "distill": {"alpha": 1.5}})


def test_overrides_beat_recipe_values(tiny_recipe):
    cfg = load_recipe(tiny_recipe(), ["distill.alpha=0.25", "teacher.model=vgg11_bn", "bench.threads=[1, 2]"])
    assert cfg.distill.alpha == 0.25
    assert cfg.teacher.model == "vgg11_bn"
    assert cfg.bench.threads == [1, 2]


def test_bad_override_key(tiny_recipe):
    with pytest.raises(ConfigError, match=r"teacher\.modle: unknown key"):
        load_recipe(tiny_recipe(), ["teacher.modle=resnet18"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(tiny_recipe(), ["teacher"])


def test_stage_order_is_checked():
    with pytest.raises(ConfigError, match="needs stage 'distill'"):
        validate_recipe({"name": "x", "stages": ["teacher", "export"]})
    with pytest.raises(ConfigError, match="unknown stage 'fly'"):
        validate_recipe({"name": "x", "stages": ["teacher", "fly"]})


def test_missing_and_invalid_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_dataset_names_are_checked():
    with pytest.raises(ConfigError, match="data.dataset"):
        validate_recipe({"name": "x", "data": {"dataset": "mnist"}})
    assert validate_recipe({"name": "x", "data": {"dataset": "imagefolder:/tmp/x"}}).data.dataset == "imagefolder:/tmp/x"


def test_checkpoint_and_pretrained_exclude_each_other():
    with pytest.raises(ConfigError, match="exclude each other"):
        validate_recipe({"name": "x", "teacher": {"checkpoint": "a.safetensors", "pretrained": True}})
